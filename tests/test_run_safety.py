"""Nothing a user made is lost: run directories, checkpoints and exports.

Each case is a real one-process run of a tiny model (a few steps), then the misuse: training over a
finished run, two writers at once, resuming without a spec, a truncated or corrupt checkpoint, an
export that fails its parity check, an export over a folder of other files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_spec_dict

from recsys.cli import main
from recsys.data.schema import DatasetManifest
from recsys.errors import RunError
from recsys.export.predictor import Predictor
from recsys.export.torchscript import export_run
from recsys.fsutil import ExclusiveLock
from recsys.run_dir import RunDir
from recsys.spec import dump_toml, validate_spec
from recsys.train import checkpoint
from recsys.train.run import evaluate_run, run_training


def _raw(root: Path, **train: Any) -> dict[str, Any]:
    raw = tiny_spec_dict(root)
    raw["model"] = {"arch": "mlp", "tasks": ["click"], "mlp": {"hidden": [16]}}
    raw["data"]["labels"] = ["click"]
    raw["train"] = {"batch_size": 128, "seed": 1, "max_steps": 12, "checkpoint_every_steps": 4,
                    "keep_checkpoints": 5, "eval_cascade": False, **train}
    return raw


@pytest.fixture(scope="module")
def finished(tiny_dataset: DatasetManifest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, dict[str, Any]]:
    """A finished run (checkpoints at steps 4, 8, 12); tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("finished") / "run"
    metrics = run_training(validate_spec(_raw(tiny_dataset.root)), run, progress=False)
    return run, metrics


def _copy(finished: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    return run


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.checkpoint_dir(run).iterdir())


