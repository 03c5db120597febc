"""A synthetic "Criteo-format world": display-ads TSV with a known click probability.

The file has the layout of the Kaggle ``train.txt`` (``label <TAB> I1..I13 <TAB> C1..C26``, no
header, integers as decimal text, categoricals as 8 lowercase hex digits, an empty field for a
missing value), so it goes through the real Criteo adapter (``prepare("criteo", ...)``) unchanged.
Unlike the real data, the click probability of every row is known, and its logit holds planted
2nd- and 3rd-order feature crosses, so interaction models (DCN, PIN, xDeepInt, ...) can be compared
with an MLP against an oracle.

The world:

* **26 categorical fields** ``C1..C26`` with fixed cardinalities (:data:`CARDINALITIES`),
  log-spaced from 4 to 200_000 and spread over the names roughly as in the real data (C3, C12,
  C21, C16 and C4 the largest; C9, C20, C17 the smallest). Ids are ranks drawn from a truncated
  power law, P(id = r) proportional to (r + 1) ** -zipf_exponent (1.1), so a few head ids dominate
  and the tail is rare. A field is missing at its own rate (:data:`CAT_MISSING`, 0-30%). Id r of
  field j is written as the hex of a 32-bit bijective mix of (r, j) (:meth:`World.hex_codes`), so
  distinct ids stay distinct and the hex carries no order.
* **13 integer fields** ``I1..I13``: floor(exp(mu + sigma * z)), non-negative and heavy-tailed,
  each with its own (mu, sigma) and missing rate (:data:`INT_FIELDS`); I2 is -1 in 5% of rows,
  as the real I2 sometimes is.
* **The true logit** (every table is centred under its field's id distribution and scaled, the
  weight tables w and t to variance 1, the latent tables u, v, w of shape (cardinality, k) to
  variance 1/k per column, so each term has mean 0 and a standard deviation of about its scale; a
  missing categorical contributes 0 to every term, a missing integer has z = 0)::

      bias
      + first_order_scale * sum_{f in FIRST_ORDER}  w_f[id_f]
      + dense_scale       * sum_{j in DENSE}        beta_j * z_j
      + pair_scale        * sum_{(a, b) in PAIRS}   sqrt(k) * <u_a[id_a], v_b[id_b]>
      + triple_scale      * sum_{(a, b, c) in TRIPLES}
                                k * sum_d u_a[id_a, d] v_b[id_b, d] w_c[id_c, d]
      + dense_cross_scale * z_I7 * t_C17[id_C17]

  where z_j is log1p(max(I_j, 0)) standardised by its mean and deviation (computed by quadrature,
  not from a sample). The cross terms are centred, so their marginal
  effect on any single field is zero: everything they add is interaction, which an additive model
  (or the "first-order" oracle, the logit without the cross terms) cannot see. ``bias`` is solved
  once, from a fixed 65_536-row sample, so the mean click probability is ``ctr``.
* **Labels** are Bernoulli(sigmoid(logit)).

Randomness: the world's tables come from a numpy Generator seeded with (seed, purpose); rows come
in fixed blocks of :data:`BLOCK_ROWS`, block b from (seed, rows, b). The output is a pure function
of the config, the same for any ``chunk_rows`` (which only bounds the memory of the writer).

The TSV and its description are written by
:func:`recsys.data.adapters.criteo_world_writer.write_criteo_world`.

Example:
    >>> cfg = CriteoWorldConfig(rows=100_000, seed=1)
    >>> summary = write_criteo_world(Path("data/criteo-world"), cfg)  # train.txt + world.json
    >>> summary["splits"]["test"]["oracle_auc"] > summary["splits"]["test"]["first_order_auc"]
    True
    >>> rows = generate_rows(cfg, 0, 10)  # the same rows as arrays, with their true logits
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

GENERATOR = "recsys.data.adapters.criteo_world"
# Bump when the generated rows change for the same config, so old files are not taken as current.
GENERATOR_VERSION = 1
BLOCK_ROWS = 8192  # rows per random block: fixed, so the rows do not depend on chunk_rows
GUIDE_BINS = 1 << 16  # bins of the guide tables that speed up drawing ids (a power of two)
BIAS_SAMPLE_ROWS = 65_536  # rows of the fixed sample that the bias is solved on
INT_NAMES = tuple(f"I{i}" for i in range(1, 14))
CAT_NAMES = tuple(f"C{i}" for i in range(1, 27))

# C1..C26: np.geomspace(4, 200_000, 26) rounded, the largest on C3, C12, C21, C16, C4 (as in the
# real Criteo data), the smallest on C9, C20, C17
CARDINALITIES: tuple[int, ...] = (
    197, 6271, 200_000, 35_416, 467, 54, 9668, 128, 4, 14_903, 1111, 129_739, 2639,
    35, 1712, 54_595, 10, 303, 720, 6, 84_161, 23, 15, 22_974, 83, 4068)
# C1..C26: share of rows where the field is empty
CAT_MISSING: tuple[float, ...] = (
    0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0,
    0.0, 0.0, 0.03, 0.0, 0.0, 0.3, 0.3, 0.03, 0.25, 0.0, 0.03, 0.3, 0.3)
# I1..I13: (mu, sigma, missing rate) of floor(exp(mu + sigma * z))
INT_FIELDS: tuple[tuple[float, float, float], ...] = (
    (0.5, 1.2, 0.30), (2.0, 1.8, 0.0), (1.8, 1.3, 0.10), (1.2, 1.0, 0.15), (7.5, 2.0, 0.02),
    (3.0, 1.6, 0.20), (1.5, 1.4, 0.04), (2.3, 1.0, 0.0), (3.8, 1.4, 0.04), (0.1, 0.6, 0.30),
    (1.0, 1.0, 0.04), (-0.5, 1.0, 0.30), (1.8, 1.2, 0.15))
I2_NEGATIVE_RATE = 0.05  # share of rows where I2 is -1

# the planted terms, by field name
FIRST_ORDER = ("C1", "C3", "C6", "C9", "C14", "C17", "C23", "C26")
DENSE = ("I1", "I3", "I6", "I11")
DENSE_BETAS = (1.0, -0.8, 0.7, 0.9)  # relative weights of DENSE (times dense_scale)
PAIRS = (("C1", "C8"), ("C5", "C14"), ("C6", "C11"), ("C9", "C13"), ("C17", "C18"),
         ("C2", "C23"))
TRIPLES = (("C6", "C14", "C22"), ("C9", "C17", "C20"), ("C8", "C15", "C25"))
DENSE_CROSS = ("I7", "C17")

# Generator purposes: each part of the world draws from its own stream
_WORLD, _BIAS, _ROWS = 1, 2, 3
# byte value -> its 2 lowercase hex digits
_BYTE_HEX = np.frombuffer(b"".join(b"%02x" % i for i in range(256)), dtype=np.uint8).reshape(256, 2)


@dataclass(frozen=True)
class CriteoWorldConfig:
    """What a Criteo-format world is made from; the output is a pure function of these values.

    The default scales give, at 500_000 rows, an oracle test AUC near 0.80 and a first-order-only
    oracle (no cross terms) about 0.07 lower (0.806 and 0.733 for seed 0).

    Args:
        rows: lines of ``train.txt``.
        seed: seeds the world's tables and the rows.
        ctr: target mean click probability (the bias is solved for it).
        k: latent dimension of the planted crosses.
        first_order_scale: standard deviation of each first-order term.
        pair_scale: standard deviation of each 2nd-order cross term.
        triple_scale: standard deviation of each 3rd-order cross term.
        dense_scale: scale of the integer fields' main effects (times DENSE_BETAS).
        dense_cross_scale: standard deviation of the integer x categorical cross.
        zipf_exponent: power-law exponent of the id distributions.
        chunk_rows: rows generated and written at a time (memory only; not the output).
        valid_fraction: share of rows before the test rows that the adapter makes valid.
        test_fraction: share of the last rows that the adapter makes test.

    Example:
        >>> CriteoWorldConfig(rows=60_000, seed=3).ctr
        0.25
        >>> CriteoWorldConfig(ctr=1.5)  # ValueError: ctr must be in (0, 1), got 1.5
    """

    rows: int = 500_000
    seed: int = 0
    ctr: float = 0.25
    k: int = 4
    first_order_scale: float = 0.35
    pair_scale: float = 0.3
    triple_scale: float = 0.3
    dense_scale: float = 0.3
    dense_cross_scale: float = 0.3
    zipf_exponent: float = 1.1
    chunk_rows: int = 100_000
    valid_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("rows", "seed", "k", "chunk_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name, low in (("rows", 1), ("seed", 0), ("k", 1), ("chunk_rows", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("ctr", "first_order_scale", "pair_scale", "triple_scale", "dense_scale",
                     "dense_cross_scale", "zipf_exponent", "valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 < self.ctr < 1:
            raise ValueError(f"ctr must be in (0, 1), got {self.ctr}")
        for name in ("first_order_scale", "pair_scale", "triple_scale", "dense_scale",
                     "dense_cross_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.zipf_exponent <= 0:
            raise ValueError(f"zipf_exponent must be > 0, got {self.zipf_exponent}")
        for name in ("valid_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("valid_fraction + test_fraction must be < 1 (train needs rows), got "
                             f"{self.valid_fraction} + {self.test_fraction}")


@dataclass(frozen=True, eq=False)
class WorldRows:
    """Generated rows as arrays, with their true logits.

    ``ints`` holds 0 where ``int_present`` is False (an empty field in the TSV); ``cats`` holds
    the id rank (0 = the most frequent id) or -1 for a missing value.

    Example:
        >>> rows = generate_rows(CriteoWorldConfig(rows=100), 0, 100)
        >>> rows.labels.shape, rows.ints.shape, rows.cats.shape
        ((100,), (100, 13), (100, 26))
    """

    labels: np.ndarray  # int8 (n,), 0/1
    logits: np.ndarray  # float64 (n,), the true logit
    first_order_logits: np.ndarray  # float64 (n,), the logit without the cross terms
    ints: np.ndarray  # int64 (n, 13)
    int_present: np.ndarray  # bool (n, 13)
    cats: np.ndarray  # int64 (n, 26), -1 missing

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, start: int, stop: int) -> WorldRows:
        """Rows ``start:stop`` of these."""
        return WorldRows(*(getattr(self, f)[start:stop] for f in _ROW_FIELDS))

    @staticmethod
    def concat(parts: list[WorldRows]) -> WorldRows:
        """The rows of ``parts``, in order."""
        if len(parts) == 1:
            return parts[0]
        if not parts:  # no rows: empty arrays of the right types and widths
            return WorldRows(np.zeros(0, np.int8), np.zeros(0), np.zeros(0),
                             np.zeros((0, len(INT_NAMES)), np.int64),
                             np.zeros((0, len(INT_NAMES)), bool),
                             np.zeros((0, len(CAT_NAMES)), np.int64))
        return WorldRows(*(np.concatenate([getattr(p, f) for p in parts]) for f in _ROW_FIELDS))


_ROW_FIELDS = ("labels", "logits", "first_order_logits", "ints", "int_present", "cats")


@dataclass(frozen=True, eq=False)
class World:
    """The parameters of a world: id distributions, planted weights and tables, the bias.

    Field references are indices: categorical j is ``C{j+1}``, integer j is ``I{j+1}``. Every
    table is indexed by id rank. :meth:`logits` is the oracle; a test can recompute it by hand
    from these attributes.

    Example:
        >>> world = World.from_config(CriteoWorldConfig())
        >>> [f"C{a + 1}" for a in world.pairs[0]]
        ['C1', 'C8']
        >>> world.pair_tables[0][0].shape  # u of C1: (cardinality, k)
        (197, 4)
    """

    config: CriteoWorldConfig
    id_cdfs: tuple[np.ndarray, ...]  # per categorical field: the cumulative id distribution
    id_guides: tuple[np.ndarray, ...]  # per field: the guide table of its cdf (_inverse_cdf)
    first_order: dict[int, np.ndarray]  # categorical field -> weights (cardinality,)
    dense_fields: tuple[int, ...]  # integer fields with a main effect
    dense_betas: np.ndarray  # their weights (without dense_scale)
    int_moments: np.ndarray  # (13, 2): mean and deviation of log1p(max(x, 0)) of present values
    pairs: tuple[tuple[int, int], ...]
    pair_tables: tuple[tuple[np.ndarray, np.ndarray], ...]  # (u_a, v_b), each (cardinality, k)
    triples: tuple[tuple[int, int, int], ...]
    triple_tables: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]
    dense_cross: tuple[int, int]  # (integer field, categorical field)
    dense_cross_table: np.ndarray  # (cardinality of the categorical field,)
    bias: float = 0.0
    # per categorical field, the 8 hex digits written for each id, as one uint64 per id (a
    # lookup per value instead of formatting it)
    hex_text: tuple[np.ndarray, ...] = field(default=(), repr=False)

    @classmethod
    def from_config(cls, cfg: CriteoWorldConfig) -> World:
        """Draw the world's tables from (seed, world) and solve its bias for ``cfg.ctr``.

        Example:
            >>> round(World.from_config(CriteoWorldConfig()).bias, 2)  # sets the ctr to 0.25
            -1.48
        """
        rng = np.random.default_rng([cfg.seed, _WORLD])
        probs = [_zipf(n, cfg.zipf_exponent) for n in CARDINALITIES]
        cdfs = tuple(np.cumsum(p) for p in probs)
        cat = {name: j for j, name in enumerate(CAT_NAMES)}
        num = {name: j for j, name in enumerate(INT_NAMES)}

        def table(j: int, width: int | None) -> np.ndarray:
            shape = (CARDINALITIES[j],) if width is None else (CARDINALITIES[j], width)
            return _standardize(rng.standard_normal(shape), probs[j], width or 1)

        first_order = {cat[f]: table(cat[f], None) for f in FIRST_ORDER}
        pairs = tuple((cat[a], cat[b]) for a, b in PAIRS)
        pair_tables = tuple((table(a, cfg.k), table(b, cfg.k)) for a, b in pairs)
        triples = tuple((cat[a], cat[b], cat[c]) for a, b, c in TRIPLES)
        triple_tables = tuple((table(a, cfg.k), table(b, cfg.k), table(c, cfg.k))
                              for a, b, c in triples)
        dense_cross = (num[DENSE_CROSS[0]], cat[DENSE_CROSS[1]])
        world = cls(config=cfg, id_cdfs=cdfs, id_guides=tuple(_guide(c) for c in cdfs),
                    first_order=first_order,
                    dense_fields=tuple(num[f] for f in DENSE),
                    dense_betas=np.array(DENSE_BETAS, dtype=np.float64),
                    int_moments=np.array([_log_moments(mu, s) for mu, s, _ in INT_FIELDS]),
                    pairs=pairs, pair_tables=pair_tables, triples=triples,
                    triple_tables=triple_tables, dense_cross=dense_cross,
                    dense_cross_table=table(dense_cross[1], None))
        sample = world._block(np.random.default_rng([cfg.seed, _BIAS]), BIAS_SAMPLE_ROWS)
        object.__setattr__(world, "bias", _solve_bias(sample.logits, cfg.ctr))
        object.__setattr__(world, "hex_text", tuple(
            _BYTE_HEX[world.hex_codes(j, np.arange(n)).astype(">u4").view(np.uint8)]
            .reshape(n, 8).view(np.uint64).ravel() for j, n in enumerate(CARDINALITIES)))
        return world

    def dense_z(self, ints: np.ndarray, present: np.ndarray) -> np.ndarray:
        """(n, 13) standardised log1p(max(x, 0)) of the integer fields; 0 where missing.

        Example:
            >>> world.dense_z(rows.ints, rows.int_present).mean(axis=0)  # about 0
        """
        logs = np.log1p(np.maximum(ints, 0).astype(np.float64))
        z = (logs - self.int_moments[:, 0]) / self.int_moments[:, 1]
        return np.where(present, z, 0.0)

    def logits(self, ints: np.ndarray, present: np.ndarray, cats: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        """The true logit of each row and its first-order part (bias + first-order + dense main
        effects: the logit without the 2nd/3rd-order and integer x categorical terms).

        Example:
            >>> full, first = world.logits(rows.ints, rows.int_present, rows.cats)
        """
        cfg = self.config
        n = len(cats)
        z = self.dense_z(ints, present)
        first = np.full(n, self.bias)
        for j, w in self.first_order.items():
            first += cfg.first_order_scale * _lookup(w, cats[:, j])
        first += cfg.dense_scale * (z[:, list(self.dense_fields)] @ self.dense_betas)
        cross = np.zeros(n)
        for (a, b), (u, v) in zip(self.pairs, self.pair_tables, strict=True):
            prod = _lookup(u, cats[:, a]) * _lookup(v, cats[:, b])
            cross += cfg.pair_scale * math.sqrt(cfg.k) * prod.sum(axis=1)
        for (a, b, c), (u, v, w) in zip(self.triples, self.triple_tables, strict=True):
            prod = _lookup(u, cats[:, a]) * _lookup(v, cats[:, b]) * _lookup(w, cats[:, c])
            cross += cfg.triple_scale * cfg.k * prod.sum(axis=1)
        i, c = self.dense_cross
        cross += cfg.dense_cross_scale * z[:, i] * _lookup(self.dense_cross_table, cats[:, c])
        return first + cross, first

    def hex_codes(self, j: int, ids: np.ndarray) -> np.ndarray:
        """The 32-bit values written (as 8 hex digits) for ids of categorical field ``j``: a
        bijective mix of (id, j), so distinct ids never share a value and hashing them modulo a
        table size spreads the head ids like real hashed values. Missing ids (-1) give 0.

        Example:
            >>> f"{world.hex_codes(0, np.array([0]))[0]:08x}"  # C1's most frequent id
        """
        ids = np.asarray(ids, dtype=np.int64)
        h = (ids.astype(np.uint64) + np.uint64(0x9E3779B9 * (j + 1))) & np.uint64(0xFFFFFFFF)
        h = h.astype(np.uint32)
        # the murmur3 32-bit finaliser: each step is invertible, so the whole mix is a bijection
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
        return np.where(ids >= 0, h, np.uint32(0))

    def block(self, b: int) -> WorldRows:
        """Rows ``b * BLOCK_ROWS`` to ``(b + 1) * BLOCK_ROWS`` of the world (seeded by block)."""
        return self._block(np.random.default_rng([self.config.seed, _ROWS, b]), BLOCK_ROWS)

    def _block(self, rng: np.random.Generator, n: int) -> WorldRows:
        # one fixed order of draws per block: categorical ids, their missingness, integers,
        # their missingness, I2's negatives, labels
        u_ids = rng.random((n, len(CAT_NAMES)))
        u_cat_missing = rng.random((n, len(CAT_NAMES)))
        normal = rng.standard_normal((n, len(INT_NAMES)))
        u_int_missing = rng.random((n, len(INT_NAMES)))
        u_negative = rng.random(n)
        u_label = rng.random(n)
        cats = np.empty((n, len(CAT_NAMES)), dtype=np.int64)
        for j, cdf in enumerate(self.id_cdfs):
            ids = _inverse_cdf(cdf, self.id_guides[j], u_ids[:, j])
            cats[:, j] = np.where(u_cat_missing[:, j] < CAT_MISSING[j], -1, ids)
        mu = np.array([f[0] for f in INT_FIELDS])
        sigma = np.array([f[1] for f in INT_FIELDS])
        ints = np.floor(np.exp(mu + sigma * normal)).astype(np.int64)
        ints[:, 1] = np.where(u_negative < I2_NEGATIVE_RATE, -1, ints[:, 1])
        present = u_int_missing >= np.array([f[2] for f in INT_FIELDS])
        ints = np.where(present, ints, 0)
        logits, first = self.logits(ints, present, cats)
        labels = (u_label < _sigmoid(logits)).astype(np.int8)
        return WorldRows(labels, logits, first, ints, present, cats)

    def iter_rows(self, start: int, stop: int, chunk_rows: int) -> Iterator[WorldRows]:
        """Rows ``start:stop`` in chunks of ``chunk_rows`` (the last may be shorter).

        Example:
            >>> sum(len(p) for p in world.iter_rows(0, 10_000, 3000))
            10000
        """
        for pieces in self.iter_pieces(start, stop, chunk_rows):
            yield WorldRows.concat(pieces)

    def iter_pieces(self, start: int, stop: int, chunk_rows: int) -> Iterator[list[WorldRows]]:
        """Rows ``start:stop`` in chunks of ``chunk_rows``, each chunk as the list of its slices
        of the fixed blocks: views, nothing copied, and every block generated once however the
        chunks fall across blocks.

        Example:
            >>> [[len(p) for p in chunk] for chunk in world.iter_pieces(8000, 9000, 600)]
            [[192, 408], [400]]
        """
        if not 0 <= start <= stop:
            raise ValueError(f"rows {start}:{stop}: need 0 <= start <= stop")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        current, current_block = None, -1
        for lo in range(start, stop, chunk_rows):
            hi = min(lo + chunk_rows, stop)
            pieces = []
            pos = lo
            while pos < hi:
                b = pos // BLOCK_ROWS
                if b != current_block:
                    current, current_block = self.block(b), b
                base = b * BLOCK_ROWS
                end = min(hi, base + BLOCK_ROWS)
                pieces.append(current.take(pos - base, end - base))
                pos = end
            yield pieces


def generate_rows(cfg: CriteoWorldConfig | World, start: int, stop: int) -> WorldRows:
    """Rows ``start:stop`` of the world as arrays, without writing anything: exactly the rows of
    lines ``start + 1 .. stop`` of the ``train.txt`` that :func:`write_criteo_world` writes.

    Pass a :class:`World` to skip rebuilding its tables on repeated calls.

    Example:
        >>> rows = generate_rows(CriteoWorldConfig(rows=1000), 990, 1000)
        >>> len(rows), rows.cats[0, 8] >= -1
        (10, True)
    """
    world = cfg if isinstance(cfg, World) else World.from_config(cfg)
    return WorldRows.concat([piece for chunk in world.iter_pieces(start, stop, max(stop - start, 1))
                             for piece in chunk])


# ---- helpers -------------------------------------------------------------------------------------

def _zipf(n: int, exponent: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return p / p.sum()


def _guide(cdf: np.ndarray) -> np.ndarray:
    """guide[g] = the number of cdf values <= g / GUIDE_BINS, for g = 0..GUIDE_BINS."""
    edges = np.arange(GUIDE_BINS + 1, dtype=np.float64) / GUIDE_BINS
    return np.searchsorted(cdf, edges, side="right").astype(np.int32)


def _inverse_cdf(cdf: np.ndarray, guide: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Ids with P(id = r) = cdf[r] - cdf[r - 1] from uniforms ``u``: exactly
    ``searchsorted(cdf, u, side="right")`` (clipped to the last id), 2-5x faster.

    u in [g/G, (g+1)/G) (g exact: G is a power of two) has its id in [guide[g], guide[g+1]]; where
    those are equal (most draws: the head ids span whole bins) the guide is the answer, and only
    the rest are searched."""
    g = (u * GUIDE_BINS).astype(np.intp)
    ids = guide[g].astype(np.int64)
    ambiguous = ids != guide[g + 1]
    ids[ambiguous] = np.searchsorted(cdf, u[ambiguous], side="right")
    return np.minimum(ids, len(cdf) - 1)  # (rounding can leave cdf[-1] a hair below 1)


