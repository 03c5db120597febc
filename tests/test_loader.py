"""ParquetLoader against an independent numpy re-implementation of its epoch-order contract
(see the module docstring of recsys.data.loader)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.batch import Batch
from recsys.data.loader import ParquetLoader
from recsys.data.parquet import ParquetSplit
from recsys.data.schema import BatchSchema, DatasetManifest, SparseColumn
from recsys.spec import OOVPolicy

# ---- the reference: the contract, from metadata and raw row-group reads ---------------------------


def row_groups_in_file_order(files: list[Path], column: str) -> list[tuple[int, int, np.ndarray]]:
    """(file index, row group, values of ``column``) for every non-empty row group, in file order."""
    out = []
    for i, f in enumerate(files):
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            if pf.metadata.row_group(g).num_rows:
                out.append((i, g, pf.read_row_group(g, columns=[column])
                            .column(column).to_numpy()))
    return out


def reference_plan(groups: list[tuple[int, int, np.ndarray]], *, batch_size: int,
                   window_batches: int, seed: int, epoch: int, rank: int = 0,
                   world_size: int = 1, shuffle: bool = True, drop_last: bool = True,
                   ) -> tuple[list[np.ndarray], list[list[tuple[int, int]]]]:
    """The batches (as key arrays) of one rank's epoch, and per window the row groups it touches."""
    order = (np.random.default_rng([seed, epoch]).permutation(len(groups)) if shuffle
             else np.arange(len(groups)))
    stream = np.concatenate([groups[i][2] for i in order])
    owner = np.concatenate([np.full(len(groups[i][2]), i) for i in order])
    n = len(stream)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    rows, owners = stream[lo:hi], owner[lo:hi]
    if drop_last:
        keep = (n // world_size) // batch_size * batch_size
        rows, owners = rows[:keep], owners[:keep]
    per_window = window_batches * batch_size
    batches, touched = [], []
    for w, a in enumerate(range(0, len(rows), per_window)):
        window = rows[a:a + per_window]
        touched.append(sorted({groups[i][:2] for i in owners[a:a + per_window]}))
        if shuffle:
            window = window[np.random.default_rng([seed, epoch, rank, w])
                            .permutation(len(window))]
        batches += [window[b:b + batch_size] for b in range(0, len(window), batch_size)]
    return batches, touched


def keys_of(batch: Batch) -> np.ndarray:
    """The row key of every row of a batch: the ``rid`` feature of the hand-made files."""
    return batch.sparse.to_dict()["rid"].values().numpy()


TOTAL_HANDMADE = 23 + 17 + 0 + 31 + 6


def test_handmade_split_metadata(handmade):
    files, schema = handmade
    split = ParquetSplit(files, schema)
    assert split.num_rows == TOTAL_HANDMADE
    sizes = [(r.file, r.group, r.num_rows, r.first_row) for r in split.row_groups]
    assert sizes[:5] == [(0, 0, 5, 0), (0, 1, 5, 5), (0, 2, 5, 10), (0, 3, 5, 15), (0, 4, 3, 20)]
    assert sizes[-2:] == [(4, 0, 3, 0), (4, 2, 3, 3)]  # the empty group 1 is skipped
    assert not any(r.file == 2 for r in split.row_groups)  # the empty file has no groups
    assert len(sizes) == 5 + 5 + 4 + 2


@pytest.mark.parametrize("batch_size,window_batches,world_size,drop_last", [
    (4, 3, 1, True), (4, 3, 1, False), (5, 2, 2, True), (5, 2, 2, False), (7, 1, 3, False),
    (3, 5, 3, True), (200, 2, 1, False),
])
def test_epoch_order_matches_contract_handmade(handmade, batch_size, window_batches, world_size,
                                               drop_last):
    files, schema = handmade
    groups = row_groups_in_file_order(files, "rid")
    split = ParquetSplit(files, schema)
    for rank in range(world_size):
        loader = ParquetLoader(split, batch_size, rank=rank, world_size=world_size, seed=5,
                               window_batches=window_batches, drop_last=drop_last)
        for epoch in (0, 3):
            want, _ = reference_plan(groups, batch_size=batch_size, seed=5, epoch=epoch,
                                     window_batches=window_batches, rank=rank,
                                     world_size=world_size, drop_last=drop_last)
            got = [keys_of(b) for b in loader.epoch(epoch)]
            assert len(got) == len(want) == loader.steps_per_epoch() == len(loader)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)


