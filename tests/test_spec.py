"""The spec: its schema (a union on ``model.arch``), loading, ``--set`` overrides, hashing, and the
errors that name the file and the key."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest

from recsys.errors import SpecError
from recsys.spec import (
    HEADLINE_METRICS,
    load_spec,
    only_arch_sections,
    spec_hash,
    validate_spec,
)

# ==================================================================================================
# specs

BASE_TOML = """\
name = "bad-input"

[data]
source = "synthetic"
path = "data/not-generated-yet"
labels = ["click"]

[features]
embedding_dim = 16

[[features.tables]]
name = "category"
num_embeddings = 12

[[features.fields]]
name = "user_id"
side = "user"
kind = "sparse"
num_embeddings = 10

[[features.fields]]
name = "item_category"
side = "item"
kind = "sparse"
table = "category"

[[features.fields]]
name = "price"
side = "item"
kind = "dense"

[model]
arch = "mlp"

[train]
batch_size = 32
"""


def write_spec(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def spec_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides=overrides or [])
    message = str(info.value)
    assert str(path) in message  # every problem names the file
    return message


def test_base_spec_is_valid(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE_TOML))
    assert spec.train.batch_size == 32
    assert [f.name for f in spec.features.fields] == ["user_id", "item_category", "price"]


def test_unknown_key_lists_the_valid_keys(tmp_path):
    path = write_spec(tmp_path, BASE_TOML.replace("batch_size = 32", "batch_sise = 32"))
    message = spec_error(path)
    assert "train.batch_sise" in message
    assert "unknown key" in message
    valid = message.split("expected one of:", 1)[1]
    for key in ("batch_size", "epochs", "seed", "max_steps"):
        assert key in valid


def test_unknown_key_inside_a_list_entry_names_the_entry(tmp_path):
    path = write_spec(tmp_path, BASE_TOML.replace('kind = "dense"', 'kind = "dense"\ncolour = 1'))
    message = spec_error(path)
    assert "features.fields[price].colour" in message
    assert "unknown key" in message and "side" in message


def test_wrong_type(tmp_path):
    path = write_spec(tmp_path, BASE_TOML.replace("batch_size = 32", 'batch_size = "big"'))
    message = spec_error(path)
    assert "train.batch_size" in message
    assert "'big'" in message


def test_impossible_value(tmp_path):
    path = write_spec(tmp_path, BASE_TOML.replace("batch_size = 32", "batch_size = 0"))
    message = spec_error(path)
    assert "train" in message and "batch_size must be > 0" in message


def test_missing_spec_file(tmp_path):
    path = tmp_path / "nowhere" / "spec.toml"
    message = spec_error(path)
    assert "not found" in message


def test_not_toml(tmp_path):
    message = spec_error(write_spec(tmp_path, "[data\npath = 3\n"))
    assert "TOML" in message


def test_feature_naming_an_undeclared_table(tmp_path):
    path = write_spec(tmp_path, BASE_TOML.replace('table = "category"', 'table = "categories"'))
    message = spec_error(path)
    assert "features" in message
    assert "item_category" in message  # the field
    assert "'categories'" in message  # the table it names
    assert "category" in message.split("'categories'", 1)[1]  # the known tables


def test_pin_subspaces_must_divide_the_embedding_dim(tmp_path):
    text = BASE_TOML.replace('arch = "mlp"', 'arch = "pin"\n\n[model.pin]\nsubspaces = 3')
    message = spec_error(write_spec(tmp_path, text))
    assert "model.pin.subspaces" in message
    assert "16" in message and "3" in message
    ok = BASE_TOML.replace('arch = "mlp"', 'arch = "pin"\n\n[model.pin]\nsubspaces = 4')
    assert load_spec(write_spec(tmp_path, ok, "ok.toml")).model.pin.subspaces == 4


def test_override_of_an_unknown_key_path(tmp_path):
    path = write_spec(tmp_path, BASE_TOML)
    message = spec_error(path, ["train.batch_sise=4096"])
    assert "train.batch_sise" in message and "unknown key" in message
    message = spec_error(path, ["trian.batch_size=4096"])
    assert "trian" in message and "unknown key" in message
    message = spec_error(path, ["features.fields.no_such_field.num_embeddings=3"])
    assert "no_such_field" in message and "user_id" in message
    message = spec_error(path, ["train.batch_size"])
    assert "KEY.PATH=VALUE" in message


def test_override_below_a_scalar_value(tmp_path):
    message = spec_error(write_spec(tmp_path, BASE_TOML), ["train.batch_size.x=1"])
    assert "'train.batch_size' is a value, not a section" in message
    message = spec_error(write_spec(tmp_path, BASE_TOML), ["data.labels.0.x=2"])
    assert "is a value, not a section" in message


def test_valid_overrides_change_the_value(tmp_path):
    path = write_spec(tmp_path, BASE_TOML)
    spec = load_spec(path, overrides=["train.batch_size=4096", "data.labels=[\"click\"]",
                                      "features.fields.user_id.num_embeddings=77",
                                      "features.fields.2.side=user", "model.arch=dcn",
                                      "name=renamed"])
    assert spec.train.batch_size == 4096
    assert spec.features.fields[0].num_embeddings == 77
    assert spec.features.fields[2].side == "user"
    assert spec.model.arch == "dcn"
    assert spec.name == "renamed"
    message = spec_error(path, ["train.batch_size=big"])  # read as a string, then rejected
    assert "train.batch_size" in message and "'big'" in message


def test_spec_hash_ignores_key_order_and_follows_values(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE_TOML))
    raw = spec.model_dump(mode="json")

    def reorder(obj):
        if isinstance(obj, dict):
            return {k: reorder(obj[k]) for k in reversed(list(obj))}
        if isinstance(obj, list):
            return [reorder(x) for x in obj]
        return obj

    reordered = reorder(copy.deepcopy(raw))
    assert list(reordered) != list(raw)
    h = spec_hash(spec)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert spec_hash(validate_spec(reordered)) == h
    assert spec_hash(validate_spec(raw)) == h
    # defaults written out or left implicit: the same resolved spec
    assert spec_hash(load_spec(write_spec(tmp_path, BASE_TOML + "epochs = 1\n", "b.toml"))) == h
    changed = copy.deepcopy(raw)
    changed["train"]["batch_size"] = 33
    assert spec_hash(validate_spec(changed)) != h
    assert spec_hash(load_spec(write_spec(tmp_path, BASE_TOML), ["train.seed=1"])) != h


def test_headline_metric_must_be_a_known_metric(tmp_path):
    assert "auc" in HEADLINE_METRICS and HEADLINE_METRICS["logloss"] is False
    message = spec_error(write_spec(tmp_path, BASE_TOML), ['train.headline_metric="accuracy"'])
    assert "train: headline_metric must be one of auc, " in message
    spec = load_spec(write_spec(tmp_path, BASE_TOML), ['train.headline_metric="logloss"',
                                                       'train.cascade_label="click"'])
    assert spec.train.headline_metric == "logloss" and spec.train.cascade_label == "click"


def test_a_section_of_another_arch_names_the_key_and_its_owners(tmp_path):
    message = spec_error(write_spec(tmp_path, BASE_TOML + "\n[model.moe]\ntop_k = 2\n"))
    assert "model.moe: unknown key for arch 'mlp' (a [model.moe] section belongs to arch moe)" \
        in message
    message = spec_error(write_spec(tmp_path, BASE_TOML), ['model.arch="tree"'])
    assert "model.arch: unknown arch 'tree'; expected one of: dcn, deepfm, dlrm," in message


def test_the_arch_may_be_left_out_and_defaults_to_mlp(tmp_path):
    text = BASE_TOML.replace('arch = "mlp"\n', 'tasks = ["click"]\n')
    spec = load_spec(write_spec(tmp_path, text))
    assert spec.model.arch == "mlp" and not hasattr(spec.model, "pin")


def test_a_resolved_spec_holds_only_the_chosen_arch_sections(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE_TOML), ['model.arch="dynint"'])
    dumped = spec.model.model_dump()
    assert {"pin", "dynint"} <= set(dumped) and not {"mlp", "dcn", "moe"} & set(dumped)


def test_only_arch_sections_drops_other_archs_sections_and_keeps_typos():
    raw = {"model": {"arch": "pin", "dcn": {"num_layers": 2}, "pin": {}, "pni": {}}}
    assert only_arch_sections(raw) == {"model": {"arch": "pin", "pin": {}, "pni": {}}}


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "specs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_spec_validates(path: Path) -> None:
    raw = tomllib.loads(path.read_text())
    raw_input = raw.get("data", {}).get("prepare", {}).get("input")
    if raw_input and not Path(raw_input).exists() and not (ROOT / raw_input).exists():
        pytest.skip(f"raw data {raw_input} is not on this machine")
    spec = validate_spec(raw, str(path))
    assert spec.name


def test_every_optional_spec_field_defaults_to_none() -> None:
    """TOML has no null, so a resolved spec leaves None out; that round-trips only when None is
    the field's default (in every arch's model section too)."""
    from pydantic import BaseModel

    from recsys.models.archs import ARCHS
    from recsys.spec import Spec
    from recsys.spec.io import _model_in

    def walk(model: type[BaseModel], path: str) -> list[str]:
        bad = []
        for name, f in model.model_fields.items():
            if type(None) in getattr(f.annotation, "__args__", ()) and f.default is not None:
                bad.append(f"{path}{name}")
            inner = _model_in(f.annotation)
            if inner is not None:
                bad += walk(inner, f"{path}{name}.")
        return bad

    assert walk(Spec, "") == []
    for name, arch in ARCHS.items():
        assert walk(arch.model, f"model[{name}].") == []
