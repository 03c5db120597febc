"""BatchBuilder against an independent per-row Python oracle, on hand-made Arrow tables."""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recsys.data.batch import Batch, BatchBuilder
from recsys.data.schema import BatchSchema, SparseColumn
from recsys.spec import OOVPolicy

# ---- a hand-made table: 6 rows -------------------------------------------------------------------

ROWS: dict[str, list[Any]] = {
    "uid": [3, None, 0, 9, 2, 5],  # single-valued, one null
    "hist": [[1, 2], [], None, [4], [0, 5, 6], [7, 7]],  # multi-valued: an empty and a null list
    "hist_w": [[0.5, 2.0], [], None, [1.5], [0.125, 0.25, 0.75], [3.0, -1.0]],
    "item": [5, 6, 1, 0, 11, 3],  # int32 ids
    "n_int": [1, 2, 3, 4, 5, -6],  # dense integers
    "n_float": [0.5, -1.0, 2.25, 0.0, 3.5, 1e-3],  # dense floats (float64 in the file)
    "click": [0, 1, 0, 1, 1, 0],  # int8
    "conv": [False, True, False, False, True, False],  # bool
    "rating": [0.0, 1.0, 0.5, 0.25, 1.0, 0.0],  # float32 label
    "request_id": [10, 10, 11, 11, 12, 12],
    "user_id": [3, 4, 0, 9, 2, 5],
    "stage": [0, 1, 3, 4, 5, 2],
    "teacher": [None, 0.25, None, -1.5, 2.0, 0.5],
    "click_prob": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
}

ARROW_TYPES = {
    "uid": pa.int64(), "hist": pa.list_(pa.int64()), "hist_w": pa.list_(pa.float32()),
    "item": pa.int32(), "n_int": pa.int64(), "n_float": pa.float64(), "click": pa.int8(),
    "conv": pa.bool_(), "rating": pa.float32(), "request_id": pa.int64(), "user_id": pa.int64(),
    "stage": pa.int8(), "teacher": pa.float32(), "click_prob": pa.float32(),
}


def make_table(rows: dict[str, list[Any]] = ROWS) -> pa.Table:
    return pa.table({k: pa.array(v, type=ARROW_TYPES[k]) for k, v in rows.items()})


def make_schema(weighted: bool = False, oov: OOVPolicy = OOVPolicy.ERROR) -> BatchSchema:
    return BatchSchema(
        dense=["n_int", "n_float"],
        sparse=[
            SparseColumn("user", "uid", 10, oov, multi=False),
            SparseColumn("history", "hist", 8, oov, multi=True,
                         weights="hist_w" if weighted else None),
            SparseColumn("item", "item", 12, oov, multi=False),
        ],
        labels=["click", "conv", "rating"],
        groups={"request": "request_id", "user": "user_id"},
        stage="stage",
        teacher="teacher",
        oracle={"click": "click_prob"},
    )


# ---- the oracle: one row at a time, plain Python --------------------------------------------------


def bag(value: Any, multi: bool) -> list[int]:
    if value is None:
        return []
    return list(value) if multi else [value]


def oracle_sparse(rows: dict[str, list[Any]], schema: BatchSchema) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    n = len(next(iter(rows.values())))
    for s in schema.sparse:
        per_row = []
        for i in range(n):
            ids = bag(rows[s.column][i], s.multi)
            if s.oov == OOVPolicy.HASH:
                ids = [x % s.num_embeddings for x in ids]  # Python's % is a floor modulo
            per_row.append(ids)
        out[s.key] = per_row
    return out


def flat_values_and_lengths(per_key: dict[str, list[list[int]]], keys: list[str]):
    values, lengths = [], []
    for k in keys:
        for ids in per_key[k]:
            values.extend(ids)
            lengths.append(len(ids))
    return values, lengths


# ---- tests ---------------------------------------------------------------------------------------


