"""The synthetic Criteo-format world (:mod:`recsys.data.adapters.criteo_world`), against known answers: the
TSV is the generated arrays, the rows do not depend on chunk_rows, the logit is the documented
formula recomputed by hand, the crosses carry a clear share of the oracle's AUC, and the file goes
through the real Criteo adapter and the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.cli import main
from recsys.data.adapters import criteo_world as cw
from recsys.data.adapters import criteo_world_writer as cww
from recsys.data.adapters import prepare, split_sizes
from recsys.data.adapters.criteo_world import (
    CARDINALITIES,
    CriteoWorldConfig,
    World,
    generate_rows,
)
from recsys.data.adapters.criteo_world_writer import exact_auc, log_loss, write_criteo_world
from recsys.data.schema import DatasetManifest
from recsys.spec import PrepareSpec

# 20_000 rows span three of the fixed 8192-row blocks, the last one cut
SMALL = CriteoWorldConfig(rows=20_000, seed=5, chunk_rows=7000)
HEX8 = re.compile(r"[0-9a-f]{8}")


@pytest.fixture(scope="module")
def world() -> World:
    return World.from_config(SMALL)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("criteo-world")
    return out, write_criteo_world(out, SMALL, progress=False)


def test_tsv_parses_back_to_the_generated_rows(written: tuple[Path, dict], world: World) -> None:
    out, info = written
    text = (out / "train.txt").read_text()
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert len(lines) == SMALL.rows
    rows = generate_rows(world, 0, SMALL.rows)
    codes = np.stack([world.hex_codes(j, rows.cats[:, j]) for j in range(26)], axis=1)
    for i, line in enumerate(lines):
        fields = line.split("\t")
        assert len(fields) == 40, i
        assert fields[0] == str(rows.labels[i]) and fields[0] in ("0", "1")
        for j, value in enumerate(fields[1:14]):
            assert value == (str(rows.ints[i, j]) if rows.int_present[i, j] else ""), (i, j)
        for j, value in enumerate(fields[14:]):
            if rows.cats[i, j] < 0:
                assert value == "", (i, j)
            else:
                assert HEX8.fullmatch(value) and int(value, 16) == codes[i, j], (i, j, value)
    # every kind of value shows up: empty integers and categoricals, I2's -1, positives
    assert (~rows.int_present).any() and (rows.cats < 0).any()
    assert (rows.ints[:, 1] == -1).any() and 0 < rows.labels.mean() < 1
    assert info["label_mean"] == pytest.approx(rows.labels.mean())
    assert not list(out.glob(".*tmp"))  # no temporary file left behind


def test_world_json(written: tuple[Path, dict]) -> None:
    out, info = written
    assert json.loads((out / "world.json").read_text()) == info
    assert info["config"] == {**info["config"], "rows": 20_000, "seed": 5, "chunk_rows": 7000}
    assert info["cardinalities"]["C3"] == 200_000 and info["cardinalities"]["C9"] == 4
    assert ["C1", "C8"] in info["pairs"] and ["C6", "C14", "C22"] in info["triples"]
    sizes = split_sizes(SMALL.rows, SMALL.valid_fraction, SMALL.test_fraction)
    assert [info["splits"][s]["rows"] for s in ("train", "valid", "test")] == list(sizes)
    for split in info["splits"].values():
        assert 0.5 < split["first_order_auc"] < split["oracle_auc"] < 1
        assert 0 < split["oracle_log_loss"] < math.log(2)


def test_cardinalities_and_hex_codes() -> None:
    assert len(CARDINALITIES) == 26 and min(CARDINALITIES) == 4 and max(CARDINALITIES) == 200_000
    # log-spaced: the sorted cardinalities grow by a near-constant ratio
    ratios = np.diff(np.log(sorted(CARDINALITIES)))
    assert ratios.min() > 0.35 and ratios.max() < 0.55
    world = World.from_config(CriteoWorldConfig(rows=10))
    codes = world.hex_codes(2, np.arange(200_000))
    assert len(np.unique(codes)) == 200_000  # a bijection: distinct ids stay distinct
    assert world.hex_codes(2, np.array([-1]))[0] == 0


def test_rows_do_not_depend_on_chunk_rows(tmp_path: Path, world: World) -> None:
    small = generate_rows(world, 0, SMALL.rows)
    # any window, however it cuts the fixed blocks, is the same rows as a slice of the whole
    for start, stop in ((0, 1), (5000, 17_000), (8191, 8193), (19_999, 20_000), (7, 7)):
        part = generate_rows(world, start, stop)
        for name in ("labels", "logits", "first_order_logits", "ints", "int_present", "cats"):
            assert np.array_equal(getattr(part, name), getattr(small, name)[start:stop]), name
    a = write_criteo_world(tmp_path / "a", CriteoWorldConfig(rows=20_000, seed=5,
                                                             chunk_rows=1000), progress=False)
    b = write_criteo_world(tmp_path / "b", CriteoWorldConfig(rows=20_000, seed=5,
                                                             chunk_rows=7000), progress=False)
    assert (tmp_path / "a" / "train.txt").read_bytes() == (tmp_path / "b" / "train.txt").read_bytes()
    assert {**a, "config": None} == {**b, "config": None}
    other = generate_rows(CriteoWorldConfig(rows=100, seed=6), 0, 100)
    assert not np.array_equal(other.cats, small.cats[:100])  # the seed matters


def by_hand(world: World, ints: np.ndarray, present: np.ndarray, cats: np.ndarray
            ) -> tuple[float, float]:
    """The documented logit of one row, term by term in plain Python."""
    cfg, k = world.config, world.config.k

    def z(j: int) -> float:
        mean, std = world.int_moments[j]
        return (math.log1p(max(int(ints[j]), 0)) - mean) / std if present[j] else 0.0

    logit = world.bias
    for j, weights in world.first_order.items():
        if cats[j] >= 0:
            logit += cfg.first_order_scale * weights[cats[j]]
    for j, beta in zip(world.dense_fields, world.dense_betas, strict=True):
        logit += cfg.dense_scale * beta * z(j)
    first = logit
    for (a, b), (u, v) in zip(world.pairs, world.pair_tables, strict=True):
        if cats[a] >= 0 and cats[b] >= 0:
            dot = sum(u[cats[a], d] * v[cats[b], d] for d in range(k))
            logit += cfg.pair_scale * math.sqrt(k) * dot
    for (a, b, c), (u, v, w) in zip(world.triples, world.triple_tables, strict=True):
        if cats[a] >= 0 and cats[b] >= 0 and cats[c] >= 0:
            dot = sum(u[cats[a], d] * v[cats[b], d] * w[cats[c], d] for d in range(k))
            logit += cfg.triple_scale * k * dot
    i, c = world.dense_cross
    if cats[c] >= 0:
        logit += cfg.dense_cross_scale * z(i) * world.dense_cross_table[cats[c]]
    return logit, first


def test_logits_match_the_formula_by_hand(world: World) -> None:
    rows = generate_rows(world, 9000, 9300)
    for r in range(len(rows)):
        full, first = by_hand(world, rows.ints[r], rows.int_present[r], rows.cats[r])
        assert rows.logits[r] == pytest.approx(full, rel=1e-9, abs=1e-9), r
        assert rows.first_order_logits[r] == pytest.approx(first, rel=1e-9, abs=1e-9), r
    # a row with everything missing is the bias alone
    full, first = world.logits(np.zeros((1, 13), np.int64), np.zeros((1, 13), bool),
                               np.full((1, 26), -1))
    assert full[0] == first[0] == world.bias
    # the tables are centred under their id distributions: crosses have no marginal effect
    for j, table in [*world.first_order.items(), (world.pairs[0][0], world.pair_tables[0][0])]:
        probs = np.diff(world.id_cdfs[j], prepend=0.0)
        assert np.allclose(probs @ table, 0.0, atol=1e-9)


def test_ctr_and_the_crosses_matter_at_60k_rows() -> None:
    cfg = CriteoWorldConfig(rows=60_000, seed=1)
    rows = generate_rows(cfg, 0, cfg.rows)
    assert abs(rows.labels.mean() - cfg.ctr) < 0.02
    train, valid, test = split_sizes(cfg.rows, cfg.valid_fraction, cfg.test_fraction)
    y = rows.labels[train + valid:]
    assert len(y) == test == 6000
    oracle = exact_auc(y, rows.logits[train + valid:])
    first_order = exact_auc(y, rows.first_order_logits[train + valid:])
    assert first_order is not None and oracle is not None
    assert 0.74 < oracle < 0.86
    assert oracle > first_order + 0.03


def test_exact_auc_and_log_loss_known_answers() -> None:
    # positives 0.4 and 0.9 against negatives 0.1 and 0.4: (1 + 0.5) + (1 + 1) of 4 pairs
    assert exact_auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.4, 0.4, 0.9])) == 0.875
    assert exact_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None
    assert exact_auc(np.array([0, 1]), np.array([3.0, 3.0])) == 0.5
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 2000), rng.integers(0, 20, 2000).astype(float)  # many ties
    pairs = (s[y == 1][:, None] > s[y == 0][None, :]).sum() \
        + 0.5 * (s[y == 1][:, None] == s[y == 0][None, :]).sum()
    assert exact_auc(y, s) == pytest.approx(pairs / ((y == 1).sum() * (y == 0).sum()), abs=1e-12)
    assert log_loss(np.array([1, 0]), np.array([0.0, 0.0])) == pytest.approx(math.log(2))
    assert log_loss(np.array([1]), np.array([800.0])) == pytest.approx(0.0)  # no overflow


def test_prepares_through_the_criteo_adapter(written: tuple[Path, dict], tmp_path: Path,
                                             world: World) -> None:
    out, info = written
    path = out / "train.txt"
    manifest = prepare("criteo", path, tmp_path / "prepared",
                       PrepareSpec(input=str(path), hash_size=4096), progress=False)
    counts = {s: info["splits"][s]["rows"] for s in ("train", "valid", "test")}
    assert manifest.rows["impressions"] == counts == {"train": 16_000, "valid": 2000,
                                                      "test": 2000}
    loaded = DatasetManifest.load(tmp_path / "prepared")
    tables = {s: pa.concat_tables([pq.read_table(f) for f in loaded.files("impressions", s)])
              for s in ("train", "valid", "test")}
    clicks = np.concatenate([tables[s].column("click").to_numpy() for s in tables])
    rows = generate_rows(world, 0, SMALL.rows)
    assert np.array_equal(clicks, rows.labels)  # same rows, same order
    assert clicks.mean() == pytest.approx(info["label_mean"])
    for s, table in tables.items():
        assert table.column("click").to_numpy().mean() == pytest.approx(
            info["splits"][s]["positive_rate"])
    # the adapter reads the integers and hex values that were written
    train = tables["train"]
    i1 = np.where(rows.int_present[:16_000, 0], np.log1p(np.maximum(rows.ints[:16_000, 0], 0)), 0)
    assert np.allclose(train.column("I1").to_numpy(), i1, atol=1e-5)
    c3 = rows.cats[:16_000, 2]
    expected = np.where(c3 >= 0, world.hex_codes(2, c3).astype(np.int64) % 4096 + 1, 0)
    assert np.array_equal(train.column("C3").to_numpy(), expected)


def test_interrupted_write_leaves_no_train_txt(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(world: World, rows: cw.WorldRows) -> pa.Table:
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return original(world, rows)

    original = cww._to_table
    monkeypatch.setattr(cww, "_to_table", failing)
    out = tmp_path / "w"
    with pytest.raises(KeyboardInterrupt):
        write_criteo_world(out, CriteoWorldConfig(rows=30_000, chunk_rows=5000), progress=False)
    assert list(out.iterdir()) == []  # no train.txt, no world.json, no temporary file


def test_cli_refuses_a_non_empty_out_without_force(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "world"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["data", "criteo-world", "--out", str(out), "--rows", "3000"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err and "not empty" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["data", "criteo-world", "--out", str(out), "--rows", "3000", "--seed", "2",
                 "--force"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "train.txt") in printed and "oracle test AUC" in printed
    assert len((out / "train.txt").read_text().splitlines()) == 3000
    assert json.loads((out / "world.json").read_text())["config"]["seed"] == 2
    assert (out / "notes.txt").read_text() == "keep me"
    assert main(["data", "criteo-world", "--out", str(tmp_path / "x"), "--rows", "0"]) == 2
    assert "--rows must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(("field", "value"), [
    ("rows", 0), ("rows", 1.5), ("seed", -1), ("ctr", 0.0), ("ctr", 1.0), ("k", 0),
    ("first_order_scale", -0.1), ("pair_scale", float("nan")), ("triple_scale", -1.0),
    ("dense_scale", float("inf")), ("dense_cross_scale", -2.0), ("zipf_exponent", 0.0),
    ("chunk_rows", 0), ("valid_fraction", 1.0), ("test_fraction", -0.1), ("k", True),
])
def test_bad_config_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        CriteoWorldConfig(**{field: value})


def test_fractions_must_leave_train_rows() -> None:
    with pytest.raises(ValueError, match="valid_fraction \\+ test_fraction must be < 1"):
        CriteoWorldConfig(valid_fraction=0.5, test_fraction=0.5)
