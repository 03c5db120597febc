"""Vocabularies: how the raw values of an id column (user, item, category strings or integers)
become the integer ids a dataset stores, and back.

Two kinds, recorded per column in ``dataset.json`` ``vocabularies`` (:class:`VocabInfo`):

* ``vocab``: the values seen at least ``min_count`` times in the train split, most frequent first
  (ties by value), stored in ``vocab/<column>.parquet`` (one column ``value``). The id of
  ``values[i]`` is ``i + 1``; id 0 is unknown, rare or missing.
* ``hash``: ``stable_hash(value) % hash_buckets``; nothing is stored. Missing values get id 0.

Serving, warm starts and ``recsys predict`` map raw values with :meth:`Vocabulary.ids` exactly as
the preparation did. :class:`VocabularyBuilder` counts values block by block, so a vocabulary is
built from a table of any size with memory proportional to its distinct values only.

Example:
    >>> b = VocabularyBuilder("city", min_count=2)
    >>> b.update(pa.array(["paris", "rome", "paris", None, "oslo", "rome", "paris"]))
    >>> v = b.finish()
    >>> v.values.to_pylist(), v.ids(["rome", "oslo", None]).tolist()
    (['paris', 'rome'], [2, 0, 0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pyarrow.types as pat

from recsys.data.schema import DatasetManifest, VocabInfo, VocabKind
from recsys.errors import DataError

VOCAB_DIR = "vocab"
STRING, INT64 = "string", "int64"  # VocabInfo.value_type
# the polynomial hash of stable_hash: an odd multiplier (FNV-1's 64-bit prime) and its inverse
# modulo 2^64, so that a string's hash is a difference of running sums over a whole buffer
_P = 0x100000001B3
_P_INV = pow(_P, -1, 1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15  # mixes the length in (2^64 / golden ratio)
_FMIX = (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53)  # MurmurHash3's 64-bit finaliser
_HASH_CHUNK_BYTES = 1 << 20  # bytes hashed at once: bounds the power tables' memory (8 B/byte)
_MERGE_MIN = 1 << 16  # pending distinct values a counter collects before it merges them
# Vocabulary.ids uses pc.index_in (a hash table of the values, built per call) unless the
# vocabulary is this many times longer than the values to map; then a sorted lookup built once
_INDEX_IN_RATIO = 4


def stable_hash(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each raw value that is the same on every machine, process and version.

    Python's ``hash()`` is salted per process and pyarrow offers no stable scalar hash, so this
    one is written out in numpy (vectorised over the Arrow string buffer, no loop over rows):

    1. an integer is hashed as its decimal string (so ``42`` and ``"42"`` agree); strings as
       their UTF-8 bytes ``b_0 .. b_{L-1}``;
    2. ``poly = sum_i (b_i + 1) * P^(L-1-i) mod 2^64`` with ``P = 0x100000001B3``;
    3. ``h = fmix64(poly + (L + 1) * 0x9E3779B97F4A7C15 mod 2^64)``, with MurmurHash3's
       64-bit finaliser ``fmix64(x)``: ``x ^= x >> 33; x *= 0xFF51AFD7ED558CCD;
       x ^= x >> 33; x *= 0xC4CEB9FE1A85EC53; x ^= x >> 33``, so that every output bit depends
       on every byte.

    A null's hash is 0. Returns a ``uint64`` array as long as ``values``.

    Example:
        >>> stable_hash(pa.array(["42", None])).tolist() == [stable_hash(pa.array([42]))[0], 0]
        True
    """
    arr = _combine(values)
    if pat.is_dictionary(arr.type):  # hash each distinct value once
        return _by_dictionary(arr, stable_hash(arr.dictionary), np.uint64(0))
    arr = _as_strings(arr)
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=n + 1,
                            offset=arr.offset * 4).astype(np.int64)
    if offsets[-1] - offsets[0] > _HASH_CHUNK_BYTES and n > 1:
        half = n // 2
        return np.concatenate([stable_hash(arr.slice(0, half)), stable_hash(arr.slice(half))])
    data = arr.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    raw = raw[offsets[0]:offsets[-1]]
    starts, ends = offsets[:-1] - offsets[0], offsets[1:] - offsets[0]
    with np.errstate(over="ignore"):  # all arithmetic is modulo 2^64 on purpose
        inv_pow = _powers(_P_INV, len(raw))  # P^-j: byte j's weight before the shift
        running = np.zeros(len(raw) + 1, dtype=np.uint64)
        np.cumsum((raw.astype(np.uint64) + np.uint64(1)) * inv_pow, dtype=np.uint64,
                  out=running[1:])
        # sum_j (b_j + 1) P^-j over the string, times P^(end-1): each byte's weight P^(end-1-j)
        shift = _powers(_P, max(int(ends.max(initial=0)), 1))[np.maximum(ends - 1, 0)]
        poly = (running[ends] - running[starts]) * shift
        h = _fmix64(poly + (ends - starts + 1).astype(np.uint64) * np.uint64(_GOLDEN))
    if arr.null_count:
        h[~np.asarray(arr.is_valid())] = 0
    return h


