"""``recsys tune``: the [tune] section's checks, the default spaces, and studies on the tiny
synthetic data (failures recorded, pruning, resuming, the outputs, worker processes)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import tiny_spec_dict

from recsys.cli import main
from recsys.data.schema import DatasetManifest
from recsys.errors import RunError, SpecError
from recsys.models.archs import ARCHS
from recsys.spec import dump_toml, load_spec, validate_spec
from recsys.tune import TuneOptions, plan_study, run_study
from recsys.tune import study as study_module
from recsys.tune.trial import TrialFailed, final_value

LR = "train.dense_optimizer.lr"
HIDDEN = "model.mlp.hidden"


def tune_raw(data: Path, space: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The tiny spec, a few steps with a validation at step 2, and a [tune] section."""
    raw = tiny_spec_dict(data)
    raw["model"]["tasks"] = ["click"]
    raw["train"].update(batch_size=256, max_steps=4, eval_every_steps=2, eval_cascade=False)
    raw["tune"] = {"space": space if space is not None else [
        {"key": LR, "type": "float", "low": 1e-3, "high": 1e-1, "log": True},
        {"key": HIDDEN, "type": "categorical", "choices": [[32], [64, 32]]}],
        "startup_trials": 2}
    return raw


def write_spec(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(dump_toml(validate_spec(copy.deepcopy(raw), str(path))))
    return path


@pytest.fixture
def tune_spec(tmp_path: Path, tiny_dataset: DatasetManifest) -> Path:
    return write_spec(tmp_path / "tiny.toml", tune_raw(tiny_dataset.root))


# ---- the [tune] section ---------------------------------------------------------------------------

def entry(key: str, **kwargs: Any) -> dict[str, Any]:
    return {"key": key, **kwargs}


BAD_ENTRIES = [
    (entry(LR, type="float", low=0.0, high=0.1, log=True),
     "tune.space[train.dense_optimizer.lr].low: must be > 0 for a log distribution, got 0.0"),
    (entry("model.mlp.dropout", type="float", low=0.3, high=0.1),
     "tune.space[model.mlp.dropout].low: must be < high (0.1), got 0.3"),
    (entry(HIDDEN, type="categorical", choices=[]),
     "tune.space[model.mlp.hidden].choices: must list at least one value"),
    (entry("model.dcn.num_layers", type="int", low=1.5, high=4),
     "tune.space[model.dcn.num_layers].low: must be an integer for an int distribution"),
    (entry("train.bogus", type="int", low=1, high=4),
     "tune.space[train.bogus]: unknown spec key 'train.bogus'; expected one of:"),
    (entry("model.pin.subspaces", type="int", low=1, high=4),  # a section of another arch
     "tune.space[model.pin.subspaces]: unknown spec key 'model.pin'"),
    (entry("train.interaction_optimizer.lr", type="float", low=1e-3, high=1e-1),
     "tune.space[train.interaction_optimizer.lr]: 'train.interaction_optimizer' is not set in "
     "this spec"),
    (entry("features.fields.nope.embedding_dim", type="int", low=4, high=8),
     "tune.space[features.fields.nope.embedding_dim]: no entry 'nope' in features.fields"),
    (entry("train.batch_size", type="int", low=0, high=512),  # a value the spec rejects alone
     "tune.space[train.batch_size].low: 0 gives an invalid spec: train: batch_size "
     "must be > 0, got 0"),
    (entry("model.mlp.dropout", type="categorical", choices=[0.1, "high"]),
     "tune.space[model.mlp.dropout].choices[1]: 'high' gives an invalid spec: model.mlp.dropout:"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_ENTRIES, ids=[m.split(":")[0] + str(i) for i, (_, m)
                                                               in enumerate(BAD_ENTRIES)])
def test_bad_space_entries_are_spec_errors_naming_the_key(
        tmp_path: Path, tiny_dataset: DatasetManifest, bad: dict[str, Any], message: str) -> None:
    path = write_spec_unchecked(tmp_path / "bad.toml", tune_raw(tiny_dataset.root, [bad]))
    with pytest.raises(SpecError) as info:
        plan_study(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(message), info.value.problems[0]
    assert str(path) in str(info.value)


def write_spec_unchecked(path: Path, raw: dict[str, Any]) -> Path:
    """A spec file as given (its [tune] section may be invalid), through the TOML writer."""
    from recsys.spec.io import _to_toml

    path.write_text(_to_toml(raw))
    return path


def test_a_key_listed_twice_and_a_bad_metric_are_spec_errors(
        tmp_path: Path, tiny_dataset: DatasetManifest) -> None:
    twice = tune_raw(tiny_dataset.root, [entry(LR, type="float", low=1e-3, high=1e-2)] * 2)
    with pytest.raises(SpecError, match=r"tune\.space\[train\.dense_optimizer\.lr\]: listed "
                                        r"twice"):
        plan_study(write_spec_unchecked(tmp_path / "twice.toml", twice))
    metric = tune_raw(tiny_dataset.root)
    metric["tune"]["metric"] = "accuracy"
    with pytest.raises(SpecError, match="tune.metric: must be one of auc, .*got 'accuracy'"):
        plan_study(write_spec_unchecked(tmp_path / "metric.toml", metric))


def test_a_spec_without_tune_keeps_its_hash_and_round_trips(tiny_dataset: DatasetManifest
                                                            ) -> None:
    from recsys.spec import spec_hash, spec_to_dict

    raw = tiny_spec_dict(tiny_dataset.root)
    spec = validate_spec(raw)
    assert spec.tune is None and "tune" not in spec_to_dict(spec)
    with_tune = validate_spec(tune_raw(tiny_dataset.root))
    assert spec_hash(with_tune) != spec_hash(validate_spec(
        {**tune_raw(tiny_dataset.root), "tune": {}}))
    reread = validate_spec(__import__("tomllib").loads(dump_toml(with_tune)))
    assert reread == with_tune


def test_values_are_set_by_key_path_and_tables_merge() -> None:
    from recsys.tune.space import apply_params

    raw = {"features": {"fields": [{"name": "user_id", "kind": "sparse"}]},
           "model": {"arch": "moe", "moe": {"top_k": 2, "depths": 4}, "pin": {"num_layers": 2}}}
    out = apply_params(raw, {"features.fields.user_id.embedding_dim": 32,
                             "model.moe": {"experts": ["cross", "pin"], "top_k": 1},
                             "train.dense_optimizer.lr": 0.01})
    assert out == {"features": {"fields": [{"name": "user_id", "kind": "sparse",
                                            "embedding_dim": 32}]},
                   "model": {"arch": "moe",  # (and another arch's section dropped)
                             "moe": {"top_k": 1, "depths": 4, "experts": ["cross", "pin"]}},
                   "train": {"dense_optimizer": {"lr": 0.01}}}
    assert raw["model"]["moe"] == {"top_k": 2, "depths": 4}  # the base is left as it was


# ---- default spaces -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_default_space_of_every_arch_resolves(tmp_path: Path, tiny_dataset: DatasetManifest,
                                              arch: str) -> None:
    raw = tune_raw(tiny_dataset.root, [])
    raw["model"] = {"arch": arch, "tasks": ["click"]}
    plan = plan_study(write_spec(tmp_path / f"{arch}.toml", raw))
    params = {p.name: p for p in plan.params}
    # a decade either side of the spec's own learning rates (sparse 0.05, dense 1e-3)
    sparse = params["train.sparse_optimizer.lr"].distribution
    assert (sparse.low, sparse.high, sparse.log) == pytest.approx((0.005, 0.5, True))
    dense = params[LR].distribution
    assert (dense.low, dense.high) == pytest.approx((1e-4, 1e-2))
    model_sections = set(ARCHS[arch].model.model_fields)
    assert ({"model.mlp.hidden", "model.mlp.dropout"} <= set(params)) == ("mlp" in model_sections)
    assert ("model.pin.subspaces" in params) == ("pin" in model_sections)


def test_default_space_drops_values_the_spec_rejects_and_adds_method_knobs(
        tmp_path: Path, tiny_dataset: DatasetManifest) -> None:
    """PIN on 4-dim fields: 8 subspaces cannot divide 4, so that choice goes; gftrl brings its
    λ1 / λ2, the hierarchical loss its λ and RVQ sizes; AdaEnsemble's expert sets keep their
    prior summing to 1."""
    raw = tune_raw(tiny_dataset.root, [])
    raw["model"] = {"arch": "pin", "tasks": ["click"], "interaction_dim": 4}
    raw["train"]["sparse_optimizer"] = {"name": "gftrl", "lr": 0.02}
    raw["loss"] = {"hierarchical": {"weight": 0.3}}
    params = {p.name: p for p in plan_study(write_spec(tmp_path / "pin.toml", raw)).params}
    assert params["model.pin.subspaces"].distribution.choices == (1, 2, 4)
    for key in ("train.sparse_optimizer.ftrl.l1", "train.sparse_optimizer.ftrl.l2",
                "loss.hierarchical.weight", "loss.hierarchical.rvq.codes",
                "loss.hierarchical.rvq.levels"):
        assert key in params, key
    assert "train.dense_optimizer.ftrl.l1" not in params  # the dense optimizer is adam

    raw["model"] = {"arch": "moe", "tasks": ["click"]}
    moe = {p.name: p for p in plan_study(write_spec(tmp_path / "moe.toml", raw)).params}
    sets = [moe["model.moe"].decode(c) for c in moe["model.moe"].distribution.choices]
    assert [len(s["experts"]) for s in sets] == [3, 4, 5]
    assert sets[0]["expert_prior"] == pytest.approx([0.25, 0.25, 0.5])
    assert all(sum(s["expert_prior"]) == pytest.approx(1.0) for s in sets)


# ---- studies --------------------------------------------------------------------------------------

def rows_of(study_dir: Path) -> list[dict[str, Any]]:
    return json.loads((study_dir / "trials.json").read_text())["trials"]


def load(study_dir: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'study.db'}")


def test_study_records_a_crash_prunes_and_resumes(tune_spec: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = study_module.train_in_process

    def crash_trial_1(spec: Any, run_dir: Path, metric: str, report: Any) -> float:
        if run_dir.name == "0001":
            raise RuntimeError("simulated crash")
        return real(spec, run_dir, metric, report)

    monkeypatch.setattr(study_module, "train_in_process", crash_trial_1)
    options = TuneOptions(trials=3, study_dir=tmp_path / "studies", in_process=True,
                          pruner=optuna.pruners.NopPruner())
    result = run_study(tune_spec, options)
    study_dir = tmp_path / "studies" / "tiny"
    assert result.study_dir == study_dir and result.states == {"COMPLETE": 2, "FAIL": 1}
    rows = rows_of(study_dir)
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert rows[1]["error"].startswith("RuntimeError: simulated crash")
    assert "simulated crash" in (study_dir / "trials" / "0001.log").read_text()  # its traceback

    # the table's values are the study's, and each is its run's final valid AUC (never test)
    study = load(study_dir)
    assert [r["value"] for r in rows] == [t.value for t in study.trials]
    for row in (rows[0], rows[2]):
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert row["value"] == metrics["valid"]["auc"] != metrics["test"]["auc"]
    md = (study_dir / "trials.md").read_text()
    assert "too few complete trials for importances (2" in md and "simulated crash" in md

    # best.toml: a complete spec with the best trial's values, without the [tune] section
    best = study.best_trial
    assert result.best_number == best.number and result.best_value == best.value
    spec = load_spec(study_dir / "best.toml")
    assert spec.tune is None and spec.name == "tiny"
    assert spec.train.dense_optimizer.lr == best.params[LR]
    assert spec.model.mlp.hidden == json.loads(best.params[HIDDEN])
    assert spec.train.max_steps == 4  # the base spec's other values

    # the same command again: one more trial in the same study, pruned at its validation
    always = optuna.pruners.ThresholdPruner(lower=2.0)  # any AUC is below 2
    again = run_study(tune_spec, TuneOptions(trials=1, study_dir=tmp_path / "studies",
                                             in_process=True, pruner=always))
    assert again.states == {"COMPLETE": 2, "FAIL": 1, "PRUNED": 1}
    rows = rows_of(study_dir)
    assert len(load(study_dir).trials) == 4 and rows[3]["pruned_at_step"] == 2
    assert not (Path(rows[3]["run_dir"]) / "metrics.json").exists()  # stopped at step 2
    assert rows[3]["params"] != rows[0]["params"]  # a resumed study samples anew

    # another spec may not join the study
    with pytest.raises(RunError, match="was started from spec hash"):
        run_study(tune_spec, TuneOptions(trials=1, study_dir=tmp_path / "studies",
                                         overrides=["train.max_steps=6"], in_process=True))


def test_invalid_sampled_combinations_fail_their_trials_not_the_study(
        tmp_path: Path, tiny_dataset: DatasetManifest) -> None:
    """fp16 tables and a data-parallel table are each fine alone, not together: every trial is
    a FAIL with the spec's message, and the study ends normally without a best spec."""
    space = [entry("features.data_type", type="categorical", choices=["fp16"]),
             entry("distributed.sharding", type="categorical",
                   choices=[[{"table": "hour", "types": ["data_parallel"]}]])]
    path = write_spec(tmp_path / "clash.toml", tune_raw(tiny_dataset.root, space))
    result = run_study(path, TuneOptions(trials=2, study_dir=tmp_path / "studies",
                                         in_process=True))
    assert result.states == {"FAIL": 2} and result.best_spec is None
    study_dir = tmp_path / "studies" / "tiny"
    assert not (study_dir / "best.toml").exists()
    for row in rows_of(study_dir):
        assert row["error"].startswith("invalid spec: distributed.sharding[table=hour].types: "
                                       "table 'hour' is fp16"), row["error"]
        assert row["params"]["distributed.sharding"] == [{"table": "hour",
                                                          "types": ["data_parallel"]}]


def test_a_nan_metric_is_a_failure() -> None:
    assert final_value({"valid": {"auc": 0.75}, "test": {"auc": 0.9}}, "auc") == 0.75
    with pytest.raises(TrialFailed, match="the final valid logloss is nan"):
        final_value({"valid": {"logloss": float("nan")}}, "logloss")
    with pytest.raises(TrialFailed, match="the final valid auc is None"):
        final_value({"valid": {"auc": None}}, "auc")


def test_cli_reports_bad_options_and_bad_spaces(tune_spec: Path, tmp_path: Path,
                                                tiny_dataset: DatasetManifest,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", str(tune_spec), "--trials", "0"]) == 2
    assert "error: --trials must be >= 1, got 0" in capsys.readouterr().err
    assert main(["tune", str(tune_spec), "--trials", "1", "--study", "a/b",
                 "--study-dir", str(tmp_path)]) == 2
    assert "error: --study 'a/b'" in capsys.readouterr().err
    bad = write_spec_unchecked(tmp_path / "bad.toml", tune_raw(tiny_dataset.root, [BAD_ENTRIES[0][0]]))
    assert main(["tune", str(bad), "--trials", "1", "--study-dir", str(tmp_path)]) == 2
    assert BAD_ENTRIES[0][1] in capsys.readouterr().err


@pytest.mark.slow
def test_trials_in_worker_processes_two_at_a_time(tune_spec: Path, tmp_path: Path) -> None:
    """The default: each trial in its own process, two at a time; the values are the runs'."""
    result = run_study(tune_spec, TuneOptions(trials=2, jobs=2, study_dir=tmp_path / "studies"))
    assert result.states == {"COMPLETE": 2}
    study_dir = tmp_path / "studies" / "tiny"
    for row in rows_of(study_dir):
        run_dir = Path(row["run_dir"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert row["value"] == metrics["valid"]["auc"]
        assert "wrote" in run_dir.with_suffix(".log").read_text()  # the worker's own output
    assert load_spec(study_dir / "best.toml").train.dense_optimizer.lr == \
        load(study_dir).best_trial.params[LR]
