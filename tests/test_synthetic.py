"""The synthetic cascade simulator: reproducible bytes, the cascade's invariants, known probabilities
and a user-cluster hierarchy that residual quantization can find."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import TINY_NUM_BRANDS, TINY_SYNTHETIC

from recsys.data.schema import (
    SPLITS,
    BatchSchema,
    ColumnRole,
    DatasetManifest,
    check_spec_against_manifest,
)
from recsys.data.synthetic import build_world, config_hash, generate, true_logits
from recsys.errors import DataError
from recsys.spec import SyntheticSpec


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read(manifest: DatasetManifest, view: str, split: str, columns: list[str] | None = None
         ) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, columns=columns)
                             for f in manifest.files(view, split)])


@pytest.fixture(scope="module")
def cascade(tiny_dataset: DatasetManifest) -> dict[str, pa.Table]:
    return {s: read(tiny_dataset, "cascade", s) for s in SPLITS}


# ---- reproducibility -----------------------------------------------------------------------------


def test_same_config_gives_the_same_bytes(tmp_path, tiny_dataset, tiny_synthetic_cfg):
    again = tmp_path / "again"
    generate(tiny_synthetic_cfg, again, progress=False)
    want = digests(tiny_dataset.root)
    assert "dataset.json" in want
    assert sum(k.endswith(".parquet") for k in want) == 15 + 3 + 3 + 3 + 1 + 1
    assert digests(again) == want
    assert not (tmp_path / "again.partial").exists()


def test_another_seed_gives_other_bytes(tmp_path, tiny_dataset):
    other = generate(SyntheticSpec(**{**TINY_SYNTHETIC, "seed": 12}), tmp_path / "other",
                     progress=False)
    mine, theirs = digests(tiny_dataset.root), digests(other.root)
    assert set(mine) == set(theirs)  # the same layout...
    assert all(mine[k] != theirs[k] for k in mine)  # ...and not one identical file


def test_existing_dataset(tmp_path):
    small = {**TINY_SYNTHETIC, "requests": {"train": 200, "valid": 40, "test": 40},
             "rows_per_shard": 1000}
    cfg = SyntheticSpec(**small)
    out = tmp_path / "ds"
    first = generate(cfg, out, progress=False)
    before = digests(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    again = generate(cfg, out, progress=False)  # same config: kept as it is
    assert again.config_hash == first.config_hash
    assert digests(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes

    # another config: synthetic data is a pure function of its config, so it is regenerated
    other = SyntheticSpec(**{**small, "click_bias": -5.0})
    replaced = generate(other, out, progress=False)
    assert replaced.config_hash != first.config_hash
    assert DatasetManifest.load(out).config_hash == replaced.config_hash
    assert digests(out) != before
    assert digests(out) == digests(generate(other, tmp_path / "fresh", progress=False).root)


def test_what_is_not_synthetic_data_is_never_replaced_without_force(tmp_path):
    cfg = SyntheticSpec(**{**TINY_SYNTHETIC, "requests": {"train": 200, "valid": 40, "test": 40}})
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a dataset")
    with pytest.raises(DataError, match="not empty and is not a dataset"):
        generate(cfg, foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "not a dataset"

    prepared = tmp_path / "prepared"  # a dataset some other producer made
    generate(cfg, prepared, progress=False)
    manifest = DatasetManifest.load(prepared)
    manifest.source = {"adapter": "recsys.data.adapters.movielens"}
    manifest.save(prepared)
    before = digests(prepared)
    with pytest.raises(DataError, match="another config"):
        generate(SyntheticSpec(**{**cfg.model_dump(), "seed": 99}), prepared, progress=False)
    assert digests(prepared) == before
    generate(SyntheticSpec(**{**cfg.model_dump(), "seed": 99}), prepared, progress=False,
             force=True)
    assert DatasetManifest.load(prepared).source["generator"] == "recsys.data.synthetic"


# ---- the manifest --------------------------------------------------------------------------------


def test_manifest_rows_match_the_files(tiny_dataset, cascade):
    m = tiny_dataset
    assert set(m.views) == {"cascade", "impressions"}
    per_request = {"cascade": TINY_SYNTHETIC["retrieved_per_request"],
                   "impressions": TINY_SYNTHETIC["exposed_per_request"]}
    for view in m.views:
        assert set(m.views[view]) == set(SPLITS)
        for split in SPLITS:
            files = m.files(view, split)
            sizes = [pq.read_metadata(f).num_rows for f in files]
            assert sum(sizes) == m.rows[view][split]
            assert m.rows[view][split] == TINY_SYNTHETIC["requests"][split] * per_request[view]
            # shards of rows_per_shard rows, row groups of row_group_size (the last shorter)
            assert all(s == TINY_SYNTHETIC["rows_per_shard"] for s in sizes[:-1])
            groups = [md.row_group(g).num_rows for md in map(pq.read_metadata, files)
                      for g in range(md.num_row_groups)]
            assert all(g == TINY_SYNTHETIC["row_group_size"] for g in groups[:-1])
            assert 0 < groups[-1] <= TINY_SYNTHETIC["row_group_size"]


def test_spec_matches_the_manifest(tiny_spec, tiny_dataset, tiny_schema: BatchSchema):
    check_spec_against_manifest(tiny_spec, tiny_dataset)
    assert tiny_dataset.column("item_brand").cardinality == TINY_NUM_BRANDS
    assert tiny_schema.sparse_keys == ["user_id", "user_age", "user_region",
                                       "user_hist_categories", "item_id", "item_category",
                                       "item_brand", "hour", "device"]
    assert tiny_schema.dense == ["user_activity", "item_price", "item_popularity"]
    assert tiny_schema.groups == {"request": "request_id", "user": "user_id"}
    assert tiny_schema.stage == "stage" and tiny_schema.teacher == "teacher"
    assert tiny_schema.oracle == {"click": "click_prob", "conversion": "conversion_prob"}


def test_ids_lie_within_their_cardinality(tiny_dataset, cascade):
    for col in tiny_dataset.columns:
        if col.role not in (ColumnRole.SPARSE, ColumnRole.MULTI_SPARSE):
            continue
        for table in cascade.values():
            values = table.column(col.name)
            if col.role == ColumnRole.MULTI_SPARSE:
                values = pc.list_flatten(values)
            lo, hi = pc.min(values).as_py(), pc.max(values).as_py()
            assert lo >= 0 and hi < col.cardinality, col.name


def test_request_ids_run_on_across_splits(cascade):
    start = 0
    for split in SPLITS:
        ids = np.unique(cascade[split].column("request_id").to_numpy())
        n = TINY_SYNTHETIC["requests"][split]
        np.testing.assert_array_equal(ids, np.arange(start, start + n))
        start += n


# ---- the cascade ---------------------------------------------------------------------------------


def test_every_request_has_the_cascade_sizes(tiny_dataset, cascade):
    cfg = TINY_SYNTHETIC
    for split in SPLITS:
        t = cascade[split]
        req = t.column("request_id").to_numpy()
        stage = t.column("stage").to_numpy()
        n = cfg["requests"][split]
        base = req.min()
        assert np.bincount(req - base, minlength=n).tolist() == [cfg["retrieved_per_request"]] * n
        for at_least, size in ((1, "preranked_per_request"), (2, "ranked_per_request"),
                               (3, "exposed_per_request")):
            counts = np.bincount(req - base, weights=stage >= at_least, minlength=n)
            assert counts.tolist() == [cfg[size]] * n, size
        # one user, hour and device per request, and no item twice in a request
        for col in ("user_id", "hour", "device"):
            v = t.column(col).to_numpy().reshape(n, cfg["retrieved_per_request"])
            assert (v == v[:, :1]).all(), col
        items = t.column("item_id").to_numpy().reshape(n, cfg["retrieved_per_request"])
        assert (np.diff(np.sort(items, axis=1), axis=1) > 0).all()

        imp = read(tiny_dataset, "impressions", split)
        assert np.bincount(imp.column("request_id").to_numpy() - base, minlength=n).tolist() \
            == [cfg["exposed_per_request"]] * n
        # the impressions view is exactly the exposed rows of the cascade, in the same order
        assert imp.equals(t.filter(pa.array(stage >= 3)))


def test_labels_and_teacher_follow_the_stage(cascade):
    for t in cascade.values():
        stage = t.column("stage").to_numpy()
        click = t.column("click").to_numpy()
        conv = t.column("conversion").to_numpy()
        assert set(np.unique(click)) <= {0, 1} and set(np.unique(conv)) <= {0, 1}
        assert (click[stage < 3] == 0).all()
        assert (conv[click == 0] == 0).all()
        np.testing.assert_array_equal(click == 1, stage >= 4)
        np.testing.assert_array_equal(conv == 1, stage == 5)
        assert stage.min() >= 0 and stage.max() <= 5
        teacher_null = ~np.asarray(t.column("teacher").is_valid())
        np.testing.assert_array_equal(teacher_null, stage == 0)
        assert np.isfinite(t.column("teacher").drop_null().to_numpy()).all()
        assert click.sum() > 0 and conv.sum() >= 0


def test_teacher_ranks_the_exposed_above_the_rest_of_the_ranked(cascade):
    """Exposure is the ranker's top list among the ranked: its score is the teacher."""
    t = cascade["train"]
    R, N = TINY_SYNTHETIC["requests"]["train"], TINY_SYNTHETIC["retrieved_per_request"]
    stage = t.column("stage").to_numpy().reshape(R, N)
    teacher = t.column("teacher").to_numpy(zero_copy_only=False).reshape(R, N)
    exposed_min = np.where(stage >= 3, teacher, np.inf).min(axis=1)
    ranked_only_max = np.where(stage == 2, teacher, -np.inf).max(axis=1)
    assert (exposed_min > ranked_only_max).all()