def _by_dictionary(arr: pa.DictionaryArray, per_value: np.ndarray,
                   missing: np.generic) -> np.ndarray:
    """``per_value[i]`` for each entry of a dictionary array that holds value ``i``;
    ``missing`` for a null."""
    indices = arr.indices
    out = per_value[indices.fill_null(0).to_numpy()] if len(per_value) else \
        np.full(len(arr), missing, dtype=per_value.dtype)
    if arr.null_count:
        out[~np.asarray(arr.is_valid())] = missing
    return out


_POWERS: dict[int, np.ndarray] = {}  # base -> its read-only table of one chunk's powers


def _powers(base: int, n: int) -> np.ndarray:
    """``base^0 .. base^(n-1)`` modulo 2^64: a prefix of one table per base (8 MiB), computed
    at its first use. Recomputing it for every chunk hashed cost 7-15% of ``prepare table``."""
    if n > _HASH_CHUNK_BYTES + 1:  # one string longer than a chunk: computed, not kept
        return _power_table(base, n)
    table = _POWERS.get(base)
    if table is None:
        table = _power_table(base, _HASH_CHUNK_BYTES + 1)
        table.flags.writeable = False
        _POWERS[base] = table
    return table[:n]


def _power_table(base: int, n: int) -> np.ndarray:
    out = np.full(n, base, dtype=np.uint64)
    if n:
        out[0] = 1
    with np.errstate(over="ignore"):
        return np.cumprod(out, dtype=np.uint64)