def _standardize(table: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """Centre ``table`` under the id distribution ``probs`` and scale each column to variance
    1/k: cross terms then have no marginal (first-order) effect, and each term's spread is set by
    its scale alone, not by which ids happened to be drawn as heads."""
    mean = probs @ table
    centred = table - mean
    std = np.sqrt(probs @ (centred * centred))
    return centred / np.maximum(std, 1e-12) / math.sqrt(k)


def _lookup(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``table[ids]`` with 0 for a missing id (-1)."""
    values = table[np.maximum(ids, 0)]  # a fresh copy, so zeroing it in place is safe
    values[ids < 0] = 0.0
    return values


def _log_moments(mu: float, sigma: float, points: int = 20_001) -> tuple[float, float]:
    """Mean and deviation (to about 1e-4) of log1p(floor(exp(mu + sigma * z))), z ~ N(0, 1), by
    quadrature, so the standardisation does not depend on a random sample."""
    z = np.linspace(-9.0, 9.0, points)
    w = np.exp(-0.5 * z * z)
    w /= w.sum()
    v = np.log1p(np.floor(np.exp(mu + sigma * z)))
    mean = float(w @ v)
    return mean, float(np.sqrt(w @ (v - mean) ** 2))


def _solve_bias(logits: np.ndarray, ctr: float) -> float:
    """The b with mean(sigmoid(b + logits)) = ctr (bisection: the mean is increasing in b)."""
    lo, hi = -50.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _sigmoid(mid + logits).mean() < ctr:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x)))  # no overflow warnings for large |x|
