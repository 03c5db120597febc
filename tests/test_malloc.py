"""recsys.malloc: a training process keeps the memory its steps free (glibc), unless turned off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# allocate 32 MB with torch (as a step's activations are), touch every page, free it, and report
# whether tune_malloc applied and how much of the memory is still resident after the free
SCRIPT = """
import os, sys, torch
from recsys.malloc import tune_malloc
applied = tune_malloc()
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
torch.ones(1024).sum()  # torch's own lazy set-up, before the measurement
before = resident()
t = torch.ones(8 << 20)  # 32 MB, every page written
del t
print(applied, (resident() - before) >> 20)
"""


def _run(env_value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "RECSYS_MALLOC"}
    if env_value is not None:
        env["RECSYS_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_step_memory_stays_in_the_process_unless_turned_off() -> None:
    applied, kept_mb = _run(None)
    assert applied == "True" and kept_mb >= 24  # of 32: reused by the next step, no page faults
    applied, kept_mb = _run("default")
    # glibc unmaps a 32 MB chunk at once (a few MB of other allocations may come and stay)
    assert applied == "False" and kept_mb <= 16
