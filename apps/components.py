# ruff: noqa: UP006, UP007, UP035, UP045
# torchx's component linter reads these signatures from the source and accepts only the typing
# spellings (Optional[...], List[...], Dict[...]), so the pyupgrade rules are off in this file;
# for the same reason there is no ``from __future__ import annotations`` here.
"""torchx components that launch recsys under torchrun: ``train``, ``evaluate``, ``export``.

Each component is :func:`torchx.components.dist.ddp` running ``python -m recsys.cli ...`` (one
role, ``NNODES`` replicas of a torchrun agent with ``NPROC`` workers each), plus torchrun's
``--max_restarts`` and the recsys flags. The same AppDef runs on every torchx scheduler:

    torchx run -s local_cwd apps/components.py:train -j 1x2 \\
        --spec specs/quickstart.toml --run_dir runs/qs
    torchx run -s slurm -cfg partition=gpu apps/components.py:train -j 2x8 --gpu 8 ...

``torchrun`` is looked up on the replica's PATH. With the default image (``.``: local_cwd and
Slurm, which run in the submitting directory) the directory of the Python running torchx (e.g.
``.venv/bin``) is appended to that PATH, so ``.venv/bin/torchx run ...`` works without activating
the virtual environment; a container image must have torchrun on its own PATH.
"""

import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

MODULE = "recsys.cli"
LOCAL_IMAGE = "."  # local_cwd and Slurm run in the current directory and ignore the image
QUANTIZE = ("none", "fp16", "int8")
_TORCHRUN = "torchrun "


def train(
    spec: str,
    run_dir: str,
    j: str = "1x2",
    overrides: Optional[List[str]] = None,
    resume: bool = False,
    progress: bool = True,
    max_restarts: int = 3,
    max_retries: int = 3,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    image: str = LOCAL_IMAGE,
    name: str = "recsys/train",
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Train (and evaluate) a spec's model: ``recsys train SPEC --run-dir RUN_DIR`` on
    ``NNODES x NPROC`` torchrun workers, checkpointing into RUN_DIR/checkpoints.

    Fault tolerance: torchrun restarts the worker group up to ``max_restarts`` times when a worker
    dies, and the scheduler relaunches the whole job up to ``max_retries`` times. Whenever either
    is above 0 the command carries ``--resume``, so a restarted group continues from RUN_DIR's
    latest checkpoint (an empty RUN_DIR starts from step 0). With ``--resume`` an existing RUN_DIR
    of the same spec is continued, not replaced: give a fresh run a fresh RUN_DIR.

    Args:
        spec: experiment spec (TOML), relative to the working directory of the job
        run_dir: run directory for checkpoints, logs and metrics (shared by all nodes)
        j: {nnodes}x{nproc_per_node} (e.g. 1x2, 2x8) or {min_nnodes}:{nnodes}x{nproc_per_node}
        overrides: spec overrides KEY=VALUE, each passed as --set (comma-separated on the CLI;
            commas inside [...], {...} or quotes stay within one value)
        resume: continue from RUN_DIR's latest checkpoint (implied when max_restarts or
            max_retries is above 0)
        progress: show the progress bar (redrawn every 10 s when not on a terminal)
        max_restarts: torchrun restarts of the worker group after a worker failure
        max_retries: scheduler retries of the whole job (not supported by local_cwd)
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica); nproc_per_node should not exceed it
        memMB: memory per node (replica) in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables of the workers (e.g. OMP_NUM_THREADS=1,LOGLEVEL=INFO)
        mounts: volumes of the containers (kubernetes, docker), e.g.
            type=bind,src=/shared,dst=/shared or type=volume,src=PVC_NAME,dst=/shared
        image: container image with recsys installed (kubernetes, docker); the local_cwd and
            slurm schedulers run in the current directory and ignore it
        name: job name, {experiment}/{run}
        rdzv_port: port of the c10d rendezvous on the first node (multi-node only)
    """
    args = ["train", spec, "--run-dir", run_dir]
    for item in join_overrides(overrides or []):
        args += ["--set", item]
    if resume or max_restarts > 0 or max_retries > 0:
        args.append("--resume")
    if not progress:
        args.append("--no-progress")
    return _app("train", args, name=name, j=j, max_restarts=max_restarts,
                max_retries=max_retries, cpu=cpu, gpu=gpu, memMB=memMB, h=h, env=env,
                mounts=mounts, image=image, rdzv_port=rdzv_port)


def evaluate(
    run_dir: str,
    j: str = "1x2",
    max_restarts: int = 0,
    max_retries: int = 0,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    image: str = LOCAL_IMAGE,
    name: str = "recsys/evaluate",
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Re-evaluate a run from its latest complete checkpoint: ``recsys evaluate RUN_DIR`` (valid and
    test metrics, written to RUN_DIR/evaluation.json beside the run's own metrics.json). Any -j
    works: the checkpoint is resharded to this number of processes.

    Args:
        run_dir: a run directory written by the train component (or recsys train)
        j: {nnodes}x{nproc_per_node} (need not be the training run's)
        max_restarts: torchrun restarts of the worker group after a worker failure
        max_retries: scheduler retries of the whole job (not supported by local_cwd)
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica)
        memMB: memory per node (replica) in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables of the workers (e.g. OMP_NUM_THREADS=1)
        mounts: volumes of the containers (kubernetes, docker), e.g.
            type=bind,src=/shared,dst=/shared or type=volume,src=PVC_NAME,dst=/shared
        image: container image with recsys installed (kubernetes, docker); the local_cwd and
            slurm schedulers run in the current directory and ignore it
        name: job name, {experiment}/{run}
        rdzv_port: port of the c10d rendezvous on the first node (multi-node only)
    """
    return _app("evaluate", ["evaluate", run_dir], name=name, j=j, max_restarts=max_restarts,
                max_retries=max_retries, cpu=cpu, gpu=gpu, memMB=memMB, h=h, env=env,
                mounts=mounts, image=image, rdzv_port=rdzv_port)


