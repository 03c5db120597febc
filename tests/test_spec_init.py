"""Specs without hand-copied sizes: ``num_embeddings = "auto"`` (or left out) read from the dataset,
``recsys spec init`` writing a whole spec for a prepared dataset, and ``specs/criteo.toml`` training
on Criteo-format files."""

from __future__ import annotations

import copy
import random
import tomllib
from pathlib import Path

import pytest

from recsys.cli import main
from recsys.data.schema import DatasetManifest, with_dataset_sizes
from recsys.datasets import sized_spec
from recsys.errors import DataError, SpecError
from recsys.models.tables import embedding_bag_configs
from recsys.spec import load_spec, validate_spec
from recsys.train.run import run_training
from tests.conftest import TINY_NUM_BRANDS, TINY_SYNTHETIC, tiny_spec_dict

ROOT = Path(__file__).resolve().parents[1]


def _auto(raw: dict, *, shared: bool = True) -> dict:
    """The tiny spec with every size left out ("auto" for user_id, missing elsewhere)."""
    raw = copy.deepcopy(raw)
    for f in raw["features"]["fields"]:
        if "num_embeddings" in f:
            if f["name"] == "user_id":
                f["num_embeddings"] = "auto"
            else:
                del f["num_embeddings"]
    if shared:
        del raw["features"]["tables"][0]["num_embeddings"]
    return raw


def test_auto_sizes_come_from_the_manifest(tiny_dataset: DatasetManifest) -> None:
    spec = validate_spec(_auto(tiny_spec_dict(tiny_dataset.root)), "auto.toml")
    assert set(spec.features.unsized_tables()) == {
        "category", "user_id", "user_age", "user_region", "item_id", "item_brand", "hour",
        "device"}
    sized = with_dataset_sizes(spec, tiny_dataset)
    assert sized.features.unsized_tables() == []
    rows = {c.name: c.num_embeddings for c in embedding_bag_configs(sized.features)}
    # the manifest's cardinalities (known from the tiny world's settings), not copied by hand
    assert rows["user_id"] == TINY_SYNTHETIC["num_users"]
    assert rows["item_id"] == TINY_SYNTHETIC["num_items"]
    assert rows["item_brand"] == TINY_NUM_BRANDS
    assert rows["hour"] == 24 and rows["device"] == 4 and rows["user_age"] == 7
    # a shared table takes the largest cardinality of the columns that use it
    cards = [tiny_dataset.column(c).cardinality for c in ("user_hist_categories", "item_category")]
    assert rows["category"] == max(cards) == TINY_SYNTHETIC["num_categories"]
    # and the sized spec is the hand-sized one
    assert sized.features == validate_spec(tiny_spec_dict(tiny_dataset.root), "t").features


def test_a_spec_with_every_size_given_is_left_as_it_is(tiny_spec, tiny_dataset) -> None:
    assert with_dataset_sizes(tiny_spec, tiny_dataset) is tiny_spec


def test_an_auto_size_without_a_dataset_is_a_spec_error_naming_the_tables(tmp_path: Path) -> None:
    raw = _auto(tiny_spec_dict(tmp_path / "nowhere"))
    spec = validate_spec(raw, "auto.toml")
    with pytest.raises(SpecError, match="user_id.*'auto'.*dataset.json"):
        embedding_bag_configs(spec.features)
    with pytest.raises(SpecError, match="'auto'"):
        sized_spec(spec)


def test_an_auto_size_of_a_column_without_a_cardinality_is_a_data_error(
        tiny_dataset: DatasetManifest) -> None:
    raw = tiny_spec_dict(tiny_dataset.root)
    manifest = tiny_dataset.model_copy(deep=True)
    manifest.root = tiny_dataset.root
    next(c for c in manifest.columns if c.name == "hour").cardinality = None
    raw["features"]["fields"] = [{**f, "num_embeddings": "auto"} if f["name"] == "hour" else f
                                 for f in raw["features"]["fields"]]
    with pytest.raises(DataError, match=r"features.fields\[hour\].num_embeddings.*cardinality"):
        with_dataset_sizes(validate_spec(raw, "t"), manifest)


