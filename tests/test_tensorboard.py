"""TensorBoard events of a training run (RUN/tb), read back with TensorBoard's own reader: the
scalars are the values history.json and metrics.json hold, the plots are there at their sizes, and
a crash-and-resume leaves one point per step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import pytest
from conftest import tiny_spec_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recsys.run_dir import RunDir
from recsys.spec import validate_spec
from recsys.train.run import run_training
from recsys.train.tensorboard import NullBoard, RunBoard, open_board

STEPS, EVAL_EVERY = 40, 10


def _spec(dataset_root: Path, steps: int = STEPS) -> Any:
    raw = tiny_spec_dict(dataset_root)
    raw["model"] = {"arch": "mlp", "tasks": ["click"], "mlp": {"hidden": [16]}}
    raw["data"]["labels"] = ["click"]
    raw["train"] = {"batch_size": 128, "seed": 7, "epochs": 1, "max_steps": steps,
                    "eval_every_steps": EVAL_EVERY, "checkpoint_every_steps": EVAL_EVERY,
                    "keep_checkpoints": 5, "lr_schedule": "cosine",
                    "sparse_optimizer": {"lr": 0.03}}
    return validate_spec(raw)


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(RunDir(run).tensorboard), size_guidance={"scalars": 0,
                                                                          "images": 0})
    acc.Reload()
    return acc


def _series(acc: EventAccumulator, tag: str) -> dict[int, float]:
    points = acc.Scalars(tag)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{tag}: duplicate steps {steps}"
    return {p.step: p.value for p in points}


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("tb") / "run"
    run_training(_spec(tiny_dataset.root), run, progress=False)
    return run


def test_scalars_are_the_run_s_history_and_metrics(trained: Path) -> None:
    history = json.loads((trained / "history.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    acc = _events(trained)
    tags = set(acc.Tags()["scalars"])

    loss = _series(acc, "train/loss")
    assert sorted(loss) == history["steps"] == [1, 10, 20, 30, 40]
    for step, value in zip(history["steps"], history["loss"], strict=True):
        assert loss[step] == pytest.approx(value, abs=1e-6)
    dense_lr = _series(acc, "lr/dense")
    for step, value in zip(history["steps"], history["lr"], strict=True):
        assert dense_lr[step] == pytest.approx(value, rel=1e-6)
    # cosine decay over 40 steps: the last logged rate is below the first
    assert dense_lr[40] < dense_lr[1]
    assert list(_series(acc, "lr/sparse").values()) == pytest.approx([0.03] * 5)  # constant
    for key, values in history["stats"].items():
        assert list(_series(acc, f"objective/{key}").values()) == pytest.approx(values, abs=1e-6)
    # throughput from the second logged step on (the first only starts the clock)
    speed = _series(acc, "train/samples_per_second")
    assert sorted(speed) == [10, 20, 30, 40] and min(speed.values()) > 0

    auc = _series(acc, "valid/click/auc")
    assert sorted(auc) == history["valid_steps"] == [10, 20, 30]
    for step, valid in zip(history["valid_steps"], history["valid"], strict=True):
        assert auc[step] == pytest.approx(valid["auc"], abs=1e-6)
        assert _series(acc, "valid/click/logloss")[step] == pytest.approx(valid["logloss"],
                                                                          abs=1e-6)
    assert "valid/oracle/click/auc" in tags  # the oracle's metrics, as the data has them

    for split in ("valid", "test"):
        final = _series(acc, f"final/{split}/click/auc")
        assert final == {STEPS: pytest.approx(metrics[split]["auc"], abs=1e-6)}
    assert _series(acc, "final/test/click/rows") == {STEPS: metrics["test"]["rows"]}


def test_plots_are_images_of_their_png_size(trained: Path) -> None:
    acc = _events(trained)
    pngs = sorted(trained.glob("*.png"))
    assert {p.name for p in pngs} >= {"training_curve.png", "calibration.png"}
    assert sorted(acc.Tags()["images"]) == sorted(f"plots/{p.stem}" for p in pngs)
    for png in pngs:
        height, width = mpimg.imread(png).shape[:2]
        (image,) = acc.Images(f"plots/{png.stem}")
        assert (image.step, image.height, image.width) == (STEPS, height, width)


def test_resume_after_a_crash_keeps_one_point_per_step(trained: Path, tiny_dataset,
                                                       tmp_path: Path) -> None:
    """A crash after the checkpoint of step 20 (simulated: the later checkpoints deleted from a
    finished run) and a resume: steps after 20 are logged twice, TensorBoard shows the second
    attempt's once."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for later in ("step-0000030", "step-0000040"):
        shutil.rmtree(RunDir(run).checkpoints / later)
    run_training(_spec(tiny_dataset.root), run, progress=False, resume=True)
    assert len(list(RunDir(run).tensorboard.glob("events.out.tfevents.*"))) == 2
    history = json.loads((run / "history.json").read_text())
    acc = _events(run)
    loss = _series(acc, "train/loss")  # asserts no step twice
    assert sorted(loss) == history["steps"] == [1, 10, 20, 30, 40]
    assert list(loss.values()) == pytest.approx(history["loss"], abs=1e-6)
    assert sorted(_series(acc, "valid/click/auc")) == history["valid_steps"] == [10, 20, 30]
    assert sorted(_series(acc, "final/test/click/auc")) == [STEPS]


def test_a_failed_run_flushes_and_closes_its_writer(tiny_dataset, tmp_path: Path) -> None:
    """A run that fails in this process (here: at its first validation) has flushed what it logged
    and stopped its writer thread when run_training raises, not at the process's exit."""
    import threading

    def writers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread"]

    before = writers()

    def fail(step: int, metric: float) -> bool:
        raise RuntimeError(f"failed at step {step}")

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="failed at step 10"):
        run_training(_spec(tiny_dataset.root), run, progress=False, on_validation=fail)
    assert writers() == before
    acc = _events(run)
    assert sorted(_series(acc, "train/loss")) == [1, 10]
    assert sorted(_series(acc, "valid/click/auc")) == [10]


def test_overwrite_removes_the_old_events(trained: Path, tiny_dataset, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    old = sorted(RunDir(run).tensorboard.iterdir())
    run_training(_spec(tiny_dataset.root, steps=10), run, progress=False, overwrite=True)
    events = sorted(RunDir(run).tensorboard.iterdir())
    assert len(events) == 1 and events[0] not in old
    assert sorted(_series(_events(run), "train/loss")) == [1, 10]


def test_no_run_directory_or_other_rank_writes_nothing(tmp_path: Path) -> None:
    assert type(open_board(None, True, lambda: 0, 64)) is NullBoard
    assert type(open_board(tmp_path, False, lambda: 0, 64)) is NullBoard
    board = open_board(tmp_path, True, lambda: 0, 64)
    assert isinstance(board, RunBoard) and not (tmp_path / "tb").exists()  # opens at first event
    board.validation(5, {"click": {"auc": 0.75, "note": "text is not a scalar"}})
    board.close()
    acc = _events(tmp_path)
    assert acc.Tags()["scalars"] == ["valid/click/auc"]
    assert _series(acc, "valid/click/auc") == {5: 0.75}