def test_probabilities_are_the_true_model(tiny_synthetic_cfg, cascade):
    cfg = tiny_synthetic_cfg
    world = build_world(cfg)
    t = cascade["valid"]
    rows = np.random.default_rng(0).choice(t.num_rows, size=25, replace=False)
    sub = t.take(pa.array(rows))
    col = {c: sub.column(c).to_numpy() for c in
           ("user_id", "hour", "device", "item_id", "click_prob", "conversion_prob")}
    click_logit, conv_logit = true_logits(world, cfg, col["user_id"], col["hour"],
                                          col["device"], col["item_id"][:, None])
    p_click = 1.0 / (1.0 + np.exp(-click_logit[:, 0]))
    p_conv = 1.0 / (1.0 + np.exp(-conv_logit[:, 0]))
    np.testing.assert_allclose(col["click_prob"], p_click, rtol=1e-6, atol=0)
    # conversion_prob is the probability of click and conversion (the ESMM pCTCVR target)
    np.testing.assert_allclose(col["conversion_prob"], p_click * p_conv, rtol=1e-6, atol=0)
    # and the features logged for the row are the world's
    users, items = col["user_id"], col["item_id"]
    np.testing.assert_array_equal(sub.column("user_age").to_numpy(), world.user_age[users])
    np.testing.assert_array_equal(sub.column("user_region").to_numpy(), world.user_region[users])
    np.testing.assert_array_equal(sub.column("item_category").to_numpy(),
                                  world.item_category[items])
    np.testing.assert_array_equal(sub.column("item_brand").to_numpy(), world.item_brand[items])
    np.testing.assert_allclose(sub.column("item_price").to_numpy(), world.item_price[items],
                               rtol=1e-6)
    assert sub.column("user_hist_categories").to_pylist() == \
        world.user_hist.take(pa.array(users)).to_pylist()


