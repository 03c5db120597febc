"""A model trained on N processes is the same model on 1 process and after export.

Under DistributedModelParallel the pooled embeddings come out grouped by shard, in an order that
depends on the sharding plan; the over-arch must still see the spec's feature order. Each plan is
trained on 2 processes, then scored on 1 process (the checkpoint resharded by DCP), exported to
TorchScript, and scored by ``recsys predict`` on the exported module (one plan is also re-evaluated
on 2 processes). The metrics match the ones the 2-process run recorded within 1e-6, and the scores
of every path match row by row.
Checkpoints also resume on another number of processes (2 -> 1 and 1 -> 2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import tiny_spec_dict

from recsys.cli import main
from recsys.data.schema import DatasetManifest
from recsys.export.predictor import Predictor
from recsys.export.torchscript import export_run
from recsys.spec import dump_toml, load_spec, validate_spec
from recsys.train import checkpoint
from recsys.train.run import evaluate_run, run_training

ROOT = Path(__file__).resolve().parents[1]
# the tables each plan constrains (the others are left to the planner, so every plan mixes
# sharding types and the pooled order differs from the spec's)
CONSTRAINED = ("user_id", "item_id", "category")


def _spec(root: Path, sharding: str | None = None, **train: Any) -> dict[str, Any]:
    raw = tiny_spec_dict(root)
    raw["model"] = {"arch": "mlp", "tasks": ["click"], "mlp": {"hidden": [32, 16]}}
    raw["data"]["labels"] = ["click"]
    raw["train"] = {"batch_size": 128, "seed": 5, "epochs": 1, "eval_cascade": False, **train}
    raw["distributed"] = {"world_size": 2}
    if sharding:
        raw["distributed"]["sharding"] = [{"table": t, "types": [sharding]} for t in CONSTRAINED]
    return raw


def _write_spec(raw: dict[str, Any], path: Path) -> Path:
    path.write_text(dump_toml(validate_spec(raw)))
    return path


def _recsys(*args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``recsys ARGS`` on ``nproc`` processes (torchrun when more than one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "recsys.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _metrics(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _evaluate(run: Path, nproc: int) -> dict[str, Any]:
    """``recsys evaluate RUN`` on ``nproc`` processes (one: in this process)."""
    if nproc == 1:
        evaluate_run(run, progress=False)
    else:
        _recsys("evaluate", str(run), nproc=nproc)
    return _metrics(run / "evaluation.json")


def _plan_of(run_dir: Path) -> dict[str, str]:
    log = (run_dir / "train.log").read_text()
    return {cells[0]: cells[1] for line in log.splitlines() if line.startswith("| model.ebc.")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def _close(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...] = ("auc", "logloss",
                                                                            "calibration")
           ) -> None:
    for k in keys:
        assert abs(a[k] - b[k]) <= 1e-6, (k, a[k], b[k])


@pytest.fixture(scope="module")
def column_wise_run(tiny_dataset: DatasetManifest, tmp_path_factory: pytest.TempPathFactory
                    ) -> tuple[Path, Path]:
    """(spec, run) of a column-wise plan trained on 2 processes for 2 epochs with a checkpoint
    every 10 steps: the parity test scores it (a copy) and the resume test cuts it short.
    Read-only: tests copy it before writing into it."""
    tmp = tmp_path_factory.mktemp("column_wise")
    raw = _spec(tiny_dataset.root, "column_wise", epochs=2, checkpoint_every_steps=10,
                keep_checkpoints=20)
    spec = _write_spec(raw, tmp / "spec.toml")
    _recsys("train", str(spec), "--run-dir", str(tmp / "whole"), "--no-progress", nproc=2)
    return spec, tmp / "whole"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "table_column_wise"])
def test_model_trained_on_two_processes_scores_the_same_everywhere(
        tiny_dataset: DatasetManifest, tmp_path: Path, sharding: str,
        column_wise_run: tuple[Path, Path]) -> None:
    run = tmp_path / "run"
    if sharding == "column_wise":  # the run the resume test starts from (a copy of it)
        shutil.copytree(column_wise_run[1], run)
    else:
        spec = _write_spec(_spec(tiny_dataset.root, sharding), tmp_path / "spec.toml")
        _recsys("train", str(spec), "--run-dir", str(run), "--no-progress", nproc=2)
    plan = _plan_of(run)
    assert {plan[f"model.ebc.{t}"] for t in CONSTRAINED} == {sharding}
    recorded = _metrics(run / "metrics.json")["test"]
    assert recorded["auc"] > 0.6  # it learned: parity of an untrained model proves little

    # 1 process (the checkpoint resharded): the recorded metrics
    evaluate_run(run, progress=False, scores=tmp_path / "one.parquet")
    one = _metrics(run / "evaluation.json")
    assert one["world_size"] == 1
    _close(one["test"], recorded)
    assert _metrics(run / "metrics.json")["test"] == recorded  # evaluate leaves it alone
    one_scores = pq.read_table(tmp_path / "one.parquet").column("click").to_numpy()
    assert len(one_scores) == recorded["rows"]
    if sharding == "table_wise":  # (one plan is enough for the 2-process re-evaluation)
        # 2 processes again: the same metrics, and the same scores row by row as on 1
        _recsys("evaluate", str(run), "--scores", str(tmp_path / "two.parquet"), nproc=2)
        _close(_metrics(run / "evaluation.json")["test"], recorded)
        two_scores = pq.read_table(tmp_path / "two.parquet").column("click").to_numpy()
        np.testing.assert_allclose(one_scores, two_scores, rtol=0, atol=1e-6)

    # the export: its parity check compares with the run's recorded metrics, not only eager
    info = export_run(run, tmp_path / "export")
    assert info["parity"]["recorded"]["available"]
    assert abs(info["parity"]["recorded"]["tasks"]["click"]["auc_change"]) <= 1e-6
    assert abs(info["parity"]["tasks"]["click"]["auc_exported"] - recorded["auc"]) <= 1e-6

    # predict on the test split's files, in file order: the same scores row by row
    predictor = Predictor.load(tmp_path / "export")
    files = tiny_dataset.files("impressions", "test")
    predicted = np.concatenate([predictor.predict_table(pq.read_table(f), where=str(f))["click"]
                                for f in files])
    np.testing.assert_allclose(predicted, one_scores, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_checkpoints_resume_and_evaluate_on_another_number_of_processes(
        column_wise_run: tuple[Path, Path], tmp_path: Path) -> None:
    """2 -> 1 and 1 -> 2: a run cut short on one world size finishes on the other, keeps its
    training curve, and ends within seed spread of the uninterrupted run. The one-process side
    runs in this process (the same code as ``recsys train`` / ``recsys evaluate`` on one process,
    without a second interpreter start)."""
    spec, whole = column_wise_run
    full = _metrics(whole / "metrics.json")["test"]
    steps = _metrics(whole / "run.json")["steps"]

    for name, first, then in (("two-to-one", 2, 1), ("one-to-two", 1, 2)):
        cut = tmp_path / name
        if first == 2:
            shutil.copytree(whole, cut)
        else:
            run_training(load_spec(spec), cut, progress=False)
        # as if killed after step 20: later checkpoints and the results are gone
        for path in checkpoint.checkpoint_dir(cut).iterdir():
            if int(path.name.split("-")[1]) > 20:
                shutil.rmtree(path)
        for name_ in ("metrics.json", "run.json", "history.json"):
            (cut / name_).unlink()
        # the step-20 model scored on the world size that wrote it, then resharded onto the
        # other one: the same metrics within 1e-6
        own = _evaluate(cut, nproc=first)
        other = _evaluate(cut, nproc=then)
        assert own["checkpoint"] == other["checkpoint"] == "step-0000020"
        assert (own["world_size"], other["world_size"]) == (first, then)
        for split in ("valid", "test"):
            _close(own[split], other[split], ("auc", "gauc", "logloss", "calibration"))
        if then == 2:
            _recsys("train", str(spec), "--run-dir", str(cut), "--resume", "--no-progress",
                    nproc=2)
        else:
            run_training(load_spec(spec), cut, progress=False, resume=True)
        done = _metrics(cut / "metrics.json")["test"]
        assert _metrics(cut / "run.json")["steps"] == steps
        history = _metrics(cut / "history.json")
        assert history["steps"][0] == 1 and history["steps"][-1] >= steps - 10  # kept the start
        assert abs(done["auc"] - full["auc"]) < 0.01, (name, done["auc"], full["auc"])


@pytest.mark.slow
@pytest.mark.distributed
def test_a_checkpoint_that_does_not_fit_is_one_line_on_every_rank(
        tiny_dataset: DatasetManifest, tmp_path: Path) -> None:
    # the checkpoint is written by one process (here, in this process); two then load it
    spec = _write_spec(_spec(tiny_dataset.root, max_steps=5), tmp_path / "spec.toml")
    run = tmp_path / "run"
    run_training(load_spec(spec), run, progress=False)
    other = _spec(tiny_dataset.root, max_steps=5)
    other["model"]["mlp"]["hidden"] = [48, 16]  # the checkpoint's layers no longer fit
    (run / "spec.toml").write_text(dump_toml(validate_spec(other)))
    done = _recsys("evaluate", str(run), nproc=2, check=False)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    # one line from each rank (torchrun may stop the second rank before it prints)
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, done.stderr[-3000:]
    assert all("step-0000005" in e and "cannot load this checkpoint" in e for e in errors)
    assert "/recsys/" not in done.stderr  # no traceback through our code


@pytest.mark.slow
@pytest.mark.distributed
def test_the_quickstart_spec_is_one_experiment_on_one_and_two_processes(tmp_path: Path) -> None:
    """specs/quickstart.toml (its model, optimizers and global batch) on a world a tenth its size,
    one epoch: 1 and 2 processes reach the same test AUC and log-loss within 0.005 (the seed
    spread of one process here is about 0.003)."""
    small = ["--set", f"data.path={tmp_path / 'data'}",
             "--set", "data.synthetic.requests.train=30000",
             "--set", "data.synthetic.requests.valid=2000",
             "--set", "data.synthetic.requests.test=5000",
             "--set", "train.epochs=1", "--set", "train.eval_cascade=false"]
    assert main(["data", "synth", str(ROOT / "specs/quickstart.toml"), *small]) == 0
    runs = {}
    for nproc in (1, 2):
        run = tmp_path / f"run{nproc}"
        if nproc == 1:  # in this process: `recsys train` on one process, one interpreter start less
            run_training(load_spec(ROOT / "specs/quickstart.toml", small[1::2]), run,
                         progress=False)
        else:
            _recsys("train", "specs/quickstart.toml", *small, "--run-dir", str(run),
                    "--no-progress", nproc=nproc)
        runs[nproc] = _metrics(run / "metrics.json")
        assert _metrics(run / "run.json")["world_size"] == nproc
    one, two = runs[1]["test"], runs[2]["test"]
    print(f"quickstart (a tenth): test AUC 1 process {one['auc']:.4f}, 2 processes "
          f"{two['auc']:.4f}; log-loss {one['logloss']:.4f} vs {two['logloss']:.4f}")
    assert one["rows"] == two["rows"]
    assert one["auc"] > runs[1]["oracle"]["auc"] - 0.08  # it learned (a tenth of the data)
    assert abs(one["auc"] - two["auc"]) < 0.005, (one["auc"], two["auc"])
    assert abs(one["logloss"] - two["logloss"]) < 0.005, (one["logloss"], two["logloss"])
