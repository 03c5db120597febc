"""Bad input through the real command line: every error a user can cause is one ``error: ...``
line naming what is wrong and where, with exit status 2, and nothing else on stderr (no
traceback, no "Exception ignored" at interpreter exit, no progress bar drawn after it)."""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_spec_dict
from test_cli import QUICKSTART, TINY  # the tiny world (a few seconds to generate)

from recsys.cli import data as cli_data
from recsys.cli import main
from recsys.data.schema import DatasetManifest
from recsys.errors import DataError, RunError, SpecError
from recsys.spec import dump_toml, load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[1]
NO_SPACE = "cannot write: no space left on device"
READ_ONLY = "cannot write: read-only file system"


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``recsys ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``python -m recsys.cli ARGS`` in a process of its own, to see what it prints at exit."""
    return subprocess.run([sys.executable, "-m", "recsys.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, **kwargs)  # type: ignore[call-overload]


def one_error_line(err: str) -> str:
    """The single ``error: ...`` line that stderr must consist of."""
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def spec_problem(err: str) -> str:
    """The one problem of an ``invalid spec (1 problem):`` error (and nothing else on stderr)."""
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = err.splitlines()
    assert lines[0] == "error: invalid spec (1 problem):" and len(lines) == 2, err
    return lines[1].strip()


# ==================================================================================================
# 1. a spec file that is not a spec file

def _spec_show(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    code, out, err = run_cli(capsys, "spec", "show", str(path))
    assert code == 2 and out == ""
    problem = spec_problem(err)
    assert problem.startswith(f"{path}: ")
    return problem.removeprefix(f"{path}: ")


def test_spec_path_that_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _spec_show(capsys, tmp_path) == "is a directory, not a spec file"


@pytest.mark.parametrize("content", [
    bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)),
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00\x00\x00\x01\x00\x08\x06\x00\x00\x00",
    b"\x00" * 64,
    b'name = "x"\x00\x00\x00',
], ids=["random-bytes", "png", "nul-bytes", "text-with-nuls"])
def test_binary_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          content: bytes) -> None:
    path = tmp_path / "spec.toml"
    path.write_bytes(content)
    assert _spec_show(capsys, path).startswith("binary file, not a TOML spec")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         encoding: str) -> None:
    """With a byte order mark (utf-16) or without one (-le, -be)."""
    path = tmp_path / "spec.toml"
    path.write_bytes(Path(QUICKSTART).read_text().encode(encoding))
    assert _spec_show(capsys, path) == "not UTF-8 text (looks like UTF-16); save it as UTF-8"


def test_latin1_spec_file_names_the_byte(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spec.toml"
    path.write_bytes('name = "café"\n'.encode("latin-1"))
    assert _spec_show(capsys, path) == "not UTF-8 text (byte 0xe9 at line 1, column 12); " \
                                       "save it as UTF-8"


def test_empty_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spec.toml"
    path.write_bytes(b"\n\n")
    assert _spec_show(capsys, path) == "empty file, not a spec"


def test_utf8_spec_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    """What Windows editors write: the mark is dropped, the spec is the same."""
    path = tmp_path / "spec.toml"
    path.write_bytes(b"\xef\xbb\xbf" + Path(QUICKSTART).read_bytes())
    assert load_spec(path) == load_spec(QUICKSTART)


# ==================================================================================================
# 2. errors that are not spec problems do not print under the "invalid spec" header

@pytest.fixture
def fake_run(tiny_dataset: DatasetManifest, tmp_path: Path) -> Path:
    """A run directory with the tiny spec and no checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    raw = tiny_spec_dict(tiny_dataset.root)
    (run / "spec.toml").write_text(dump_toml(validate_spec(raw)))
    return run