def test_sparse_matches_row_oracle():
    schema = make_schema()
    batch = BatchBuilder(schema).build(make_table())
    kjt = batch.sparse
    assert isinstance(kjt, KeyedJaggedTensor)
    assert kjt.keys() == ["user", "history", "item"]

    expected = oracle_sparse(ROWS, schema)
    assert expected["user"] == [[3], [], [0], [9], [2], [5]]  # the oracle itself, by hand
    assert expected["history"] == [[1, 2], [], [], [4], [0, 5, 6], [7, 7]]
    values, lengths = flat_values_and_lengths(expected, kjt.keys())

    assert kjt.values().dtype == torch.int64
    assert kjt.values().tolist() == values
    assert kjt.lengths().tolist() == lengths
    assert kjt.offsets().tolist() == [0, *np.cumsum(lengths).tolist()]
    assert kjt.stride() == 6
    assert kjt.weights_or_none() is None
    jagged = kjt.to_dict()
    assert list(jagged) == ["user", "history", "item"]
    for key in kjt.keys():  # noqa: SIM118 (a KJT is not a dict)
        assert [t.tolist() for t in jagged[key].to_dense()] == expected[key]
        assert jagged[key].lengths().tolist() == [len(x) for x in expected[key]]


def test_dense_labels_groups_stage_teacher_oracle():
    batch = BatchBuilder(make_schema()).build(make_table())
    assert batch.batch_size == 6

    assert batch.dense.dtype == torch.float32
    assert batch.dense.shape == (6, 2)
    expected_dense = [[float(a), float(np.float32(b))] for a, b in
                      zip(ROWS["n_int"], ROWS["n_float"], strict=True)]
    assert batch.dense.tolist() == expected_dense

    assert list(batch.labels) == ["click", "conv", "rating"]
    for name in ("click", "conv", "rating"):
        t = batch.labels[name]
        assert t.dtype == torch.float32
        assert t.tolist() == [float(x) for x in ROWS[name]]

    assert set(batch.groups) == {"request", "user"}
    assert batch.groups["request"].dtype == torch.int64
    assert batch.groups["request"].tolist() == ROWS["request_id"]
    assert batch.groups["user"].tolist() == ROWS["user_id"]
    assert batch.stage is not None and batch.stage.dtype == torch.int64
    assert batch.stage.tolist() == ROWS["stage"]

    assert batch.teacher is not None and batch.teacher.dtype == torch.float32
    for got, want in zip(batch.teacher.tolist(), ROWS["teacher"], strict=True):
        if want is None:
            assert math.isnan(got)
        else:
            assert got == want  # exactly representable in float32
    assert list(batch.oracle) == ["click"]
    assert batch.oracle["click"].tolist() == pytest.approx(ROWS["click_prob"], abs=1e-7)


def test_hash_oov_maps_by_modulo_including_negative_ids():
    rows = dict(ROWS)
    rows["uid"] = [-1, 13, None, -23, 10, 4]
    rows["hist"] = [[-8, 8], [], None, [-9], [17, 0, -1], [7, 7]]
    rows["item"] = [-12, 12, 25, -1, 11, 0]
    schema = make_schema(oov=OOVPolicy.HASH)
    builder = BatchBuilder(schema)
    table = make_table(rows)
    builder.validate(table, where="hash.parquet")  # hashed ids are never out of range
    kjt = builder.build(table).sparse

    expected = oracle_sparse(rows, schema)
    assert expected["user"] == [[9], [3], [], [7], [0], [4]]  # by hand: -1 % 10 == 9
    assert expected["history"] == [[0, 0], [], [], [7], [1, 0, 7], [7, 7]]
    assert expected["item"] == [[0], [0], [1], [11], [11], [0]]
    values, lengths = flat_values_and_lengths(expected, kjt.keys())
    assert kjt.values().tolist() == values
    assert kjt.lengths().tolist() == lengths
    assert int(kjt.values().min()) >= 0


def test_weighted_multi_sparse_feature():
    schema = make_schema(weighted=True)
    assert "hist_w" in schema.columns
    kjt = BatchBuilder(schema).build(make_table()).sparse
    w = kjt.weights_or_none()
    assert w is not None and w.dtype == torch.float32

    expected: list[float] = []
    for s in schema.sparse:
        for i in range(6):
            ids = bag(ROWS[s.column][i], s.multi)
            if s.weights:
                ws = ROWS[s.weights][i] or []
                assert len(ws) == len(ids)
                expected.extend(ws)
            else:
                expected.extend([1.0] * len(ids))
    assert w.tolist() == expected
    per_key = kjt.to_dict()
    assert per_key["history"].weights().tolist() == [0.5, 2.0, 1.5, 0.125, 0.25, 0.75, 3.0, -1.0]
    assert per_key["user"].weights().tolist() == [1.0] * 5
    assert per_key["item"].weights().tolist() == [1.0] * 6


