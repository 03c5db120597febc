"""The `recsys` command line end to end on a tiny synthetic dataset, and every shipped spec."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from recsys.cli import build_parser, main
from recsys.data.schema import DatasetManifest
from recsys.spec import dump_toml, load_spec, spec_hash, validate_spec

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "specs" / "quickstart.toml")
TINY = [
    "data.synthetic.num_users=300", "data.synthetic.num_items=400",
    "data.synthetic.num_categories=12",
    "data.synthetic.requests={ train = 1500, valid = 300, test = 300 }",
    "data.synthetic.retrieved_per_request=20", "data.synthetic.preranked_per_request=10",
    "data.synthetic.ranked_per_request=6", "data.synthetic.exposed_per_request=3",
    "data.synthetic.row_group_size=2000", "train.batch_size=256",
]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["data", "synth", QUICKSTART, "--out", str(out), *_sets(TINY)]) == 0
    return out


def test_synth_writes_the_splits_the_config_asks_for(tiny_data: Path) -> None:
    m = DatasetManifest.load(tiny_data)
    assert m.rows["impressions"] == {"train": 1500 * 3, "valid": 300 * 3, "test": 300 * 3}
    assert m.rows["cascade"] == {"train": 1500 * 20, "valid": 300 * 20, "test": 300 * 20}


def test_inspect_prints_the_rows_and_rates(tiny_data: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    args = ["data", "inspect", QUICKSTART, *_sets([*TINY, f"data.path={tiny_data}"])]
    assert main(args) == 0
    out = capsys.readouterr().out
    train = next(line for line in out.splitlines() if line.startswith("| train"))
    cells = [c.strip() for c in train.strip("|").split("|")]
    assert cells[1] == "4,500"  # rows
    assert cells[2] == "1,500"  # requests: every request exposes exactly 3 rows
    assert 0.0 < float(cells[4]) < 1.0  # click rate
    assert "deepest cascade stage" in out


def test_bench_data_writes_json_with_a_consistent_ratio(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cores_before = os.sched_getaffinity(0)
    args = ["bench", "data", "--spec", QUICKSTART, "--out", str(out), "--repeats", "1",
            *_sets([*TINY, f"data.path={tiny_data}"])]
    assert main(args) == 0
    result = json.loads((out / "data.json").read_text())
    rates = result["rows_per_s"]
    assert result["rows"] == 1500 * 20  # the cascade view of train
    assert result["batch_size"] == 256  # the spec's train.batch_size
    assert result["ratio_loader_to_bare"] == pytest.approx(
        rates["loader -> Batch (shuffled)"] / rates["bare pyarrow read"])
    assert "vs bare read" in (out / "data.md").read_text()
    assert os.sched_getaffinity(0) == cores_before  # pinned to one core only while measuring


def test_errors_exit_2_and_name_the_file_and_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spec", "show", QUICKSTART, "--set", "train.batch_sizee=4"]) == 2
    err = capsys.readouterr().err
    assert "quickstart.toml: train.batch_sizee: unknown key" in err
    assert "batch_size" in err  # the valid keys are listed


def test_spec_show_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    """The resolved TOML that a run directory will store reads back to the same spec and hash."""
    spec = load_spec(QUICKSTART)
    again = validate_spec(tomllib.loads(dump_toml(spec)))
    assert again == spec
    assert spec_hash(again) == spec_hash(spec)
    assert main(["spec", "show", QUICKSTART]) == 0
    assert spec_hash(spec) in capsys.readouterr().out


@pytest.mark.parametrize("module", ["recsys", "recsys.cli"])
def test_python_dash_m_recsys_and_version(module: str) -> None:
    """``python -m recsys`` (users) and ``python -m recsys.cli`` (what torchrun and torchx run)."""
    from recsys import __version__

    done = subprocess.run([sys.executable, "-m", module, "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"recsys {__version__}", done.stderr


# ==================================================================================================
# the parser: help texts, the epilog, exit statuses

def _commands(parser: argparse.ArgumentParser, path: str = "recsys"
              ) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the tree with its command line, the top one first."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += _commands(child, f"{path} {name}")
    return found


def test_every_command_and_option_has_help() -> None:
    missing = []
    parsers = _commands(build_parser())
    for path, parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
            if isinstance(action, argparse._SubParsersAction):  # each command's line in the list
                missing += [f"{path} {a.dest}" for a in action._choices_actions
                            if not (a.help or "").strip()]
        if path != "recsys" and not (parser.description or "").strip():
            missing.append(f"{path} (no description)")
    assert missing == []
    assert len(parsers) > 20  # the walk found the tree: recsys, groups, actions


def test_help_documents_exit_statuses_and_ends_with_examples(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    statuses = out[out.index("\nexit status:\n"):out.index("\nexamples:\n")]
    for line in ("  0 ", "  1 ", "  2 "):
        assert line in statuses
    assert "internal error" in statuses and "usage, spec or data error" in statuses
    examples = out[out.index("\nexamples:\n"):].strip().splitlines()[1:]
    assert examples and all(line.startswith("  ") for line in examples)  # the last section
    text = "\n".join(examples)
    for expected in ("recsys train specs/quickstart.toml", "recsys evaluate ", "recsys export ",
                     "recsys predict ", "recsys spec show specs/quickstart.toml --set ",
                     "recsys data prepare ", "recsys bench ", "torchx run "):
        assert expected in text
    # each `recsys ...` example is a command line the parser takes, on specs that exist
    parser = build_parser()
    for line in examples:
        argv = shlex.split(line.strip().rstrip("\\"))
        if argv[0] != "recsys":
            continue
        args = parser.parse_args(argv[1:])
        assert callable(args.func), line
        if getattr(args, "spec", None):
            assert (ROOT / args.spec).is_file(), line


def test_help_does_not_import_torch() -> None:
    """``recsys --help`` stays fast: handlers import torch when they run, not when parsed."""
    code = ("import sys; from recsys.cli import build_parser; build_parser().parse_args("
            "['train', 'x.toml']); assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("args,expected", [
    (["train", QUICKSTART, "--resume", "--overwrite"],
     "error: --resume and --overwrite exclude each other"),
    (["data", "synth", QUICKSTART, "--set", "data.source=parquet"],
     f"error: {QUICKSTART}: data.source is 'parquet', not 'synthetic'"),
])
def test_a_usage_error_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], args: list[str],
                                             expected: str, tiny_dataset: DatasetManifest
                                             ) -> None:
    # a prepared dataset where the spec points, so that only the usage error is left to report
    args = [*args, "--set", f"data.path={tiny_dataset.root}"]
    capsys.readouterr()
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [expected]


@pytest.mark.parametrize("args", [["train"], ["nosuchcommand"], ["export", "RUN"],
                                  ["plan", QUICKSTART, "--device", "tpu"], []])
def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "error: " in capsys.readouterr().err


def test_an_internal_error_exits_1_with_its_traceback(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An exception that is not a RecsysError is a bug: its traceback and one line; status 1."""
    import recsys.cli.spec

    def fails(args: object) -> int:
        print("partial output")
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(recsys.cli.spec, "cmd_spec_show", fails)
    capsys.readouterr()
    assert main(["spec", "show", QUICKSTART]) == 1
    out, err = capsys.readouterr()
    assert out == "partial output\n"
    assert err.startswith("Traceback (most recent call last):") and "in fails" in err, err
    assert "internal error: RuntimeError: boom\n" in err
    assert not any(line.startswith("error: ") for line in err.splitlines())  # not a user's error