def test_spec_init_writes_a_commented_spec_that_trains(tiny_dataset: DatasetManifest,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "tiny.toml"
    assert main(["spec", "init", str(tiny_dataset.root), "--arch", "pin", "-o", str(out),
                 "--labels", "click"]) == 0
    text = out.read_text()
    assert text.startswith("# Spec for the dataset at") and "num_embeddings =" not in text
    spec = load_spec(out)
    assert spec.model.arch == "pin" and spec.model.tasks == ["click"]
    kinds = {f.name: (str(f.side), str(f.kind)) for f in spec.features.fields}
    for col in tiny_dataset.columns:  # every feature column, with the manifest's side and kind
        if col.role in ("dense", "sparse", "multi_sparse"):
            assert kinds.pop(col.name) == (str(col.side), str(col.role))
    assert kinds == {}
    assert spec.features.field("user_hist_categories").pooling == "mean"
    # a second init does not overwrite without --force
    assert main(["spec", "init", str(tiny_dataset.root), "-o", str(out)]) == 2
    # it trains, and the run records the sizes the dataset gave
    spec = load_spec(out, ["train.max_steps=3", "train.batch_size=64", "model.pin.subspaces=2"])
    run_training(spec, tmp_path / "run", progress=False)
    recorded = tomllib.loads((tmp_path / "run" / "spec.toml").read_text())
    sizes = {f["name"]: f.get("num_embeddings") for f in recorded["features"]["fields"]}
    assert sizes["user_id"] == TINY_SYNTHETIC["num_users"] and sizes["hour"] == 24
    # resuming with the same auto spec is the same experiment
    run_training(spec, tmp_path / "run", progress=False, resume=True)


def test_spec_init_refuses_what_it_cannot_write(tiny_dataset: DatasetManifest,
                                                tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.toml"
    assert main(["spec", "init", str(tiny_dataset.root), "--arch", "nope", "-o", str(out)]) == 2
    assert "unknown arch 'nope'" in capsys.readouterr().err
    assert main(["spec", "init", str(tiny_dataset.root), "--labels", "clack", "-o",
                 str(out)]) == 2
    assert "clack" in capsys.readouterr().err
    assert main(["spec", "init", str(tmp_path / "none"), "-o", str(out)]) == 2
    assert "dataset.json is missing" in capsys.readouterr().err
    assert not out.exists()


def _criteo_file(path: Path, rows: int, seed: int = 0) -> Path:
    """Criteo TSV with a click that depends on I1 and C1, so that training has a signal."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        i1, c1 = rng.randint(0, 20), rng.choice(["68fd1e64", "05db9164", "8cf07265"])
        click = int(rng.random() < (0.7 if c1 == "68fd1e64" or i1 > 15 else 0.2))
        ints = [str(i1)] + [str(rng.randint(0, 9)) if rng.random() < 0.8 else ""
                            for _ in range(12)]
        cats = [c1] + [f"{rng.randint(0, 50):08x}" for _ in range(25)]
        lines.append("\t".join([str(click), *ints, *cats]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_criteo_spec_trains_on_criteo_files_with_no_size_written(tmp_path: Path) -> None:
    raw = tomllib.loads((ROOT / "specs" / "criteo.toml").read_text())
    assert all("num_embeddings" not in f for f in raw["features"]["fields"])
    assert len(raw["features"]["fields"]) == 13 + 13 + 26
    source = _criteo_file(tmp_path / "train.txt", 3000)
    spec = load_spec(ROOT / "specs" / "criteo.toml", [
        f"data.prepare.input={source}", f"data.path={tmp_path / 'criteo'}",
        "data.prepare.hash_size=1000", "train.batch_size=256", "train.epochs=2",
        "train.eval_every_steps=1000", "train.checkpoint_every_steps=1000"])
    metrics = run_training(spec, tmp_path / "run", progress=False)
    recorded = tomllib.loads((tmp_path / "run" / "spec.toml").read_text())
    sizes = {f["name"]: f.get("num_embeddings") for f in recorded["features"]["fields"]}
    assert sizes["C1"] == 1001  # hash_size + the empty id
    assert sizes["I1_bucket"] == DatasetManifest.load(tmp_path / "criteo").column(
        "I1_bucket").cardinality
    assert metrics["test"]["auc"] > 0.6  # C1 and I1 carry the click