def test_sliced_and_chunked_tables_match_the_oracle():
    """The loader builds from slices of taken tables and from concatenations: same answers."""
    schema = make_schema(weighted=True)
    builder = BatchBuilder(schema)
    full = make_table()

    sliced = full.slice(1, 4)  # rows 1..4: the null single id, the empty and the null list
    sub_rows = {k: v[1:5] for k, v in ROWS.items()}
    got = builder.build(sliced)
    values, lengths = flat_values_and_lengths(oracle_sparse(sub_rows, schema), schema.sparse_keys)
    assert got.sparse.values().tolist() == values
    assert got.sparse.lengths().tolist() == lengths
    assert got.groups["request"].tolist() == sub_rows["request_id"]
    assert got.dense[:, 0].tolist() == [float(x) for x in sub_rows["n_int"]]

    chunked = pa.concat_tables([full.slice(0, 2), full.slice(2, 3), full.slice(5)])
    assert chunked.column("hist").num_chunks == 3
    a, b = builder.build(chunked), builder.build(full)
    assert torch.equal(a.sparse.values(), b.sparse.values())
    assert torch.equal(a.sparse.lengths(), b.sparse.lengths())
    assert torch.equal(a.sparse.weights(), b.sparse.weights())
    assert torch.equal(a.dense, b.dense)

    perm = [4, 0, 5, 2, 1, 3]
    taken = builder.build(full.take(pa.array(perm)))
    perm_rows = {k: [v[i] for i in perm] for k, v in ROWS.items()}
    values, lengths = flat_values_and_lengths(oracle_sparse(perm_rows, schema),
                                              schema.sparse_keys)
    assert taken.sparse.values().tolist() == values
    assert taken.sparse.lengths().tolist() == lengths
    assert taken.labels["click"].tolist() == [float(x) for x in perm_rows["click"]]


def test_null_list_backed_by_values_is_an_empty_bag():
    """A null list whose offsets still span values (legal Arrow) contributes no ids."""
    offsets = pa.array([0, 2, 4, 5], type=pa.int32())
    values = pa.array([1, 2, 3, 4, 5], type=pa.int64())
    mask = pa.array([False, True, False])
    hist = pa.ListArray.from_arrays(offsets, values, mask=mask)
    assert hist.to_pylist() == [[1, 2], None, [5]]
    table = pa.table({"hist": hist, "y": pa.array([0, 1, 0], type=pa.int8())})
    schema = BatchSchema(dense=[], sparse=[SparseColumn("h", "hist", 8, OOVPolicy.ERROR, True)],
                         labels=["y"])
    kjt = BatchBuilder(schema).build(table).sparse
    assert kjt.values().tolist() == [1, 2, 5]
    assert kjt.lengths().tolist() == [2, 0, 1]


def test_large_list_ids_are_accepted():
    table = pa.table({"hist": pa.array([[1], [2, 3], []], type=pa.large_list(pa.int32())),
                      "y": pa.array([1.0, 0.0, 1.0])})
    schema = BatchSchema(dense=[], sparse=[SparseColumn("h", "hist", 8, OOVPolicy.ERROR, True)],
                         labels=["y"])
    batch = BatchBuilder(schema).build(table)
    assert batch.sparse.values().tolist() == [1, 2, 3]
    assert batch.sparse.lengths().tolist() == [1, 2, 0]
    assert batch.dense.shape == (3, 0)


def assert_batches_equal(a: Batch, b: Batch) -> None:
    assert torch.equal(a.dense, b.dense)
    assert a.sparse.keys() == b.sparse.keys()
    assert torch.equal(a.sparse.values(), b.sparse.values())
    assert torch.equal(a.sparse.lengths(), b.sparse.lengths())
    wa, wb = a.sparse.weights_or_none(), b.sparse.weights_or_none()
    assert (wa is None) == (wb is None)
    if wa is not None:
        assert torch.equal(wa, wb)
    assert a.labels.keys() == b.labels.keys()
    for k in a.labels:
        assert torch.equal(a.labels[k], b.labels[k])
    assert a.groups.keys() == b.groups.keys()
    for k in a.groups:
        assert torch.equal(a.groups[k], b.groups[k])
    assert (a.stage is None) == (b.stage is None)
    if a.stage is not None:
        assert torch.equal(a.stage, b.stage)
    assert (a.teacher is None) == (b.teacher is None)
    if a.teacher is not None:
        assert torch.equal(a.teacher.nan_to_num(-7.0), b.teacher.nan_to_num(-7.0))
    assert a.oracle.keys() == b.oracle.keys()
    for k in a.oracle:
        assert torch.equal(a.oracle[k], b.oracle[k])