def test_click_rate_matches_the_click_probability(cascade):
    exposed = pa.concat_tables(cascade.values()).filter(
        pc.greater_equal(pa.concat_tables(cascade.values()).column("stage"), 3))
    p = exposed.column("click_prob").to_numpy().astype(np.float64)
    clicks = exposed.column("click").to_numpy()
    n = len(p)
    assert n == 4000 * TINY_SYNTHETIC["exposed_per_request"]
    se = np.sqrt((p * (1 - p)).sum()) / n
    assert abs(clicks.mean() - p.mean()) < 3 * se, (clicks.mean(), p.mean(), se)
    # the cascade selects: exposed rows click more often than the ones it dropped
    dropped = pa.concat_tables(cascade.values()).filter(
        pc.equal(pa.concat_tables(cascade.values()).column("stage"), 0))
    assert p.mean() > dropped.column("click_prob").to_numpy().mean()


def test_user_latents_have_a_three_level_hierarchy(tiny_synthetic_cfg):
    world = build_world(tiny_synthetic_cfg)
    path = world.user_path
    b = TINY_SYNTHETIC["cluster_branching"]
    assert path.shape == (TINY_SYNTHETIC["num_users"], 3)
    # global node ids per level, each node the child of its parent
    for lvl in range(3):
        assert path[:, lvl].max() < np.prod(b[: lvl + 1])
    np.testing.assert_array_equal(path[:, 1] // b[1], path[:, 0])
    np.testing.assert_array_equal(path[:, 2] // b[2], path[:, 1])
    assert len(np.unique(path[:, 2])) == np.prod(b)  # 300 users fill all 8 leaves

    x = world.user_latent
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    i, j = np.triu_indices(len(x), k=1)
    d = dist[i, j]
    same = [path[i, lvl] == path[j, lvl] for lvl in range(3)]
    within_leaf = d[same[2]].mean()
    within_l2 = d[same[1] & ~same[2]].mean()  # same level-2 node, other leaf
    within_l1 = d[same[0] & ~same[1]].mean()  # same top cluster, other level-2 node
    between = d[~same[0]].mean()
    assert within_leaf < within_l2 < within_l1 < between, (within_leaf, within_l2, within_l1,
                                                            between)


def test_world_is_a_function_of_the_seed(tiny_synthetic_cfg):
    a, b = build_world(tiny_synthetic_cfg), build_world(tiny_synthetic_cfg)
    np.testing.assert_array_equal(a.user_latent, b.user_latent)
    np.testing.assert_array_equal(a.item_category, b.item_category)
    c = build_world(SyntheticSpec(**{**TINY_SYNTHETIC, "seed": 99}))
    assert not np.array_equal(a.user_latent, c.user_latent)


# ---- how much users of a cluster share (the HGR sweep's knob) -------------------------------------


def _shared_fraction(world, level: int) -> float:
    """The fraction of the user latents' variance that their level-``level`` cluster means hold."""
    x = world.user_latent - world.user_latent.mean(0)
    groups = world.user_path[:, level]
    means = np.zeros((groups.max() + 1, x.shape[1]))
    np.add.at(means, groups, x)
    means /= np.maximum(np.bincount(groups), 1)[:, None]
    return float((means[groups] ** 2).sum() / (x**2).sum())


def test_default_sharing_is_the_world_as_it_was():
    cfg = SyntheticSpec(**{**TINY_SYNTHETIC, "num_users": 2000})
    explicit = SyntheticSpec(**{**TINY_SYNTHETIC, "num_users": 2000, "sharing_depth": 3})
    # an unset knob leaves the world as it was; a set one is part of the config
    np.testing.assert_allclose(build_world(cfg).user_latent, build_world(explicit).user_latent)
    assert config_hash(cfg) != config_hash(explicit)  # set knobs are part of the config


# 8 top clusters, 32 below them, 64 leaves, 500 users per leaf: the leaf means hold the shared
# part and only 1/500 of the users' own noise
WIDE = {**TINY_SYNTHETIC, "num_users": 32_000, "cluster_branching": [8, 4, 2], "latent_dim": 64}


def _expected_share(sharing: float, depth: int, level: int) -> float:
    """The share of the centred variance that the level-``level`` means hold in expectation:
    level l's centers (std 0.75^l, n_l of them) keep (n_l - 1) / n_l of their variance once the
    latents are centred, and the means also pick up the own noise of 1 / (users per node)."""
    nodes = np.cumprod(WIDE["cluster_branching"])
    weights = 0.75 ** (2 * np.arange(3))[:depth]
    kept = weights * (nodes[:depth] - 1) / nodes[:depth] / weights.sum()
    shared, own = sharing * kept, 1 - sharing
    held = shared[: level + 1].sum() + own * nodes[level] / WIDE["num_users"]
    return held / (shared.sum() + own)


@pytest.mark.parametrize("sharing", [0.2, 0.5, 0.9])
def test_cluster_sharing_is_the_clusters_share_of_the_variance(sharing: float):
    world = build_world(SyntheticSpec(**WIDE, cluster_sharing=sharing))
    assert _shared_fraction(world, 2) == pytest.approx(_expected_share(sharing, 3, 2), abs=0.04)
    # the total variance is the default world's (0.75^0 + 0.75^2 + 0.75^4 + 0.3^2 per dim)
    assert world.user_latent.var() == pytest.approx(1 + 0.75**2 + 0.75**4 + 0.09, rel=0.1)


def test_sharing_depth_one_makes_sub_clusters_no_closer():
    shallow = build_world(SyntheticSpec(**WIDE, cluster_sharing=0.6, sharing_depth=1))
    deep = build_world(SyntheticSpec(**WIDE, cluster_sharing=0.6))
    # depth 1: the top clusters hold all the shared variance, the leaves add only noise
    assert _shared_fraction(shallow, 0) == pytest.approx(_expected_share(0.6, 1, 0), abs=0.04)
    assert _shared_fraction(shallow, 2) - _shared_fraction(shallow, 0) < 0.01
    # the whole tree: the leaves hold more than the top clusters
    assert _shared_fraction(deep, 2) - _shared_fraction(deep, 0) > 0.1


@pytest.mark.parametrize(("key", "value", "message"), [
    ("cluster_sharing", 1.5, "cluster_sharing must be in \\[0, 1\\]"),
    ("sharing_depth", 4, "sharing_depth must be between 1 and the 3 levels"),
    ("sharing_depth", 0, "sharing_depth must be between 1 and the 3 levels"),
])
def test_sharing_knobs_are_checked(key: str, value: float, message: str):
    with pytest.raises(ValueError, match=message):
        SyntheticSpec(**{**TINY_SYNTHETIC, key: value})