# the batches of epoch 3 for rank 1 of 2 (batch 4, windows of 3 batches, seed 5), as recorded before
# the loader's gathering changed: resumed runs and recorded results depend on this exact order
RECORDED_EPOCH_3 = [[6, 5, 4003, 15], [16, 9, 1016, 19], [18, 7, 17, 8], [4005, 3021, 3018, 1013],
                    [1014, 1012, 1015, 3016], [3017, 3019, 3020, 4004], [1005, 1004, 13, 11],
                    [3023, 10, 12, 3022], [1007, 1006, 1000, 14], [1002, 1001, 1003]]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_epoch_order_is_the_recorded_one(handmade, num_workers):
    files, schema = handmade
    loader = ParquetLoader(ParquetSplit(files, schema), 4, rank=1, world_size=2, seed=5,
                           window_batches=3, drop_last=False, num_workers=num_workers)
    assert [keys_of(b).tolist() for b in loader.epoch(3)] == RECORDED_EPOCH_3
    assert [keys_of(b).tolist() for b in loader.epoch(3, start_step=4)] == RECORDED_EPOCH_3[4:]


def test_batch_contents_follow_the_rows(handmade):
    """Every column of a shuffled batch belongs to the same row as its key."""
    files, schema = handmade
    loader = ParquetLoader(ParquetSplit(files, schema), 6, seed=1, window_batches=2,
                           drop_last=False)
    for batch in loader.epoch(2):
        rid = keys_of(batch)
        assert batch.groups["request"].tolist() == rid.tolist()
        assert batch.dense[:, 0].tolist() == (rid * 0.5).astype(np.float32).tolist()
        assert batch.labels["y"].tolist() == (rid % 2).astype(np.float32).tolist()
        tags = batch.sparse.to_dict()["tags"]
        assert tags.lengths().tolist() == (rid % 3).tolist()
        assert [t.tolist() for t in tags.to_dense()] == [[int(r) % 7] * (int(r) % 3)
                                                         for r in rid]


def test_epoch_order_matches_contract_synthetic(tiny_dataset: DatasetManifest, tiny_schema):
    files = tiny_dataset.files("impressions", "train")
    split = ParquetSplit(files, tiny_schema)
    assert split.num_rows == tiny_dataset.rows["impressions"]["train"] == 9000
    assert len(split.row_groups) == 9
    # a unique row key: (request, item) -- a request never retrieves an item twice
    groups = []
    for i, f in enumerate(files):
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=["request_id", "item_id"])
            groups.append((i, g, t.column("request_id").to_numpy() * 1000
                           + t.column("item_id").to_numpy()))
    all_keys = np.concatenate([g[2] for g in groups])
    assert len(np.unique(all_keys)) == len(all_keys)
    for rank in (0, 1):
        loader = ParquetLoader(split, 64, rank=rank, world_size=2, seed=3, window_batches=4)
        want, _ = reference_plan(groups, batch_size=64, window_batches=4, seed=3, epoch=1,
                                 rank=rank, world_size=2)
        got = [b.groups["request"].numpy() * 1000
               + b.sparse.to_dict()["item_id"].values().numpy() for b in loader.epoch(1)]
        assert len(got) == len(want) == 70  # (9000 // 2) // 64
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_two_ranks_partition_the_rows(handmade):
    files, schema = handmade
    split = ParquetSplit(files, schema)
    seen = []
    for rank in (0, 1):
        loader = ParquetLoader(split, 4, rank=rank, world_size=2, seed=9, window_batches=2,
                               drop_last=False)
        seen.append(np.concatenate([keys_of(b) for b in loader.epoch(0)]))
    assert len(seen[0]) == TOTAL_HANDMADE // 2 and len(seen[1]) == TOTAL_HANDMADE - len(seen[0])
    assert not set(seen[0]) & set(seen[1])
    expected = np.concatenate([g[2] for g in row_groups_in_file_order(files, "rid")])
    assert sorted(np.concatenate(seen).tolist()) == sorted(expected.tolist())
    assert len(np.unique(np.concatenate(seen))) == TOTAL_HANDMADE  # each row exactly once