def test_batch_is_pipelineable_and_moves_to_cpu():
    batch = BatchBuilder(make_schema(weighted=True)).build(make_table())
    assert isinstance(batch, Pipelineable)
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, Batch)
    assert_batches_equal(moved, batch)
    moved_str = batch.to("cpu", non_blocking=True)  # type: ignore[arg-type]
    assert_batches_equal(moved_str, batch)
    assert moved_str.sparse.device().type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pin_memory needs CUDA")
def test_pin_memory():
    batch = BatchBuilder(make_schema(weighted=True)).build(make_table())
    pinned = batch.pin_memory()
    assert pinned.dense.is_pinned()
    assert pinned.sparse.values().is_pinned()
    assert all(t.is_pinned() for t in pinned.labels.values())
    assert_batches_equal(pinned, batch)
    on_gpu = batch.to(torch.device("cuda"), non_blocking=True)
    assert on_gpu.dense.is_cuda and on_gpu.sparse.values().is_cuda
    assert_batches_equal(on_gpu.to(torch.device("cpu")), batch)


def test_batch_survives_pickling():
    builder = BatchBuilder(make_schema(weighted=True))
    batch = builder.build(make_table())
    other = builder.build(make_table().slice(2))
    back = pickle.loads(pickle.dumps(batch))
    assert isinstance(back, Batch)
    assert_batches_equal(back, batch)
    many = pickle.loads(pickle.dumps([batch, other]))
    assert len(many) == 2
    assert_batches_equal(many[0], batch)
    assert_batches_equal(many[1], other)
    assert many[1].batch_size == 4


def test_tensors_are_writable_and_own_their_memory():
    """Arrow buffers are read-only; a Batch must not alias them (torch warns and may write)."""
    table = make_table()
    builder = BatchBuilder(make_schema())
    batch = builder.build(table)
    batch.labels["rating"][1] = 5.0
    batch.groups["request"][0] = -1
    batch.stage[0] = 9  # type: ignore[index]
    batch.oracle["click"][0] = 2.0
    batch.dense[0, 0] = 9.0
    batch.sparse.values()[0] = 99
    assert batch.labels["rating"][1] == 5.0 and batch.groups["request"][0] == -1
    assert table.column("rating").to_pylist() == ROWS["rating"]  # the table is untouched
    assert table.column("request_id").to_pylist() == ROWS["request_id"]
    assert table.column("uid").to_pylist() == ROWS["uid"]
    again = builder.build(table)
    assert again.labels["rating"][1] == 1.0 and again.groups["request"][0] == 10
    assert again.stage[0] == 0 and again.dense[0, 0] == 1.0  # type: ignore[index]
    assert again.sparse.values()[0] == 3


# ---- windows: gathered once, cut into batches -----------------------------------------------------


def test_window_batches_equal_batches_of_the_taken_rows():
    """A window gathered in a given order and cut at given points gives, batch by batch, what
    building each batch's rows alone gives (the oracle-checked path above), nulls included."""
    schema = make_schema(weighted=True)
    builder = BatchBuilder(schema)
    full = make_table()
    cols = builder.columns(full, "t")
    rows, cuts = np.array([4, 1, 5, 2, 0, 3]), [0, 2, 3, 6]
    window = builder.window(cols, rows, cuts)
    assert window.num_batches == 3
    got = list(builder.batches(window))
    assert [b.batch_size for b in got] == [2, 1, 3]
    for batch, (a, b) in zip(got, zip(cuts, cuts[1:], strict=False), strict=True):
        assert_batches_equal(batch, builder.build(full.take(pa.array(rows[a:b]))))
    # rows 1 and 2 (the null user id, the empty and the null history) in batch 0 and 1
    assert got[0].sparse.to_dict()["history"].lengths().tolist() == [3, 0]
    assert got[1].sparse.to_dict()["user"].lengths().tolist() == [1]
    assert [b.sparse.keys() for b in builder.batches(window, first=2)] == [schema.sparse_keys]
    in_order = list(builder.batches(builder.window(cols, None, [0, 4, 6])))
    assert_batches_equal(in_order[1], builder.build(full.slice(4)))