def mix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser of each ``uint64`` (a bijection whose every output bit
    depends on every input bit): a counter-based random number, the same on every machine.

    Example:
        >>> mix64(np.arange(2, dtype=np.uint64)).tolist()[0]
        0
    """
    return _fmix64(np.asarray(x, dtype=np.uint64))


def _fmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(_FMIX[0])
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(_FMIX[1])
        return x ^ (x >> np.uint64(33))


def _combine(values: pa.Array | pa.ChunkedArray | Sequence[object]) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    return pa.array(list(values))


def _as_strings(arr: pa.Array) -> pa.Array:
    """``arr`` as a (non-large) string array: integers in decimal, dictionaries decoded."""
    if pat.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pat.is_string(arr.type):
        return arr
    if pat.is_integer(arr.type) or pat.is_large_string(arr.type) or pat.is_null(arr.type):
        return pc.cast(arr, pa.string())
    raise TypeError(f"cannot hash values of type {arr.type}; id values are strings or integers")


def value_type_of(typ: pa.DataType) -> str:
    """The :attr:`VocabInfo.value_type` of raw ids of Arrow type ``typ``.

    Example:
        >>> value_type_of(pa.int32()), value_type_of(pa.large_string())
        ('int64', 'string')
    """
    if pat.is_dictionary(typ):
        typ = typ.value_type
    if pat.is_integer(typ):
        return INT64
    if pat.is_string(typ) or pat.is_large_string(typ) or pat.is_null(typ):
        return STRING
    raise TypeError(f"id values must be strings or integers, not {typ}")


def _arrow_type(value_type: str) -> pa.DataType:
    return pa.int64() if value_type == INT64 else pa.string()


@dataclass
class Vocabulary:
    """The mapping of one id column's raw values to ids (see the module docstring).

    ``values`` holds the raw values of a ``vocab`` column (the id of ``values[i]`` is ``i + 1``)
    and is None for a ``hash`` column.

    Example:
        >>> v = Vocabulary("item_id", VocabInfo(kind="vocab", size=3, value_type="int64"),
        ...                pa.array([17, 5]))
        >>> v.ids([5, 17, 99]).tolist(), v.raw_of([2, 0])
        ([2, 1, 0], [5, None])
    """

    column: str
    info: VocabInfo
    values: pa.Array | None = None

    def __post_init__(self) -> None:
        if self.info.kind == VocabKind.VOCAB:
            if self.values is None:
                raise ValueError(f"vocabulary '{self.column}' of kind vocab needs its values")
            if len(self.values) + 1 != self.info.size:
                raise ValueError(f"vocabulary '{self.column}' has {len(self.values)} values but "
                                 f"size {self.info.size} (expected values + 1)")
        elif not self.info.hash_buckets:
            raise ValueError(f"hashed column '{self.column}' needs hash_buckets")
        self._lookups: dict[bool, _SortedLookup] = {}

    def ids(self, raw: pa.Array | pa.ChunkedArray | Sequence[object]) -> np.ndarray:
        """int64 ids of the raw values ``raw`` (a flat array: strings or integers); a null, or a
        value not in the vocabulary, is 0.

        Example:
            >>> vocab.ids(pa.array(["paris", None, "atlantis"])).tolist()
            [1, 0, 0]
        """
        arr = _combine(raw)
        if pat.is_dictionary(arr.type):  # map each distinct value once
            return _by_dictionary(arr, self.ids(arr.dictionary), np.int64(0))
        if self.info.kind == VocabKind.HASH:
            buckets = np.uint64(self.info.hash_buckets)  # type: ignore[arg-type]
            return (stable_hash(arr) % buckets).astype(np.int64)
        assert self.values is not None
        ints = pat.is_integer(arr.type) and pat.is_integer(self.values.type)
        if not ints:  # integers meet strings as their decimal strings (42 finds "42")
            arr = _as_strings(arr)
        if len(self.values) <= _INDEX_IN_RATIO * len(arr):
            # index_in builds a hash table of the values on every call: cheap next to the probes
            values = self.values if ints else self._lookup(False).values
            found = pc.index_in(arr, value_set=values)
            return pc.add(found, 1).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        return self._lookup(ints).ids(arr)

    def _lookup(self, ints: bool) -> _SortedLookup:
        """The sorted keys of the values (built once), for lookups that must not pay for a hash
        table of a large vocabulary on every call."""
        assert self.values is not None
        if ints not in self._lookups:
            values = self.values if ints else _as_strings(self.values)
            self._lookups[ints] = _SortedLookup(values, ints)
        return self._lookups[ints]

    def raw_of(self, ids: Sequence[int] | np.ndarray) -> list[object]:
        """The raw value of each id (None for id 0); the inverse of :meth:`ids` on the values
        the vocabulary holds. A hashed column cannot be inverted (a ValueError).

        Example:
            >>> vocab.raw_of([1, 0])
            ['paris', None]
        """
        if self.info.kind == VocabKind.HASH:
            raise ValueError(f"column '{self.column}' is hashed into {self.info.hash_buckets} "
                             "buckets: its ids cannot be mapped back to raw values")
        assert self.values is not None
        idx = np.asarray(ids, dtype=np.int64)
        bad = (idx < 0) | (idx >= self.info.size)
        if bad.any():
            raise ValueError(f"column '{self.column}': id {int(idx[np.argmax(bad)])} is outside "
                             f"[0, {self.info.size})")
        taken = self.values.take(pa.array(np.maximum(idx - 1, 0))).to_pylist()
        return [None if i == 0 else v for i, v in zip(idx.tolist(), taken, strict=True)]

    def save(self, dataset_dir: str | Path) -> None:
        """Write ``vocab/<column>.parquet`` (one column ``value``) under ``dataset_dir``,
        atomically; a hashed column has nothing to write.

        Example:
            >>> vocab.save("data/mytable.partial")  # -> data/mytable.partial/vocab/city.parquet
        """
        if self.info.kind == VocabKind.HASH:
            return
        assert self.values is not None and self.info.file is not None
        path = Path(dataset_dir) / self.info.file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.table({"value": self.values}), tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, dataset_dir: str | Path, column: str, info: VocabInfo) -> Vocabulary:
        """Read a column's vocabulary back; a missing or inconsistent file is a DataError
        naming it.

        Example:
            >>> v = Vocabulary.load("data/mytable", "city", manifest.vocabularies["city"])
        """
        if info.kind == VocabKind.HASH:
            return cls(column, info, None)
        if info.file is None:
            raise DataError(f"{dataset_dir}/dataset.json", f"vocabularies[{column}] of kind "
                            "vocab names no file")
        path = Path(dataset_dir) / info.file
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(str(path), f"cannot read the vocabulary of '{column}': {e}") from None
        if table.column_names != ["value"] or len(table) + 1 != info.size:
            raise DataError(str(path), f"expected one column 'value' with {info.size - 1} rows "
                            f"(dataset.json vocabularies[{column}].size = {info.size}), found "
                            f"columns {table.column_names} with {len(table)} rows")
        values = table.column("value").combine_chunks().cast(_arrow_type(info.value_type))
        return cls(column, info, values)


def load_vocabularies(dataset_dir: str | Path, manifest: DatasetManifest) -> dict[str, Vocabulary]:
    """Every vocabulary ``dataset.json`` lists, by column.

    Example:
        >>> vocabs = load_vocabularies(Path("data/mytable"), manifest)
        >>> vocabs["user_id"].ids(["u17"])
        array([4])
    """
    return {col: Vocabulary.load(dataset_dir, col, info)
            for col, info in manifest.vocabularies.items()}


class _SortedLookup:
    """Raw value -> 1 + its position in ``values``, by binary search over sorted keys: the
    integers themselves, or the strings' :func:`stable_hash` (a match is then confirmed by
    comparing the strings, so a 64-bit collision cannot map a value to another's id)."""

    def __init__(self, values: pa.Array, ints: bool) -> None:
        self.values = values
        self.ints = ints
        keys = values.to_numpy(zero_copy_only=False) if ints else stable_hash(values)
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]
        # two strings of the vocabulary with one hash: the binary search could find either
        self.exact = ints or len(self.keys) < 2 or bool((self.keys[1:] != self.keys[:-1]).all())

    def ids(self, raw: pa.Array) -> np.ndarray:
        if not self.exact:
            found = pc.index_in(raw, value_set=self.values)
            return pc.add(found, 1).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        valid = np.asarray(raw.is_valid()) if raw.null_count else np.ones(len(raw), dtype=bool)
        keys = raw.fill_null(0).to_numpy() if self.ints else stable_hash(raw)
        pos = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        if not len(self.keys):
            return np.zeros(len(raw), dtype=np.int64)
        hit = valid & (self.keys[pos] == keys)
        where = self.order[pos]
        if not self.ints and hit.any():
            idx = np.flatnonzero(hit)
            same = pc.equal(self.values.take(pa.array(where[idx])), raw.take(pa.array(idx)))
            hit[idx] = np.asarray(same.fill_null(False))
        return np.where(hit, where + 1, 0).astype(np.int64)