def test_drop_last_gives_every_rank_the_same_full_batches(handmade):
    files, schema = handmade
    split = ParquetSplit(files, schema)
    for world_size in (2, 3):
        counts = []
        for rank in range(world_size):
            loader = ParquetLoader(split, 5, rank=rank, world_size=world_size, seed=2,
                                   window_batches=2, drop_last=True)
            batches = list(loader.epoch(0))
            assert all(b.batch_size == 5 for b in batches)
            counts.append(len(batches))
        assert counts == [(TOTAL_HANDMADE // world_size) // 5] * world_size


class CountingSplit(ParquetSplit):
    """A ParquetSplit that records which row groups it decodes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[int, int]] = []

    def read(self, ref):
        self.reads.append((ref.file, ref.group))
        return super().read(ref)


@pytest.mark.parametrize("drop_last", [True, False])
def test_restart_yields_the_tail_and_reads_nothing_before_its_window(handmade, drop_last):
    files, schema = handmade
    bs, wb = 4, 3
    groups = row_groups_in_file_order(files, "rid")
    full_loader = ParquetLoader(CountingSplit(files, schema), bs, seed=4, window_batches=wb,
                                drop_last=drop_last)
    full = [keys_of(b) for b in full_loader.epoch(2)]
    steps = full_loader.steps_per_epoch()
    assert steps == (TOTAL_HANDMADE // bs if drop_last else -(-TOTAL_HANDMADE // bs))
    _, touched = reference_plan(groups, batch_size=bs, window_batches=wb, seed=4, epoch=2,
                                drop_last=drop_last)
    # the uninterrupted epoch reads every row group it needs, and none twice in one window
    reads = full_loader.split.reads
    assert set(reads) == {r for t in touched for r in t}
    assert len(set(reads)) <= len(reads) <= sum(len(t) for t in touched)

    for k in (0, 1, wb - 1, wb, wb + 1, 2 * wb, 3 * wb - 1, steps - 1, steps):
        split = CountingSplit(files, schema)
        loader = ParquetLoader(split, bs, seed=4, window_batches=wb, drop_last=drop_last)
        tail = [keys_of(b) for b in loader.epoch(2, start_step=k)]
        assert len(tail) == steps - k
        for g, w in zip(tail, full[k:], strict=True):
            np.testing.assert_array_equal(g, w)
        first_window = k // wb
        needed = {r for t in touched[first_window:] for r in t} if k < steps else set()
        assert set(split.reads) == needed, f"start_step {k}"
        assert len(split.reads) <= sum(len(t) for t in touched[first_window:])
        earlier_only = {r for t in touched[:first_window] for r in t} - needed
        assert not earlier_only & set(split.reads)

    with pytest.raises(ValueError, match="start_step"):
        list(full_loader.epoch(2, start_step=steps + 1))


def test_restart_reads_no_earlier_row_group_on_synthetic(tiny_dataset, tiny_schema):
    files = tiny_dataset.files("impressions", "train")
    split = CountingSplit(files, tiny_schema)
    loader = ParquetLoader(split, 100, seed=0, window_batches=10, drop_last=True)
    # windows of 1000 rows = one row group each: window w reads exactly order[w]
    order = np.random.default_rng([0, 0]).permutation(9)
    refs = [(r.file, r.group) for r in split.row_groups]
    batches = list(loader.epoch(0, start_step=35))
    assert len(batches) == 90 - 35
    assert split.reads == [refs[i] for i in order[3:]]


def test_epochs_differ_and_repeat(handmade):
    files, schema = handmade
    split = ParquetSplit(files, schema)

    def order(seed: int, epoch: int) -> list[int]:
        loader = ParquetLoader(split, 4, seed=seed, window_batches=2, drop_last=False)
        return np.concatenate([keys_of(b) for b in loader.epoch(epoch)]).tolist()

    e0, e1 = order(0, 0), order(0, 1)
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert order(0, 0) == e0  # a fresh loader, same (seed, epoch): the same order
    assert order(1, 0) != e0


def test_no_shuffle_keeps_file_order(handmade):
    files, schema = handmade
    split = ParquetSplit(files, schema)
    in_files = np.concatenate([pq.read_table(f, columns=["rid"]).column("rid").to_numpy()
                               for f in files])
    loader = ParquetLoader(split, 4, seed=3, shuffle=False, window_batches=2, drop_last=False)
    for epoch in (0, 1):
        got = np.concatenate([keys_of(b) for b in loader.epoch(epoch)])
        np.testing.assert_array_equal(got, in_files)
    # with two ranks, rank 0 takes the head of the file order and rank 1 the rest
    halves = [np.concatenate([keys_of(b) for b in ParquetLoader(
        split, 4, rank=r, world_size=2, shuffle=False, drop_last=False).epoch(0)])
        for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), in_files)
    assert len(halves[0]) == TOTAL_HANDMADE // 2


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_steps_per_epoch_matches_what_is_yielded(handmade, drop_last, world_size):
    files, schema = handmade
    split = ParquetSplit(files, schema)
    total = 0
    for rank in range(world_size):
        loader = ParquetLoader(split, 6, rank=rank, world_size=world_size, window_batches=4,
                               drop_last=drop_last)
        batches = list(loader.epoch(0))
        assert len(batches) == loader.steps_per_epoch() == len(loader)
        rows = sum(b.batch_size for b in batches)
        assert rows == loader.rows_per_epoch()
        lo, hi = TOTAL_HANDMADE * rank // world_size, TOTAL_HANDMADE * (rank + 1) // world_size
        if drop_last:
            assert len(batches) == (TOTAL_HANDMADE // world_size) // 6
        else:
            assert len(batches) == -(-(hi - lo) // 6)
            assert rows == hi - lo
        total += rows
    if not drop_last:
        assert total == TOTAL_HANDMADE


def test_loader_rejects_bad_arguments(handmade):
    files, schema = handmade
    split = ParquetSplit(files, schema)
    with pytest.raises(ValueError, match="rank"):
        ParquetLoader(split, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        ParquetLoader(split, 0)


@pytest.mark.parametrize("shuffle", [True, False])
def test_nullable_ids_and_teacher_across_row_groups(tmp_path, shuffle):
    """A window joins row groups where a column has nulls with ones where it has none."""
    rid = np.arange(12, dtype=np.int64)
    uid = [None if r in (1, 2) else int(r % 5) for r in rid]  # nulls in row group 0 only
    teacher = [None if r in (7, 11) else float(r) / 4 for r in rid]  # nulls in group 1 and 2
    table = pa.table({"rid": rid, "uid": pa.array(uid, type=pa.int64()),
                      "teacher": pa.array(teacher, type=pa.float32()),
                      "y": pa.array(rid % 2, type=pa.int8())})
    path = tmp_path / "part-00000.parquet"
    pq.write_table(table, path, row_group_size=4)
    schema = BatchSchema(dense=[], labels=["y"], teacher="teacher",
                         sparse=[SparseColumn("rid", "rid", 100, OOVPolicy.ERROR, False),
                                 SparseColumn("uid", "uid", 5, OOVPolicy.ERROR, False)])
    loader = ParquetLoader(ParquetSplit([path], schema), 3, seed=0, window_batches=4,
                           shuffle=shuffle, drop_last=False)
    seen = []
    for batch in loader.epoch(0):
        per_key = batch.sparse.to_dict()
        keys = per_key["rid"].values().tolist()
        assert [t.tolist() for t in per_key["uid"].to_dense()] == \
            [[] if uid[r] is None else [uid[r]] for r in keys]
        assert batch.teacher is not None
        got = batch.teacher.tolist()
        for r, g in zip(keys, got, strict=True):
            assert (np.isnan(g) if teacher[r] is None else g == teacher[r]), (r, g)
        seen += keys
    assert sorted(seen) == rid.tolist()


def test_weights_and_hashed_lists_follow_their_rows(tmp_path):
    """Per-id weights and hashed list ids travel with their row through the window shuffle."""
    def tags_of(r: int) -> list[int]:
        return [r - 20 + 3 * k for k in range(r % 4)]  # negative ids too: hashed by modulo

    def weights_of(r: int) -> list[float]:
        return [r + k / 8 for k in range(r % 4)]

    files = []
    for f in range(2):
        rid = np.arange(f * 13, f * 13 + 13, dtype=np.int64)
        table = pa.table({
            "rid": rid,
            "tags": pa.array([tags_of(int(r)) for r in rid], type=pa.list_(pa.int64())),
            "tag_w": pa.array([weights_of(int(r)) for r in rid], type=pa.list_(pa.float32())),
            "y": pa.array(rid % 2, type=pa.int8())})
        files.append(tmp_path / f"part-{f}.parquet")
        pq.write_table(table, files[-1], row_group_size=5)
    schema = BatchSchema(dense=[], labels=["y"], sparse=[
        SparseColumn("rid", "rid", 100, OOVPolicy.ERROR, False),
        SparseColumn("tags", "tags", 7, OOVPolicy.HASH, True, weights="tag_w")])
    loader = ParquetLoader(ParquetSplit(files, schema), 4, seed=2, window_batches=3,
                           drop_last=False)
    seen = []
    for batch in loader.epoch(1):
        per_key = batch.sparse.to_dict()
        keys = per_key["rid"].values().tolist()
        assert per_key["rid"].weights().tolist() == [1.0] * len(keys)
        assert per_key["tags"].lengths().tolist() == [r % 4 for r in keys]
        assert per_key["tags"].values().tolist() == [t % 7 for r in keys for t in tags_of(r)]
        assert per_key["tags"].weights().tolist() == [w for r in keys for w in weights_of(r)]
        seen += keys
    assert sorted(seen) == list(range(26))


def test_request_batches_keep_each_request_whole(tiny_spec, tiny_dataset) -> None:
    """Shuffling whole requests: every request lies in one batch except those cut by a window's
    or a row group's edges, the batch count is unchanged, every row is read once, and the order
    still follows the seed."""
    from recsys.datasets import open_split

    split = open_split(tiny_spec, tiny_dataset, "train")
    plain = ParquetLoader(split, batch_size=50, seed=3, window_batches=4)
    grouped = ParquetLoader(split, batch_size=50, seed=3, window_batches=4,
                            group_column="request_id")
    batches = list(grouped.epoch(0))
    assert len(batches) == len(plain) == grouped.steps_per_epoch()
    requests = [b.groups["request"].numpy() for b in batches]
    all_rows = np.concatenate(requests)
    assert len(all_rows) == plain.rows_per_epoch()
    assert {len(r) for r in requests} != {50}  # cut at request boundaries, sizes vary
    assert max(abs(len(r) - 50) for r in requests) <= 3  # tiny requests: 3 exposed rows
    # a request is cut only where the row stream cuts it: at a window's edges or where a row
    # group ends inside it (row groups hold a fixed number of rows)
    owners: dict[int, set[int]] = {}
    for i, r in enumerate(requests):
        for rid in set(r.tolist()):
            owners.setdefault(rid, set()).add(i)
    cut = sum(len(b) > 1 for b in owners.values())
    assert cut <= 2 * grouped.num_windows() + len(split.row_groups)
    assert cut < 0.1 * len(owners)
    again = [b.groups["request"].numpy() for b in grouped.epoch(0)]
    assert all(np.array_equal(a, b) for a, b in zip(requests, again, strict=True))


def test_group_column_must_be_a_group(tiny_spec, tiny_dataset) -> None:
    from recsys.datasets import open_split

    with pytest.raises(ValueError, match="group_column 'click'"):
        ParquetLoader(open_split(tiny_spec, tiny_dataset, "train"), batch_size=8,
                      group_column="click")


def test_shards_dictionary_encode_all_but_floats(tmp_path: Path) -> None:
    """Ids, labels and id lists get a dictionary; continuous floats are written plain (a hash per
    value on write, and slower to decode, for no smaller file), and read back exactly."""
    from recsys.data.parquet import ShardWriter, dictionary_columns

    table = pa.table({
        "user_id": pa.array(np.arange(300) % 7, pa.int64()),
        "tags": pa.array([[1, 2], [], [3]] * 100, pa.list_(pa.int64())),
        "price": pa.array(np.linspace(0, 1, 300), pa.float32()),
        "click": pa.array(np.arange(300) % 2, pa.int8()),
    })
    assert dictionary_columns(table.schema) == ["user_id", "tags.list.element", "click"]
    writer = ShardWriter(tmp_path, table.schema, rows_per_shard=1000, row_group_size=128)
    writer.write(table)
    (name,) = writer.close()
    f = pq.ParquetFile(tmp_path / name)
    group = f.metadata.row_group(0)
    dictionary = {group.column(i).path_in_schema: group.column(i).has_dictionary_page
                  for i in range(group.num_columns)}
    assert dictionary == {"user_id": True, "tags.list.element": True, "price": False,
                          "click": True}
    assert f.read().equals(table)
