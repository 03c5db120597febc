"""recsys.denormals: a training or serving process computes subnormal floats as zero, on every
thread, unless turned off. Run in a fresh process each: the mode is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# the intra-op threads exist before the call (as they do once a model is built), and a large
# product is split over them: every element of it must be flushed, not only the calling thread's
SCRIPT = """
import torch
torch.set_num_threads(2)
torch.ones(1 << 20).mul(2.0).sum()  # start the intra-op threads first
from recsys.denormals import flush_denormals
applied = flush_denormals()
tiny = torch.full((1 << 20,), 1e-39)  # subnormal in float32 (normal floats start at 1.18e-38)
product = tiny * 1.0
print(applied, int((product == 0).sum()), int((tiny @ torch.ones(1 << 20) == 0)))
"""


def _run(env_value: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "RECSYS_DENORMALS"}
    if env_value is not None:
        env["RECSYS_DENORMALS"] = env_value
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def test_subnormals_are_zero_on_every_thread_unless_kept() -> None:
    applied, zeros, dot_is_zero = _run(None)
    if applied == "False":
        pytest.skip("this CPU has no flush-to-zero mode")
    assert (zeros, dot_is_zero) == (str(1 << 20), "1")  # read as zero everywhere
    applied, zeros, dot_is_zero = _run("keep")
    assert (applied, zeros, dot_is_zero) == ("False", "0", "0")  # 1e-39 stays 1e-39