def export(
    run_dir: str,
    out: str,
    quantize: str = "none",
    check: bool = True,
    max_retries: int = 0,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    image: str = LOCAL_IMAGE,
    name: str = "recsys/export",
) -> specs.AppDef:
    """TorchScript export of a run's latest checkpoint: ``recsys export RUN_DIR --out OUT
    --quantize Q`` (model.pt and manifest.json, with a parity check against eager PyTorch on the
    test split). One process on one node (torchrun 1x1).

    Args:
        run_dir: a run directory with checkpoints
        out: directory for model.pt and manifest.json
        quantize: embedding rows in the artifact: none (fp32), fp16 or int8
        check: run the parity check against eager PyTorch on the test split
        max_retries: scheduler retries of the job (not supported by local_cwd)
        cpu: CPUs of the node
        gpu: GPUs of the node
        memMB: memory of the node in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables of the process (e.g. OMP_NUM_THREADS=4)
        mounts: volumes of the containers (kubernetes, docker), e.g.
            type=bind,src=/shared,dst=/shared or type=volume,src=PVC_NAME,dst=/shared
        image: container image with recsys installed (kubernetes, docker); the local_cwd and
            slurm schedulers run in the current directory and ignore it
        name: job name, {experiment}/{run}
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
    args = ["export", run_dir, "--out", out, "--quantize", quantize]
    if not check:
        args.append("--no-check")
    return _app("export", args, name=name, j="1x1", max_restarts=0, max_retries=max_retries,
                cpu=cpu, gpu=gpu, memMB=memMB, h=h, env=env, mounts=mounts, image=image,
                rdzv_port=29500)


def join_overrides(items: List[str]) -> List[str]:
    """The KEY=VALUE overrides of a list that torchx's CLI split on every comma: a piece that
    continues an open ``[``/``{``/``(`` or quote, or has no ``=``, belongs to the previous one.

    >>> join_overrides(["a=1", "model.hidden=[64", "32]", "b=x"])
    ['a=1', 'model.hidden=[64,32]', 'b=x']
    """
    out: List[str] = []
    for item in items:
        if out and (_is_open(out[-1]) or ("=" not in item and item.strip())):
            out[-1] += "," + item
        elif item.strip():
            out.append(item.strip())
    return out


def _is_open(s: str) -> bool:
    depth = sum(s.count(c) for c in "[{(") - sum(s.count(c) for c in "]})")
    return depth > 0 or s.count('"') % 2 == 1 or s.count("'") % 2 == 1


def _app(role: str, module_args: List[str], *, name: str, j: str, max_restarts: int,
         max_retries: int, cpu: int, gpu: int, memMB: int, h: Optional[str],
         env: Optional[Dict[str, str]], mounts: Optional[List[str]], image: str,
         rdzv_port: int) -> specs.AppDef:
    """dist.ddp's AppDef for ``python -m recsys.cli MODULE_ARGS``, with torchrun's
    ``--max_restarts`` and the role named after the component."""
    if max_restarts < 0 or max_retries < 0:
        raise ValueError("max_restarts and max_retries must be >= 0")
    app = dist.ddp(*module_args, m=MODULE, image=image, name=name, h=h, cpu=cpu, gpu=gpu,
                   memMB=memMB, j=j, env=dict(env or {}), max_retries=max_retries,
                   rdzv_port=rdzv_port, mounts=mounts or None)
    (r,) = app.roles
    flag, cmd = r.args  # ["-c", "torchrun --rdzv_backend ... -m recsys.cli ..."]
    if flag != "-c" or not cmd.startswith(_TORCHRUN):
        raise RuntimeError(f"unexpected torchx dist.ddp command (torchx changed?): {r.args}")
    cmd = f"{_TORCHRUN}--max_restarts {max_restarts} {cmd[len(_TORCHRUN):]}"
    r.args = [flag, _local_path(image) + cmd]
    r.name = role
    return app


def _local_path(image: str) -> str:
    """For a job that runs in this checkout (``image == "."``), a ``PATH=...`` prefix that appends
    the bin directory of the Python running torchx, if torchrun is there: an activated
    environment still comes first, and on a host without that directory nothing changes.
    ``$$`` is torchx's escape for ``$`` (the schedulers substitute macros in the args)."""
    bindir = Path(sys.executable).parent
    if image != LOCAL_IMAGE or not (bindir / "torchrun").is_file():
        return ""
    return f'PATH="$$PATH":{shlex.quote(str(bindir))} '
