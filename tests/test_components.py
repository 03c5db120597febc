"""The torchx components of apps/components.py: the AppDefs they build (torchrun command line,
recsys flags, resources, retries) and ``torchx run --dryrun`` on local_cwd, Slurm and Kubernetes.
Nothing is launched here."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from torchx import specs
from torchx.specs.file_linter import get_fn_docstring, validate

from apps import components
from apps.components import evaluate, export, join_overrides, train

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ROOT / "apps" / "components.py"
SPEC = "specs/quickstart.toml"


def _cmd(app: specs.AppDef) -> list[str]:
    """The torchrun command line of the app's only role (``bash -c CMD``), as argv, without the
    ``PATH=...`` assignment in front of it (see test_local_image_finds_torchrun)."""
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c" and len(role.args) == 2
    argv = shlex.split(role.args[1])
    return argv[1:] if argv[0].startswith("PATH=") else argv


def _opt(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


def _recsys_args(argv: list[str]) -> list[str]:
    """What follows ``-m recsys.cli``."""
    i = argv.index("-m")
    assert argv[i + 1] == "recsys.cli"
    return argv[i + 2:]


def _sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def _resolved(app: specs.AppDef, replica_id: int = 0) -> list[str]:
    """The command line of one replica as a scheduler sees it (macros filled in)."""
    values = specs.macros.Values(img_root="/img", app_id="app-1", replica_id=str(replica_id),
                                 rank0_env="TORCHX_RANK0_HOST")
    role = values.apply(app.roles[0])
    return shlex.split(role.args[1])


_STR = r"""(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")"""


def _torchrun_commands(text: str) -> list[list[str]]:
    """The torchrun command lines in a pretty-printed dryrun (Python string literals that
    pformat split over lines are joined back), as argv."""
    joined = ["".join(ast.literal_eval(s) for s in re.findall(_STR, m.group(0)))
              for m in re.finditer(rf"{_STR}(?:\s*{_STR})*", text)]
    commands = [shlex.split(s) for s in joined if s.startswith(("torchrun ", "PATH="))]
    return [argv[1:] if argv[0].startswith("PATH=") else argv for argv in commands]


# ---- AppDefs --------------------------------------------------------------------------------------

def test_train_one_node():
    app = train(SPEC, "runs/qs", overrides=["train.max_steps=20", "train.batch_size=512"])
    (role,) = app.roles
    argv = _cmd(app)
    assert argv[0] == "torchrun"
    assert _opt(argv, "--max_restarts") == "3"
    assert _opt(argv, "--nnodes") == "1" and _opt(argv, "--nproc_per_node") == "2"
    assert _opt(argv, "--rdzv_backend") == "c10d"
    assert _opt(argv, "--rdzv_endpoint") == "localhost:0"  # one node: a free port, standalone
    assert _recsys_args(argv) == ["train", SPEC, "--run-dir", "runs/qs",
                                  "--set", "train.max_steps=20", "--set", "train.batch_size=512",
                                  "--resume"]
    assert role.name == "train" and app.name == "train"
    assert role.num_replicas == 1 and role.min_replicas == 1
    assert role.max_retries == 3
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (4, 0, 8192)
    assert role.image == "."


def test_train_two_nodes():
    app = train(SPEC, "runs/qs", j="2x1")
    (role,) = app.roles
    argv = _cmd(app)
    assert _opt(argv, "--nnodes") == "2" and _opt(argv, "--nproc_per_node") == "1"
    assert role.num_replicas == 2 and role.min_replicas == 2
    # multi-node: the first node's host (the scheduler names its variable) on rdzv_port
    for replica in (0, 1):
        resolved = _resolved(app, replica)
        assert _opt(resolved, "--rdzv_endpoint") == "${TORCHX_RANK0_HOST:=localhost}:29500"
        assert _opt(resolved, "--rdzv_id") == "app-1"
    assert role.port_map == {"c10d": 29500}

    app = train(SPEC, "runs/qs", j="2x4", rdzv_port=29600)
    argv = _cmd(app)
    assert _opt(argv, "--nnodes") == "2" and _opt(argv, "--nproc_per_node") == "4"
    assert _opt(argv, "--rdzv_endpoint").endswith(":29600")
    assert app.roles[0].port_map == {"c10d": 29600}


def test_local_image_finds_torchrun():
    # `.venv/bin/torchx run` without an activated venv: the launching Python's bin directory
    # is appended to PATH (after the inherited one), only for jobs run from this checkout
    bindir = Path(sys.executable).parent
    argv = _resolved(train(SPEC, "runs/qs"))
    if (bindir / "torchrun").is_file():
        assert argv[0] == f"PATH=$PATH:{bindir}" and argv[1] == "torchrun"
    else:
        assert argv[0] == "torchrun"
    assert _resolved(train(SPEC, "runs/qs", image="ghcr.io/me/recsys:1"))[0] == "torchrun"


def test_train_elastic_and_bad_j():
    app = train(SPEC, "runs/qs", j="1:3x2")
    assert _opt(_cmd(app), "--nnodes") == "1:3"
    assert (app.roles[0].min_replicas, app.roles[0].num_replicas) == (1, 3)
    with pytest.raises(ValueError, match="-j"):
        train(SPEC, "runs/qs", j="two")


@pytest.mark.parametrize(("resume", "max_restarts", "max_retries", "expected"), [
    (False, 0, 0, False),   # nothing restarts it: a plain fresh run
    (True, 0, 0, True),
    (False, 2, 0, True),    # torchrun reruns the same command: it must resume
    (False, 0, 1, True),    # so does a scheduler retry
])
def test_train_resume(resume, max_restarts, max_retries, expected):
    app = train(SPEC, "runs/qs", resume=resume, max_restarts=max_restarts,
                max_retries=max_retries)
    argv = _cmd(app)
    assert ("--resume" in _recsys_args(argv)) is expected
    assert _opt(argv, "--max_restarts") == str(max_restarts)
    assert app.roles[0].max_retries == max_retries


def test_train_options():
    env = {"OMP_NUM_THREADS": "1"}
    app = train(SPEC, "runs/x y", progress=False, cpu=16, gpu=8, memMB=64000, env=env,
                image="ghcr.io/me/recsys:1", name="ctr/exp1",
                mounts=["type=bind", "src=/shared", "dst=/shared"])
    (role,) = app.roles
    args = _recsys_args(_cmd(app))
    assert args[args.index("--run-dir") + 1] == "runs/x y"  # quoted for bash
    assert "--no-progress" in args
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (16, 8, 64000)
    assert role.env["OMP_NUM_THREADS"] == "1"
    assert env == {"OMP_NUM_THREADS": "1"}  # the caller's dict is not modified
    assert role.image == "ghcr.io/me/recsys:1" and app.name == "exp1"
    assert role.env["TORCHX_TRACKING_EXPERIMENT_NAME"] == "ctr"
    assert [(m.src_path, m.dst_path) for m in role.mounts] == [("/shared", "/shared")]
    with pytest.raises(ValueError, match="max_restarts"):
        train(SPEC, "runs/x", max_restarts=-1)


def test_overrides_split_by_torchx_are_joined():
    # the torchx CLI splits List[str] arguments on every comma
    given = ("train.max_steps=20,model.hidden=[64,32],data.synthetic.requests={ train = 1500, "
             "valid = 300 },name='a,b',train.epochs=1")
    assert join_overrides(given.split(",")) == [
        "train.max_steps=20", "model.hidden=[64,32]",
        "data.synthetic.requests={ train = 1500, valid = 300 }", "name='a,b'", "train.epochs=1"]
    assert join_overrides([" a=1 ", "", "b=2"]) == ["a=1", "b=2"]
    argv = _cmd(train(SPEC, "runs/x", overrides=["model.hidden=[64", "32]"]))
    assert _sets(argv) == ["model.hidden=[64,32]"]


def test_evaluate():
    app = evaluate("runs/qs")
    (role,) = app.roles
    argv = _cmd(app)
    assert _recsys_args(argv) == ["evaluate", "runs/qs"]
    assert _opt(argv, "--max_restarts") == "0" and role.max_retries == 0
    assert _opt(argv, "--nnodes") == "1" and _opt(argv, "--nproc_per_node") == "2"
    assert role.name == "evaluate"
    argv = _cmd(evaluate("runs/qs", j="2x1", max_retries=2))
    assert _opt(argv, "--nnodes") == "2" and _opt(argv, "--nproc_per_node") == "1"


def test_export():
    app = export("runs/qs", "exports/qs", quantize="int8")
    (role,) = app.roles
    argv = _cmd(app)
    assert _recsys_args(argv) == ["export", "runs/qs", "--out", "exports/qs", "--quantize", "int8"]
    assert _opt(argv, "--nnodes") == "1" and _opt(argv, "--nproc_per_node") == "1"
    assert role.num_replicas == 1 and role.max_retries == 0 and role.name == "export"
    assert (role.resource.cpu, role.resource.memMB) == (2, 4096)
    args = _recsys_args(_cmd(export("runs/qs", "out", check=False)))
    assert args[-3:] == ["--quantize", "none", "--no-check"]
    with pytest.raises(ValueError, match="quantize"):
        export("runs/qs", "out", quantize="int4")


@pytest.mark.parametrize("name", ["train", "evaluate", "export"])
def test_component_passes_torchx_linter_and_documents_every_arg(name):
    assert validate(str(COMPONENTS), name) == []
    description, args = get_fn_docstring(getattr(components, name))
    assert description.strip()
    undocumented = [a for a, text in args.items() if not text.strip()]
    assert undocumented == []


# ---- torchx CLI -----------------------------------------------------------------------------------

def _torchx(*args: str, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TORCHXCONFIG"}
    env["HOME"] = str(tmp_path)  # no user-level ~/.torchxconfig
    proc = subprocess.run([sys.executable, "-m", "torchx.cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def test_dryrun_local_cwd_two_nodes(tmp_path):
    out = _torchx("run", "--dryrun", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path}",
                  "apps/components.py:train", "-j", "2x4", "--spec", SPEC,
                  "--run_dir", "runs/qs", "--overrides", "train.max_steps=20,model.hidden=[64,32]",
                  tmp_path=tmp_path)
    application, request = out.split("=== SCHEDULER REQUEST ===")
    assert "=== APPLICATION ===" in application
    assert "'num_replicas': 2" in application and "'max_retries': 3" in application
    (argv,) = _torchrun_commands(application)
    assert argv[:3] == ["torchrun", "--max_restarts", "3"]
    assert _opt(argv, "--nnodes") == "2" and _opt(argv, "--nproc_per_node") == "4"
    assert _recsys_args(argv) == ["train", SPEC, "--run-dir", "runs/qs", "--set",
                                  "train.max_steps=20", "--set", "model.hidden=[64,32]",
                                  "--resume"]
    # the scheduler request: two local replicas, both rendezvous on localhost:29500
    replicas = _torchrun_commands(request)
    assert len(replicas) == 2
    for argv in replicas:
        assert _opt(argv, "--rdzv_endpoint") == "${TORCHX_RANK0_HOST:=localhost}:29500"


def test_dryrun_default_component_from_torchxconfig(tmp_path):
    out = _torchx("run", "--dryrun", "-cfg", f"log_dir={tmp_path}", "--", "-j", "1x2",
                  "--spec", SPEC, "--run_dir", "runs/qs", tmp_path=tmp_path)
    assert "loaded configs from" in out and ".torchxconfig" in out
    assert "local_cwd://" in out  # the scheduler of [cli:run]
    (argv,) = _torchrun_commands(out.split("=== SCHEDULER REQUEST ===")[1])
    assert _opt(argv, "--nnodes") == "1" and _opt(argv, "--nproc_per_node") == "2"
    assert _opt(argv, "--rdzv_endpoint") == "localhost:0"
    assert _recsys_args(argv)[:2] == ["train", SPEC]


def test_dryrun_slurm(tmp_path):
    out = _torchx("run", "--dryrun", "-s", "slurm", "-cfg", "partition=cpu,time=2:00:00",
                  "apps/components.py:train", "-j", "2x4", "--spec", SPEC, "--run_dir",
                  "/shared/runs/qs", "--cpu", "8", "--memMB", "32000", tmp_path=tmp_path)
    sbatch = [line for line in out.splitlines() if line.startswith("#SBATCH --job-name")]
    assert len(sbatch) == 2  # a heterogeneous job: one group per node
    for line in sbatch:
        assert "--partition=cpu" in line and "--time=2:00:00" in line
        assert "--cpus-per-task=8" in line and "--mem=32000" in line
    assert "export TORCHX_MAX_RETRIES=3" in out and "scontrol requeue" in out
    assert "--nnodes 2 --nproc_per_node 4" in out
    assert "${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500" in out
    assert "-m recsys.cli train specs/quickstart.toml --run-dir /shared/runs/qs --resume" in out


@pytest.mark.skipif(importlib.util.find_spec("kubernetes") is None,
                    reason="torchx's kubernetes scheduler needs the `kubernetes` package "
                           "(pip install kubernetes) even for --dryrun")
def test_dryrun_kubernetes(tmp_path):
    out = _torchx("run", "--dryrun", "--workspace", "", "-s", "kubernetes",
                  "-cfg", "queue=research,namespace=ml", "apps/components.py:train", "-j", "2x8",
                  "--gpu", "8", "--image", "ghcr.io/me/recsys:1", "--spec", SPEC,
                  "--run_dir", "/shared/runs/qs", tmp_path=tmp_path)
    assert "ghcr.io/me/recsys:1" in out and "research" in out
    assert "--nnodes 2 --nproc_per_node 8" in out
    assert "maxRetry" in out


def test_component_help_shows_docstring(tmp_path):
    for name, phrase in [("train", "Fault tolerance"), ("evaluate", "Re-evaluate a run"),
                         ("export", "TorchScript export")]:
        out = _torchx("run", "--dryrun", f"apps/components.py:{name}", "--help",
                      tmp_path=tmp_path)
        assert phrase in out
        assert "--run_dir str" in out and "(required)" in out
    out = _torchx("run", "--dryrun", "apps/components.py:train", "--help", tmp_path=tmp_path)
    assert "--max_restarts int" in out and "(default: 3)" in out