class ValueCounter:
    """Counts the values of a stream of arrays (any type pyarrow can group by), merging per
    block counts with Arrow's group-by once the pending blocks hold as many distinct values as
    the merged counts: amortised O(1) per distinct value of a block. Nulls are not counted.

    Example:
        >>> c = ValueCounter()
        >>> c.update(pa.array([3, 1, 3])); c.update(pa.array([1, None]))
        >>> c.counts().sort_by("value").to_pydict()
        {'value': [1, 3], 'count': [2, 2]}
    """

    def __init__(self) -> None:
        self.total = 0  # non-null values counted
        self.type: pa.DataType | None = None
        self._merged: pa.Table | None = None  # columns value, count (distinct values)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def update(self, values: pa.Array | pa.ChunkedArray) -> None:
        arr = _combine(values)
        if len(arr) == arr.null_count:
            return
        counts = pc.value_counts(arr.drop_null())
        self.add(counts.field("values"), counts.field("counts"))

    def add(self, values: pa.Array, counts: pa.Array | np.ndarray) -> None:
        """Add counts already made: ``counts[i]`` more of the (distinct) ``values[i]``."""
        if self.type is None:
            self.type = values.type
        elif values.type != self.type:
            values = values.cast(self.type)
        table = pa.table({"value": values, "count": pa.array(counts).cast(pa.int64())})
        self.total += int(pc.sum(table.column("count")).as_py() or 0)
        self._pending.append(table)
        self._pending_rows += len(table)
        if self._pending_rows >= max(_MERGE_MIN, len(self._merged or [])):
            self._merge()

    def _merge(self) -> None:
        parts = ([self._merged] if self._merged is not None else []) + self._pending
        self._pending, self._pending_rows = [], 0
        if len(parts) == 1:
            self._merged = parts[0]
        elif parts:
            self._merged = pa.concat_tables(parts).group_by("value").aggregate(
                [("count", "sum")]).rename_columns(["value", "count"])

    def counts(self, empty_type: pa.DataType | None = None) -> pa.Table:
        """Every distinct value counted so far and its count (columns ``value``, ``count``);
        with none counted, an empty table of type ``empty_type`` (default string)."""
        self._merge()
        if self._merged is None:
            return pa.table({"value": pa.array([], self.type or empty_type or pa.string()),
                             "count": pa.array([], pa.int64())})
        return self._merged