def test_training_into_a_finished_run_stops_and_keeps_it(finished, tiny_dataset,
                                                         tmp_path: Path, capsys) -> None:
    run = _copy(finished, tmp_path)
    before = _steps(run)
    spec = tmp_path / "spec.toml"
    spec.write_text(dump_toml(validate_spec(_raw(tiny_dataset.root, seed=2))))
    assert main(["train", str(spec), "--run-dir", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {run}: already holds a run" in err and "--overwrite" in err
    assert _steps(run) == before and (run / "metrics.json").is_file()
    # --overwrite replaces it: the old checkpoints are gone, the new run's are there
    assert main(["train", str(spec), "--run-dir", str(run), "--no-progress", "--overwrite"]) == 0
    assert json.loads((run / "run.json").read_text())["steps"] == 12
    assert "seed = 2" in (run / "spec.toml").read_text()


def test_overwrite_with_bad_data_keeps_the_old_run(finished, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    before = _steps(run)
    raw = _raw(tmp_path / "no-such-dataset")
    raw["data"]["source"] = "parquet"
    with pytest.raises(Exception, match="no-such-dataset"):
        run_training(validate_spec(raw), run, progress=False, overwrite=True)
    assert _steps(run) == before and (run / "metrics.json").is_file()


def test_a_second_writer_of_a_run_directory_gets_a_clear_error(finished, tiny_dataset,
                                                               tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    spec = validate_spec(_raw(tiny_dataset.root))
    with ExclusiveLock(run / RunDir.LOCK, "held by the test"):  # another training, still running
        with pytest.raises(RunError, match="in use by another process"):
            run_training(spec, run, progress=False, resume=True)
        with pytest.raises(RunError, match="in use by another process"):
            evaluate_run(run, progress=False)
    assert (run / "metrics.json").is_file()


def test_resume_without_spec_refuses(finished, tiny_dataset, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    (run / "spec.toml").unlink()
    raw = _raw(tiny_dataset.root)
    raw["model"] = {"arch": "dcn", "tasks": ["click"]}
    with pytest.raises(RunError, match="no spec.toml"):
        run_training(validate_spec(raw), run, progress=False, resume=True)


def test_truncated_latest_checkpoint_falls_back_and_says_so(finished, tmp_path: Path,
                                                            caplog) -> None:
    run = _copy(finished, tmp_path)
    latest = checkpoint.checkpoint_dir(run) / "step-0000012"
    shard = max((p for p in latest.iterdir() if p.suffix == ".distcp"),
                key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="recsys.train"):
        assert checkpoint.latest(run) == checkpoint.checkpoint_dir(run) / "step-0000008"
    assert "step-0000012" in caplog.text and "were written" in caplog.text
    assert "using step-0000008" in caplog.text
    # evaluate and export use the previous complete one
    assert evaluate_run(run, progress=False)["checkpoint"] == "step-0000008"
    info = export_run(run, tmp_path / "export")
    assert info["checkpoint"] == "step-0000008"
    assert not info["parity"]["recorded"]["available"]  # the run's metrics are of step 12
    # and --resume (with the run's own spec) goes on from step 8 to the end
    shutil.copy(run / "spec.toml", tmp_path / "spec.toml")
    assert main(["train", str(tmp_path / "spec.toml"), "--run-dir", str(run), "--resume",
                 "--no-progress"]) == 0
    assert json.loads((run / "run.json").read_text())["steps"] == 12
    history = json.loads((run / "history.json").read_text())
    assert history["steps"][0] == 1  # the curve before the fall-back point is kept


def test_corrupt_checkpoint_is_skipped_and_all_corrupt_is_one_line(finished, tmp_path: Path,
                                                                   capsys) -> None:
    run = _copy(finished, tmp_path)
    for path in checkpoint.checkpoint_dir(run).iterdir():
        f = path / "rank-0.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
        f.write_bytes(bytes(data))
    assert checkpoint.verify(path) is not None and "checksum" in checkpoint.verify(path)
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"error: {run}: no complete checkpoint to evaluate" in err
    assert "Traceback" not in err
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 2
    assert "no complete checkpoint to export" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_a_failed_export_leaves_the_earlier_one_whole(finished, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    out = tmp_path / "export"
    export_run(run, out)
    model_before = (out / "model.pt").read_bytes()
    manifest_before = (out / "manifest.json").read_text()
    # the run's recorded AUC no longer matches what its checkpoint scores: the parity check fails
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["tasks"]["test"]["click"]["auc"] -= 0.01
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(RunError, match="parity check failed, nothing was written.*recorded"):
        export_run(run, out, quantize="none")
    assert (out / "model.pt").read_bytes() == model_before
    assert (out / "manifest.json").read_text() == manifest_before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export")) == \
        [".export.lock"]  # no staging folder left behind


def test_export_refuses_a_folder_of_other_files(finished, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="not an export"):
        export_run(finished[0], out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_export_carries_the_oov_policy_and_predict_applies_it(tiny_dataset, tmp_path: Path
                                                              ) -> None:
    raw = _raw(tiny_dataset.root, max_steps=4)
    fields = raw["features"]["fields"]
    next(f for f in fields if f["name"] == "user_id")["oov"] = "hash"
    run = tmp_path / "run"
    run_training(validate_spec(raw), run, progress=False)
    export_run(run, tmp_path / "export")
    predictor = Predictor.load(tmp_path / "export")
    assert predictor.manifest["inputs"]["oov"]["user_id"] == "hash"
    assert predictor.manifest["inputs"]["oov"]["item_id"] == "error"
    table = pq.read_table(tiny_dataset.files("impressions", "test")[0]).slice(0, 50)
    base = predictor.predict_table(table)["click"]
    rows = predictor.rows["user_id"]
    users = table.column("user_id").to_numpy()
    shifted = table.set_column(table.schema.get_field_index("user_id"), "user_id",
                               pa.array(users + 3 * rows))  # out of range; hashed as in training
    np.testing.assert_array_equal(predictor.predict_table(shifted)["click"], base)


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
        finished, small_fs, tmp_path: Path, capsys) -> None:
    fs = small_fs("2m")
    run = fs / "run"
    shutil.copytree(finished[0], run)
    shutil.rmtree(checkpoint.checkpoint_dir(run) / "step-0000012")
    for name in ("metrics.json", "run.json", "history.json"):
        (run / name).unlink()
    shutil.copy(run / "spec.toml", tmp_path / "spec.toml")
    # leave room for the log and the spec, not for another checkpoint (~160 KB)
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 8192):
            pass
    except OSError:
        pass  # the file system is full
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - 64 * 1024)
    code = main(["train", str(tmp_path / "spec.toml"), "--run-dir", str(run), "--resume",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {run / 'checkpoints'}: cannot write a checkpoint: no space left on "
                      "device (the previous checkpoint is kept)"], err[-2000:]
    assert "Traceback" not in err
    assert checkpoint.latest(run) == checkpoint.checkpoint_dir(run) / "step-0000008"
    assert not list(checkpoint.checkpoint_dir(run).glob("*.partial"))