def test_rvq_encode_not_a_run_directory(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "rvq", "encode", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2
    assert one_error_line(err) == f"error: {tmp_path}: not a run directory (spec.toml is missing)"


def test_rvq_encode_output_exists(fake_run: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "coded"
    out.mkdir()
    code, _, err = run_cli(capsys, "rvq", "encode", str(fake_run), "--out", str(out))
    assert code == 2
    assert one_error_line(err) == f"error: {out}: exists; pass --force to replace it"


@pytest.mark.parametrize("field,expected", [
    ("item_id", "--field 'item_id' is not a user feature of this run (its side is 'item')"),
    ("nope", "--field 'nope': no field 'nope' (fields: user_id, "),
])
def test_rvq_encode_field_that_is_not_a_user_feature(fake_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     field: str, expected: str) -> None:
    code, _, err = run_cli(capsys, "rvq", "encode", str(fake_run), "--out",
                           str(tmp_path / "coded"), "--field", field)
    assert code == 2
    assert one_error_line(err).startswith(f"error: {fake_run}: {expected}")


def test_rvq_encode_without_a_checkpoint_keeps_the_old_output(
        fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--force replaces the output only with a finished one: a failure leaves it as it was."""
    out = tmp_path / "coded"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, _, err = run_cli(capsys, "rvq", "encode", str(fake_run), "--out", str(out), "--force")
    assert code == 2
    assert one_error_line(err) == (f"error: {fake_run}: no complete checkpoint to read the "
                                   "embeddings from")
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".coded.lock", "coded", "run"]


def test_rvq_codes_for_ids_outside_the_table_are_a_data_error(tiny_dataset: DatasetManifest,
                                                              tmp_path: Path) -> None:
    from recsys.rvq_encode import write_coded_dataset

    ids = np.zeros((10, 3), dtype=np.int64)  # codes for 10 users; the data has 300
    with pytest.raises(DataError) as info:
        write_coded_dataset(tiny_dataset, tmp_path / "coded", "user_id", ids,
                            {"run": "r", "codes": 4, "rows": {}}, progress=False)
    assert not isinstance(info.value, SpecError)
    assert "column 'user_id' holds ids outside the user table's 10 rows [0, 10)" in str(info.value)
    assert str(tiny_dataset.root) in str(info.value)


def test_not_a_run_directory_is_a_run_error(tmp_path: Path) -> None:
    from recsys.rvq_encode import encode_run

    with pytest.raises(RunError):
        encode_run(tmp_path, tmp_path / "out", progress=False)


# ==================================================================================================
# 3. nothing on stderr after the error: progress bars, closed pipes, data loader workers

def test_progress_bar_is_finished_before_the_error(small_fs: Callable[..., Path]) -> None:
    """The bar an error interrupts ends its line first, and is not redrawn below the error when
    it is garbage-collected."""
    fs = small_fs()
    r = run_subprocess("data", "synth", QUICKSTART, "--out", str(fs / "ds"), *_sets(TINY))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert lines[-1] == f"error: {fs / 'ds'}: {NO_SPACE}", r.stderr
    assert all("error" not in line for line in lines[:-1]), r.stderr


def test_closed_pipe_is_silent() -> None:
    """`recsys spec show SPEC | head -0`: no BrokenPipeError traceback, nothing at exit."""
    proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", "spec", "show", QUICKSTART],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == ""


@pytest.mark.slow
def test_bad_id_read_by_loader_workers_is_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    assert main(["data", "synth", QUICKSTART, "--out", str(data), *_sets(TINY)]) == 0
    for split in ("train", "valid", "test"):  # (evaluation reads every row of valid)
        part = data / "impressions" / split / "part-00000.parquet"
        table = pq.read_table(part)
        users = table.column("user_id").to_numpy().copy()
        users[100] = 5000
        table = table.set_column(table.schema.get_field_index("user_id"), "user_id",
                                 pa.array(users))
        pq.write_table(table, part, row_group_size=2000)
    raw = tiny_spec_dict(data)
    raw["data"]["num_workers"] = 2
    raw["train"].update(max_steps=5, checkpoint_every_steps=None)
    spec = tmp_path / "spec.toml"
    spec.write_text(dump_toml(validate_spec(raw)))
    code, _, err = run_cli(capsys, "train", str(spec), "--run-dir", str(tmp_path / "run"),
                           "--no-progress")
    assert code == 2
    assert "Traceback" not in err and "Exception ignored" not in err, err
    *log, line = err.splitlines()  # the run's log, then the error
    assert line.startswith("error: ") and "part-00000.parquet: column 'user_id' has an id " \
        "beyond its table (5000) at row 100" in line, err
    assert not any(x.startswith("error") for x in log), err


# ==================================================================================================
# 4. outputs that cannot be written

def _fill(fs: Path) -> None:
    """Take every free block of ``fs``."""
    with open(fs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_synth_into_a_full_disk(small_fs: Callable[..., Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    fs = small_fs()
    code, _, err = run_cli(capsys, "data", "synth", QUICKSTART, "--out", str(fs / "ds"),
                           *_sets(TINY))
    assert code == 2
    assert "Traceback" not in err
    *bar, line = err.rstrip("\n").split("\n")  # the progress bar where it stopped, the error
    assert line == f"error: {fs / 'ds'}: {NO_SPACE}"
    assert all("simulating requests" in x for x in bar), err
    # nothing half-written is left (only the lock file of the dataset path)
    assert sorted(p.name for p in fs.iterdir()) == [".ds.lock"]


def test_synth_into_a_read_only_file_system(small_fs: Callable[..., Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    fs = small_fs(read_only=True)
    code, _, err = run_cli(capsys, "data", "synth", QUICKSTART, "--out", str(fs / "ds"),
                           *_sets(TINY))
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"error: {fs}/") and line.endswith(READ_ONLY)


def test_bench_into_a_read_only_file_system(small_fs: Callable[..., Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    fs = small_fs(read_only=True)
    code, _, err = run_cli(capsys, "bench", "moe", "--spec", QUICKSTART, "--fields", "2",
                           "--dim", "4", "--batch-size", "8", "--repeats", "1", "--warmup", "0",
                           "--out", str(fs / "bench"))
    assert code == 2
    assert err.splitlines()[-1] == f"error: {fs / 'bench'}: {READ_ONLY}"
    assert "Traceback" not in err


def test_stdout_on_a_full_disk(small_fs: Callable[..., Path]) -> None:
    """`recsys spec show SPEC > FILE` on a full disk: one line, not "Exception ignored" at exit."""
    fs = small_fs(size="64k")
    _fill(fs)
    with open(fs / "shown.toml", "w") as stdout:
        r = subprocess.run([sys.executable, "-m", "recsys.cli", "spec", "show", QUICKSTART],
                           cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 2
    assert one_error_line(r.stderr) == f"error: stdout: {NO_SPACE}"


def test_bench_results_into_a_read_only_file_system(small_fs: Callable[..., Path]) -> None:
    from recsys.bench import write_result
    from recsys.errors import OutputError

    fs = small_fs(read_only=True)
    with pytest.raises(OutputError, match=READ_ONLY):
        write_result(fs / "bench", "data", {"rows": 1}, "| table |")


def test_bench_results_into_a_full_disk_leave_no_partial_file(
        small_fs: Callable[..., Path]) -> None:
    from recsys.bench import write_result
    from recsys.errors import OutputError

    fs = small_fs(size="64k")
    (fs / "bench").mkdir()
    _fill(fs)
    with pytest.raises(OutputError, match=NO_SPACE):
        write_result(fs / "bench", "data", {"rows": list(range(20000))}, "| table |")
    assert list((fs / "bench").iterdir()) == []


@pytest.mark.parametrize("error,expected", [
    (OSError(errno.ENOSPC, "No space left on device"), f"error: OUT: {NO_SPACE}"),
    (OSError(errno.EROFS, "Read-only file system", "OUT/x.parquet"),
     f"error: OUT/x.parquet: {READ_ONLY}"),
    (PermissionError(errno.EACCES, "Permission denied", "OUT/y"),
     "error: OUT/y: cannot write: permission denied"),
])
def test_an_output_error_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str], error: OSError,
                                     expected: str) -> None:
    """Whatever command hits it; without a file name in the error, the command's --out."""
    def fails(args: object) -> int:
        raise error

    monkeypatch.setattr(cli_data, "cmd_data_prepare", fails)
    code, _, err = run_cli(capsys, "data", "prepare", "libfm", "--input", "IN", "--out", "OUT")
    assert code == 2
    assert one_error_line(err) == expected


def test_other_os_errors_are_not_reported_as_outputs(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An OSError that is not about writing is a bug to see in full (an internal error, exit
    status 1, with its traceback), not a "cannot write"."""
    def fails(args: object) -> int:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(cli_data, "cmd_data_prepare", fails)
    code, _, err = run_cli(capsys, "data", "prepare", "libfm", "--input", "IN", "--out", "OUT")
    assert code == 1
    assert "Traceback" in err and "cannot write" not in err, err
    assert "internal error: ConnectionRefusedError: [Errno 111] Connection refused" in err


def test_a_rank_whose_peer_failed_prints_one_line(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Under torchrun, the rank left in a collective when another one exited on its error."""
    import torch.distributed  # noqa: F401  (loaded whenever a collective can fail)

    def fails(args: object) -> int:
        raise RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] "
                           "Connection closed by peer [127.0.0.1]:19888. This is typically caused "
                           "by a remote worker crashing. GLHF!")

    monkeypatch.setattr(cli_data, "cmd_data_prepare", fails)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, "data", "prepare", "libfm", "--input", "IN", "--out", "OUT")
    assert code == 2
    assert one_error_line(err) == ("error: rank 1 of 2: another process of this job stopped "
                                   "(Connection closed by peer [127.0.0.1]:19888); its own error "
                                   "says why")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: a peer cannot be the cause, a bug is
    code, _, err = run_cli(capsys, "data", "prepare", "libfm", "--input", "IN", "--out", "OUT")
    assert code == 1
    assert "Traceback" in err and "internal error: RuntimeError: " in err, err


# ==================================================================================================
# 5. options and specs on the command line

@pytest.mark.parametrize("args,expected", [
    (["bench", "train", "--steps", "0"], "error: --steps must be >= 1, got 0"),
    (["bench", "data", "--spec", QUICKSTART, "--repeats", "0"],
     "error: --repeats must be >= 1, got 0"),
    (["bench", "moe", "--spec", QUICKSTART, "--fields", "0"],
     "error: --fields must be >= 1, got 0"),
    (["bench", "serve", "--batch-sizes", "0"], "error: --batch-sizes must be >= 1, got (0,)"),
    (["data", "prepare", "movielens", "--input", "IN", "--out", "OUT", "--valid-fraction", "2"],
     "error: --valid-fraction and --test-fraction must be in [0, 1) with a sum < 1"),
    (["data", "prepare", "criteo", "--input", "IN", "--out", "OUT", "--hash-size", "0"],
     "error: --hash-size must be > 0, got 0"),
    (["predict", "EXPORT", "--data", "IN", "--out", "OUT", "--batch-size", "0"],
     "error: --batch-size must be >= 1, got 0"),
    (["report", "--seeds", "0"], "error: --seeds must be >= 1, got 0"),
])
def test_option_out_of_range(capsys: pytest.CaptureFixture[str], args: list[str],
                             expected: str) -> None:
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert one_error_line(err) == expected


def test_bench_train_with_an_optimizer_the_plain_side_lacks(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Reported before the benchmark's child processes start (they would fail with a traceback)."""
    code, _, err = run_cli(capsys, "bench", "train", "--spec", QUICKSTART, "--set",
                           "train.sparse_optimizer.name=gftrl")
    assert code == 2
    assert one_error_line(err).startswith(
        f"error: {QUICKSTART}: train.sparse_optimizer.name = 'gftrl' has no fused kernel")


@pytest.mark.parametrize("args,expected", [
    (["--set", "train.batch_sizee=4"], "train.batch_sizee: unknown key"),
    (["--set", "train.batch_size"], "--set 'train.batch_size': expected KEY.PATH=VALUE"),
    (["--set", "data.source=ftp"], "data.source: input should be 'synthetic', "),
])
def test_bad_override_is_one_problem(capsys: pytest.CaptureFixture[str], args: list[str],
                                     expected: str) -> None:
    code, _, err = run_cli(capsys, "spec", "show", QUICKSTART, *args)
    assert code == 2
    assert spec_problem(err).startswith(f"{QUICKSTART}: {expected}")


def test_missing_spec_is_one_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere.toml"
    code, _, err = run_cli(capsys, "train", str(path))
    assert code == 2
    assert spec_problem(err) == f"{path}: spec file not found"


def test_unknown_data_source_in_the_file(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(Path(QUICKSTART).read_text().replace('source = "synthetic"', 'source = "s3"'))
    code, _, err = run_cli(capsys, "data", "inspect", str(path))
    assert code == 2
    assert spec_problem(err).startswith(f"{path}: data.source: input should be 'synthetic'")