def test_kjt_carries_stride_and_per_key_lengths_as_torchrec_computes_them():
    """The precomputed KJT metadata equals what torchrec would compute from values and lengths
    (so a pipeline never waits for the device to compute it)."""
    builder = BatchBuilder(make_schema(weighted=True))
    window = builder.window(builder.columns(make_table()), np.array([5, 3, 1, 0, 2, 4]),
                            [0, 4, 6])
    for batch in builder.batches(window):
        kjt = batch.sparse
        plain = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                  weights=kjt.weights())
        assert kjt._stride == plain.stride() == batch.batch_size
        assert kjt._length_per_key == plain.length_per_key()
        assert kjt._offset_per_key == plain.offset_per_key()
        assert kjt.lengths().dtype == torch.int32 and kjt.values().dtype == torch.int64
    # by hand, rows 5 3 1 0: users 5 9 null 3, histories [7 7] [4] [] [1 2], items 3 0 6 5
    first = next(builder.batches(window))
    assert first.sparse.length_per_key() == [3, 5, 4]
    assert first.sparse.offset_per_key() == [0, 3, 8, 12]


def test_batches_of_a_window_own_separate_writable_memory():
    builder = BatchBuilder(make_schema())
    cols = builder.columns(make_table())
    window = builder.window(cols, np.arange(6)[::-1].copy(), [0, 3, 6])
    a, b = builder.batches(window)
    a.dense[:] = -99.0
    a.labels["click"][:] = 7.0
    a.sparse.values()[:] = -5
    assert b.dense.min() > -99.0 and 7.0 not in b.labels["click"].tolist()
    assert -5 not in b.sparse.values().tolist()
    assert cols.dense.min() > -99.0 and -5 not in cols.singles.ravel().tolist()  # source intact
    again = builder.batch(window, 1)
    assert_batches_equal(again, b)


def test_take_jagged_known_answers():
    from recsys.data.batch import _take_jagged

    offsets = np.array([0, 2, 2, 5, 6])  # rows: [10 11] [] [12 13 14] [15]
    ids = np.arange(10, 16, dtype=np.int32)
    weights = np.arange(6, dtype=np.float32) / 10

    def check(rows, lengths, taken):
        ln, got, w = _take_jagged(offsets, ids, weights, np.array(rows, dtype=np.int64))
        assert (ln.tolist(), got.tolist()) == (lengths, taken)
        assert ln.dtype == np.int32 and got.dtype == np.int32
        np.testing.assert_array_equal(w, (np.array(taken, dtype=np.float32) - 10) / 10)
        assert _take_jagged(offsets, ids, None, np.array(rows, dtype=np.int64))[2] is None

    check([2, 1, 0, 3, 1], [3, 0, 2, 1, 0], [12, 13, 14, 10, 11, 15])  # a permutation
    check([3, 2], [1, 3], [15, 12, 13, 14])  # a subset, no empty row
    check([1, 1], [0, 0], [])  # only empty rows
    check([3, 3, 0], [1, 1, 2], [15, 15, 10, 11])  # repeats
    check([], [], [])
    # offsets that do not start at 0 (a slice of a longer column)
    ln, got, _ = _take_jagged(offsets[2:] + 7, np.arange(20, dtype=np.int64), None,
                              np.array([1, 0]))
    assert (ln.tolist(), got.tolist()) == ([1, 3], [12, 9, 10, 11])


def test_nulls_become_nan_and_validity_follows_slices():
    from recsys.data.batch import _nan_for_null, _valid

    col = pa.array([None, 2, 3, None, 5, -0.0, float("inf"), None, 9], type=pa.float32())
    got = _nan_for_null(col.slice(2, 6))  # 3 None 5 -0.0 inf None
    assert got.dtype == np.float32
    assert np.array_equal(got, [3, np.nan, 5, 0, np.inf, np.nan], equal_nan=True)
    assert np.signbit(got[3])  # -0.0 stays -0.0
    assert _valid(col.slice(2, 6)).tolist() == [True, False, True, True, True, False]
    ints = pa.array([7, None, -2], type=pa.int8())
    assert np.array_equal(_nan_for_null(ints), [7, np.nan, -2], equal_nan=True)
    assert np.array_equal(_nan_for_null(pa.array([True, None])), [1, np.nan], equal_nan=True)
    assert _valid(pa.array([1, 2])).tolist() == [True, True]  # no bitmap at all
