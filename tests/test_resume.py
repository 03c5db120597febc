"""Checkpoints: a 2-rank run killed mid-training and resumed ends with the metrics of an
uninterrupted run; `recsys evaluate` recomputes a run's metrics from its last checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import processes_with, tiny_spec_dict

from recsys.spec import dump_toml, validate_spec
from recsys.train import checkpoint
from recsys.train.run import evaluate_run

ROOT = Path(__file__).resolve().parents[1]


def _spec_file(dataset_root: Path, tmp: Path) -> Path:
    raw = tiny_spec_dict(dataset_root)
    raw["model"] = {"arch": "mlp", "tasks": ["click"], "mlp": {"hidden": [32, 16]}}
    raw["data"]["labels"] = ["click"]
    raw["train"] = {"batch_size": 64, "seed": 11, "epochs": 2, "checkpoint_every_steps": 25,
                    "keep_checkpoints": 2, "eval_every_steps": 100,
                    "lr_schedule": "cosine", "warmup_steps": 20}
    raw["distributed"] = {"world_size": 2}
    path = tmp / "spec.toml"
    path.write_text(dump_toml(validate_spec(raw)))
    return path


def _cmd(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "recsys.cli", *args, "--no-progress"][
        : None if args[0] == "train" else -1]


def _kill_everything_running(marker: str) -> None:
    """SIGKILL every process whose command line names ``marker`` (the workers sit in their own
    process groups, so killing the launcher's group would leave them running)."""
    for pid, _ in processes_with(marker):
        with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
            os.kill(pid, signal.SIGKILL)


def _run(*args: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if args[0] == "evaluate":  # evaluation.json; the run's own metrics.json stays as it was
        return json.loads((Path(args[1]) / "evaluation.json").read_text())
    run_dir = Path(args[args.index("--run-dir") + 1])
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tiny_dataset,
                                                               tmp_path: Path) -> None:
    spec = _spec_file(tiny_dataset.root, tmp_path)
    whole = _run("train", str(spec), "--run-dir", str(tmp_path / "whole"))

    # the same run, killed (SIGKILL to the whole process group) once a checkpoint exists
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd("train", str(spec), "--run-dir", str(killed)), cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while checkpoint.latest(killed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    _kill_everything_running(str(killed))  # torchrun's agent and both workers, mid-step
    proc.wait()
    assert proc.returncode != 0, "the run finished before it could be killed"
    assert not (killed / "metrics.json").exists()
    at = checkpoint.latest(killed)
    assert at is not None and int(at.name.split("-")[1]) < whole["tasks"]["test"]["click"]["rows"]

    resumed = _run("train", str(spec), "--run-dir", str(killed), "--resume")
    log = (killed / "train.log").read_text()
    assert f"resumed from {at}" in log
    for split in ("valid", "test"):
        for key in ("auc", "gauc", "logloss", "calibration", "ece"):
            assert resumed[split][key] == pytest.approx(whole[split][key], abs=1e-6), (split, key)
    # the training curve keeps the steps before the kill: the same curve as the whole run's
    curve = json.loads((killed / "history.json").read_text())
    whole_curve = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert curve["steps"] == whole_curve["steps"] and curve["steps"][0] == 1
    assert curve["loss"] == pytest.approx(whole_curve["loss"], abs=1e-6)
    # the checkpoint directory keeps only the newest two, and nothing half-written
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert len(names) == 2 and not any(n.endswith(".partial") for n in names)

    # re-evaluation: the same numbers from the final checkpoint (here on one process, the
    # checkpoint resharded; tests/test_world_size.py runs `recsys evaluate` on two)
    again = evaluate_run(tmp_path / "whole", progress=False)
    assert again["test"]["auc"] == pytest.approx(whole["test"]["auc"], abs=1e-6)
    assert again["test"]["logloss"] == pytest.approx(whole["test"]["logloss"], abs=1e-6)