class VocabularyBuilder:
    """Counts the raw values of one column block by block (:class:`ValueCounter`: pyarrow's
    ``value_counts`` per block, merged with its group-by), then keeps the frequent ones. Nulls
    are not counted.

    Example:
        >>> b = VocabularyBuilder("user_id", min_count=1)
        >>> for block in blocks: b.update(block.column("user"))
        >>> vocab = b.finish()
    """

    def __init__(self, column: str, min_count: int = 1) -> None:
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.column = column
        self.min_count = min_count
        self.value_type: str | None = None
        self.counter = ValueCounter()

    def update(self, values: pa.Array | pa.ChunkedArray) -> None:
        """Count the non-null values of one block (a list array counts its items)."""
        arr = _combine(values)
        if pat.is_list(arr.type) or pat.is_large_list(arr.type):
            arr = arr.flatten()
        if pat.is_null(arr.type):  # all missing, of no type yet: nothing to count
            return
        kind = value_type_of(arr.type)
        if self.value_type is None:
            self.value_type = kind
        elif kind != self.value_type:
            raise TypeError(f"column '{self.column}': values of type {arr.type} after values of "
                            f"type {self.value_type}")
        if pat.is_dictionary(arr.type):  # count the indices: no hashing of the values
            valid = arr.indices.drop_null().to_numpy()
            counts = np.bincount(valid, minlength=len(arr.dictionary))
            seen = np.flatnonzero(counts)
            self.counter.add(arr.dictionary.take(pa.array(seen)).cast(_arrow_type(kind)),
                             counts[seen])
        else:
            self.counter.update(arr.cast(_arrow_type(kind)))

    @property
    def total(self) -> int:
        """Non-null values counted so far."""
        return self.counter.total

    def counts(self) -> pa.Table:
        """Every value counted so far with its count (columns ``value``, ``count``)."""
        return self.counter.counts(_arrow_type(self.value_type or STRING))

    def finish(self) -> Vocabulary:
        """The vocabulary: the values counted at least ``min_count`` times, by descending count
        then ascending value (so the ids do not depend on the order the blocks came in)."""
        counts = self.counts()
        kept = counts.filter(pc.greater_equal(counts.column("count"), self.min_count))
        order = pc.sort_indices(kept, sort_keys=[("count", "descending"), ("value", "ascending")])
        values = kept.column("value").take(order).combine_chunks()
        info = VocabInfo(kind=VocabKind.VOCAB, size=len(values) + 1,
                         value_type=self.value_type or STRING,
                         file=f"{VOCAB_DIR}/{self.column}.parquet", min_count=self.min_count)
        return Vocabulary(self.column, info, values)


def hashed(column: str, hash_buckets: int, value_type: str) -> Vocabulary:
    """The vocabulary of a column hashed into ``hash_buckets`` ids.

    Example:
        >>> hashed("city", 1000, "string").ids(["paris"])
        array([...])
    """
    if hash_buckets < 1:
        raise ValueError(f"hash_buckets must be >= 1, got {hash_buckets}")
    info = VocabInfo(kind=VocabKind.HASH, size=hash_buckets, value_type=value_type,
                     hash_buckets=hash_buckets)
    return Vocabulary(column, info, None)
