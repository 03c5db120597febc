"""The synthetic cascade simulator: the default data source, with known click probabilities.

The world:

* **users** sit at the leaves of a tree of latent clusters (``cluster_branching``, >= 3 levels); a
  user's latent vector is the sum of the centers on its path, each level with a smaller scale, plus
  noise, so residual quantization of user embeddings has a real hierarchy to find.
  ``cluster_sharing`` sets how much of that vector the users of a cluster share (the rest is their
  own) and ``sharing_depth`` how deep in the tree the sharing goes, at constant total variance. Demographic-like
  features (age bucket, region) follow the top levels of the tree; a multi-valued feature lists the
  categories the user recently engaged with.
* **items** have a category, a brand, a price and a popularity; their latent vectors sit near their
  category's center.
* **requests** come from activity-weighted users at an hour on a device. Retrieval takes candidates
  by noisy affinity and popularity; a noisy pre-ranker and a sharper ranker narrow them; the top few
  are exposed. Click and conversion are drawn from known probabilities whose logits hold explicit
  second- and third-order feature crosses (hour x category, age x category x device,
  region x brand group), so interaction models have something to learn.

Every candidate is logged with the deepest stage it reached, the ranker's score (the teacher, null
where the ranker never scored it) and its true click and conversion probabilities. Two views are
written: ``cascade`` (every candidate) and ``impressions`` (exposed rows only). Generation goes in
fixed chunks of requests, each with its own seed, and streams to Parquet: the same config gives the
same bytes, and memory stays flat however many rows are asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from recsys.data.parquet import DatasetWriter, claim_output, current_dataset, dataset_write
from recsys.data.schema import (
    REQUEST_ID,
    SPLITS,
    STAGE,
    TEACHER,
    USER_ID,
    ColumnInfo,
    ColumnRole,
    DatasetManifest,
    Stage,
)
from recsys.progress import progress_bar
from recsys.spec import Side, SyntheticSpec

# Bump when the simulation changes, so that data made by older code is not taken as current.
SIMULATOR_VERSION = 1
GENERATOR = "recsys.data.synthetic"
CHUNK_REQUESTS = 2048  # requests per generation chunk (fixed: part of what decides the bytes)
NUM_AGES = 7
NUM_REGIONS = 16
NUM_HOURS = 24
NUM_DEVICES = 4
NUM_BRAND_GROUPS = 8


@dataclass
class World:
    """Users, items and the true click/conversion model (drawn once from the seed)."""

    user_latent: np.ndarray  # (U, d)
    user_path: np.ndarray  # (U, L) cluster index at each level (global node ids per level)
    user_age: np.ndarray
    user_region: np.ndarray
    user_device: np.ndarray  # preferred device
    user_weight: np.ndarray  # request probability
    user_hist: pa.ListArray  # recent categories per user
    user_hist_mask: np.ndarray  # (U, C) bool: category in the user's history
    item_latent: np.ndarray  # (I, d)
    item_category: np.ndarray
    item_brand: np.ndarray
    item_price: np.ndarray  # standardised log price
    item_popularity: np.ndarray  # standardised log popularity
    category_center: np.ndarray
    hour_x_category: np.ndarray  # (4 day parts, C)
    age_x_category_x_device: np.ndarray  # (A, C, D)
    region_x_brand_group: np.ndarray  # (R, G)
    num_brands: int


def config_hash(cfg: SyntheticSpec) -> str:
    # the sharing knobs count only when set, so datasets made before they existed keep their hash
    payload = {"simulator_version": SIMULATOR_VERSION,
               **cfg.model_dump(mode="json", exclude={k for k in SHARING_KNOBS
                                                      if getattr(cfg, k) is None})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


SHARING_KNOBS = ("cluster_sharing", "sharing_depth")
LEVEL_DECAY = 0.75  # the std of level l's cluster centers is LEVEL_DECAY ** l


def sharing_scales(cfg: SyntheticSpec) -> tuple[float, float]:
    """The factors of a user's shared part (the centers of its top ``sharing_depth`` clusters)
    and of its own noise, so that the shared part is ``cluster_sharing`` of the latent variance
    and the total variance is the default world's. Both are 1 with the defaults.

    Example:
        >>> sharing_scales(SyntheticSpec())
        (1.0, 1.0)
    """
    levels = len(cfg.cluster_branching)
    per_level = [LEVEL_DECAY ** (2 * lvl) for lvl in range(levels)]
    natural = sum(per_level)  # the shared variance of the default world, per latent dim
    own = cfg.user_noise**2
    total = natural + own
    if cfg.cluster_sharing is None and cfg.sharing_depth is None:
        return 1.0, 1.0
    sharing = natural / total if cfg.cluster_sharing is None else cfg.cluster_sharing
    used = sum(per_level[: cfg.sharing_depth or levels])
    own_scale = math.sqrt((1.0 - sharing) * total / own) if own > 0 else 0.0
    return math.sqrt(sharing * total / used), own_scale


def build_world(cfg: SyntheticSpec) -> World:
    rng = np.random.default_rng([cfg.seed, 0])
    d, n_users, n_items, n_cats = cfg.latent_dim, cfg.num_users, cfg.num_items, cfg.num_categories

    # user-cluster tree: node ids per level are global within the level
    levels = len(cfg.cluster_branching)
    leaves = int(np.prod(cfg.cluster_branching))
    leaf = rng.integers(leaves, size=n_users)
    path = np.empty((n_users, levels), dtype=np.int64)
    rest = leaf.copy()
    for lvl in range(levels - 1, -1, -1):  # leaf index -> node index at every level
        path[:, lvl] = rest
        rest = rest // cfg.cluster_branching[lvl]
    shared = np.zeros((n_users, d))
    depth = cfg.sharing_depth or levels
    for lvl in range(levels):
        nodes = int(np.prod(cfg.cluster_branching[: lvl + 1]))
        centers = rng.normal(0.0, LEVEL_DECAY**lvl, size=(nodes, d))  # drawn even if unused:
        if lvl < depth:  # the draws after them stay the same
            shared += centers[path[:, lvl]]
    own = rng.normal(0.0, cfg.user_noise, size=(n_users, d))
    shared_scale, own_scale = sharing_scales(cfg)
    latent = shared_scale * shared + own_scale * own

    top, second = path[:, 0], path[:, 1]
    age = (top * 2 + rng.integers(0, 3, size=n_users)) % NUM_AGES
    region = (second * 3 + rng.integers(0, 2, size=n_users)) % NUM_REGIONS
    device = rng.integers(NUM_DEVICES, size=n_users)
    weight = rng.lognormal(0.0, 1.0, size=n_users)
    weight /= weight.sum()

    category_center = rng.normal(0.0, 1.0, size=(n_cats, d))
    item_category = rng.integers(n_cats, size=n_items)
    item_latent = (0.8 * category_center[item_category]
                   + rng.normal(0.0, cfg.item_noise, size=(n_items, d)))
    num_brands = max(8, n_items // 20)
    item_brand = (item_category * 7 + rng.integers(0, 5, size=n_items)) % num_brands
    price = rng.normal(0.0, 1.0, size=n_cats)[item_category] + rng.normal(0.0, 0.5, size=n_items)
    popularity = rng.normal(0.0, 1.0, size=n_items)

    # recent categories: a Gumbel top-k draw from the user's category affinities
    scores = latent @ category_center.T / np.sqrt(d) + rng.gumbel(size=(n_users, n_cats))
    lengths = rng.integers(1, cfg.history_length + 1, size=n_users)
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, : cfg.history_length]
    keep = np.arange(cfg.history_length)[None, :] < lengths[:, None]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    hist = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ranked[keep].astype(np.int64)))
    hist_mask = np.zeros((n_users, n_cats), dtype=bool)
    np.put_along_axis(hist_mask, np.where(keep, ranked, ranked[:, :1]), True, axis=1)

    return World(
        user_latent=latent, user_path=path, user_age=age, user_region=region,
        user_device=device, user_weight=weight, user_hist=hist, user_hist_mask=hist_mask,
        item_latent=item_latent, item_category=item_category, item_brand=item_brand,
        item_price=_standardise(price), item_popularity=_standardise(popularity),
        category_center=category_center,
        hour_x_category=rng.normal(0.0, 0.6, size=(4, n_cats)),
        age_x_category_x_device=rng.normal(0.0, 0.7, size=(NUM_AGES, n_cats, NUM_DEVICES)),
        region_x_brand_group=rng.normal(0.0, 0.6, size=(NUM_REGIONS, NUM_BRAND_GROUPS)),
        num_brands=num_brands,
    )


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def true_logits(world: World, cfg: SyntheticSpec, users: np.ndarray, hours: np.ndarray,
                devices: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Click and conversion logits for candidate ``items`` (R, N) of requests (R,)."""
    d = world.user_latent.shape[1]
    u = world.user_latent[users][:, None, :]
    affinity = np.einsum("rnd,rnd->rn", np.broadcast_to(u, (*items.shape, d)),
                         world.item_latent[items]) / np.sqrt(d)
    cat = world.item_category[items]
    age = world.user_age[users][:, None]
    in_history = world.user_hist_mask[users[:, None], cat]
    click = (cfg.click_bias + affinity + 0.6 * in_history
             + world.hour_x_category[(hours // 6)[:, None], cat]
             + world.age_x_category_x_device[age, cat, devices[:, None]]
             + 0.3 * world.item_popularity[items])
    region = world.user_region[users][:, None]
    group = world.item_brand[items] % NUM_BRAND_GROUPS
    conversion = (cfg.conversion_bias + 0.7 * affinity - 0.5 * world.item_price[items]
                  + world.region_x_brand_group[region, group])
    return click, conversion


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _top_mask(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of each row's k highest scores (among ``allowed``)."""
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def simulate_chunk(world: World, cfg: SyntheticSpec, split_index: int, chunk: int,
                   num_requests: int, first_request_id: int) -> pa.Table:
    """One chunk of requests through the whole cascade: one row per retrieved candidate."""
    rng = np.random.default_rng([cfg.seed, 1, split_index, chunk])
    R, N = num_requests, cfg.retrieved_per_request
    users = rng.choice(len(world.user_weight), size=R, p=world.user_weight)
    hours = rng.integers(NUM_HOURS, size=R)
    devices = np.where(rng.random(R) < 0.8, world.user_device[users],
                       rng.integers(NUM_DEVICES, size=R))

    # retrieval: noisy affinity plus popularity, in blocks that keep (rows x items) near 4M floats
    d = world.user_latent.shape[1]
    num_items = len(world.item_latent)
    step = max(1, (1 << 22) // num_items)
    items = np.empty((R, N), dtype=np.int64)
    for a in range(0, R, step):
        b = min(a + step, R)
        score = (world.user_latent[users[a:b]] @ world.item_latent.T / np.sqrt(d)
                 + 0.5 * world.item_popularity[None, :] + rng.gumbel(size=(b - a, num_items)))
        items[a:b] = np.argpartition(-score, N - 1, axis=1)[:, :N]
    items.sort(axis=1)  # a canonical candidate order, independent of the partition algorithm

    click_logit, conv_logit = true_logits(world, cfg, users, hours, devices, items)
    prerank = click_logit + rng.normal(0.0, cfg.prerank_noise, size=(R, N))
    ranker = click_logit + rng.normal(0.0, cfg.ranker_noise, size=(R, N))
    passed_prerank = _top_mask(prerank, cfg.preranked_per_request)
    ranked = _top_mask(ranker, cfg.ranked_per_request, passed_prerank)
    exposed = _top_mask(ranker, cfg.exposed_per_request, ranked)

    p_click, p_conv = _sigmoid(click_logit), _sigmoid(conv_logit)
    click = exposed & (rng.random((R, N)) < p_click)
    conversion = click & (rng.random((R, N)) < p_conv)
    stage = (passed_prerank.astype(np.int8) + ranked + exposed + click + conversion).astype(np.int8)

    rows_users = np.repeat(users, N)
    flat_items = items.reshape(-1)
    teacher = pa.array(ranker.reshape(-1).astype(np.float32), mask=~passed_prerank.reshape(-1))
    return pa.table({
        REQUEST_ID: np.repeat(np.arange(first_request_id, first_request_id + R), N),
        USER_ID: rows_users,
        "user_age": world.user_age[rows_users],
        "user_region": world.user_region[rows_users],
        "user_hist_categories": world.user_hist.take(pa.array(rows_users)),
        "user_activity": np.log(world.user_weight[rows_users] * len(world.user_weight))
        .astype(np.float32),
        "item_id": flat_items,
        "item_category": world.item_category[flat_items],
        "item_brand": world.item_brand[flat_items],
        "item_price": world.item_price[flat_items].astype(np.float32),
        "item_popularity": world.item_popularity[flat_items].astype(np.float32),
        "hour": np.repeat(hours, N),
        "device": np.repeat(devices, N),
        "click": click.reshape(-1).astype(np.int8),
        "conversion": conversion.reshape(-1).astype(np.int8),
        STAGE: stage.reshape(-1),
        TEACHER: teacher,
        "click_prob": p_click.reshape(-1).astype(np.float32),
        "conversion_prob": (p_click * p_conv).reshape(-1).astype(np.float32),
    }, schema=ARROW_SCHEMA)


ARROW_SCHEMA = pa.schema([
    (REQUEST_ID, pa.int64()), (USER_ID, pa.int64()), ("user_age", pa.int64()),
    ("user_region", pa.int64()), ("user_hist_categories", pa.list_(pa.int64())),
    ("user_activity", pa.float32()), ("item_id", pa.int64()), ("item_category", pa.int64()),
    ("item_brand", pa.int64()), ("item_price", pa.float32()), ("item_popularity", pa.float32()),
    ("hour", pa.int64()), ("device", pa.int64()), ("click", pa.int8()), ("conversion", pa.int8()),
    (STAGE, pa.int8()), (TEACHER, pa.float32()), ("click_prob", pa.float32()),
    ("conversion_prob", pa.float32()),
])


def describe_columns(cfg: SyntheticSpec, world: World) -> list[ColumnInfo]:
    def col(name: str, role: ColumnRole, side: Side | None = None, card: int | None = None,
            text: str = "") -> ColumnInfo:
        return ColumnInfo(name=name, role=role, side=side, cardinality=card, description=text)

    S, M, D = ColumnRole.SPARSE, ColumnRole.MULTI_SPARSE, ColumnRole.DENSE
    return [
        col(REQUEST_ID, ColumnRole.GROUP, text="request (one user, hour and device)"),
        col(USER_ID, S, Side.USER, cfg.num_users, "user id (also the user group)"),
        col("user_age", S, Side.USER, NUM_AGES, "age bucket, follows the top user cluster"),
        col("user_region", S, Side.USER, NUM_REGIONS, "region, follows the second cluster level"),
        col("user_hist_categories", M, Side.USER, cfg.num_categories, "recent categories"),
        col("user_activity", D, Side.USER, text="log relative request rate"),
        col("item_id", S, Side.ITEM, cfg.num_items),
        col("item_category", S, Side.ITEM, cfg.num_categories),
        col("item_brand", S, Side.ITEM, world.num_brands),
        col("item_price", D, Side.ITEM, text="standardised log price"),
        col("item_popularity", D, Side.ITEM, text="standardised log popularity"),
        col("hour", S, Side.CONTEXT, NUM_HOURS),
        col("device", S, Side.CONTEXT, NUM_DEVICES),
        col("click", ColumnRole.LABEL, text="clicked (exposed rows only can be 1)"),
        col("conversion", ColumnRole.LABEL, text="clicked and converted"),
        col(STAGE, ColumnRole.STAGE, text="deepest cascade stage reached (recsys.data.Stage)"),
        col(TEACHER, ColumnRole.TEACHER, text="ranker logit; null below the pre-ranker cut"),
        col("click_prob", ColumnRole.ORACLE, text="true click probability"),
        col("conversion_prob", ColumnRole.ORACLE,
            text="true probability of click and conversion (the ESMM pCTCVR target)"),
    ]


def generate(cfg: SyntheticSpec, out: str | Path, *, force: bool = False,
             progress: bool = True) -> DatasetManifest:
    """Simulate every split into ``out`` (``cascade`` and ``impressions`` views).

    An existing dataset made from the same config is kept as it is; a synthetic dataset made from
    another config (or by another simulator version) is regenerated if it holds nothing but its own
    files; anything else at ``out`` is an error unless ``force``. The write holds the dataset's
    lock (a second writer of ``out`` gets a RunError at once) and removes ``OUT.partial`` if it
    fails.

    Example:
        >>> manifest = generate(SyntheticSpec(seed=1), "data/synth")
        >>> manifest.rows["impressions"]["train"]
    """
    out = Path(out)
    chash = config_hash(cfg)
    existing = current_dataset(out, chash)  # the common case, a complete dataset: no lock
    if existing is not None:
        return existing
    with dataset_write(out):  # one writer per path; a failure removes OUT.partial
        existing = claim_output(out, chash, force, regenerable=GENERATOR)
        if existing is not None:  # another writer finished it between our first look and now
            return existing
        return _simulate(cfg, out, chash, progress)


def _simulate(cfg: SyntheticSpec, out: Path, chash: str, progress: bool) -> DatasetManifest:
    world = build_world(cfg)
    writer = DatasetWriter(out, "synthetic", {"generator": GENERATOR,
                                              "config": cfg.model_dump(mode="json")},
                           chash, describe_columns(cfg, world), ARROW_SCHEMA,
                           rows_per_shard=cfg.rows_per_shard, row_group_size=cfg.row_group_size)
    total = sum(-(-cfg.requests[s] // CHUNK_REQUESTS) for s in SPLITS)
    next_request = 0
    with progress_bar(total=total, desc="simulating requests", unit="chunk",
                      disable=not progress) as bar:
        for split_index, split in enumerate(SPLITS):
            n = cfg.requests[split]
            for chunk, start in enumerate(range(0, n, CHUNK_REQUESTS)):
                size = min(CHUNK_REQUESTS, n - start)
                table = simulate_chunk(world, cfg, split_index, chunk, size, next_request)
                next_request += size
                writer.write("cascade", split, table)
                exposed = np.asarray(table.column(STAGE)) >= Stage.EXPOSED
                writer.write("impressions", split, table.filter(pa.array(exposed)))
                bar.update()
    return writer.finish()
