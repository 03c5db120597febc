"""Subnormal floats flushed to zero in the processes that train, evaluate or serve (x86's FTZ and
DAZ modes, through ``torch.set_flush_denormal``).

A float32 below 1.18e-38 is subnormal, and x86 CPUs compute with subnormals in microcode, up to
two orders of magnitude slower than with normal numbers: a (2048, 432) @ (432, 432) product took
486 ms with subnormal inputs against 2.8 ms (2 threads). Training makes them wherever a gate or a
router's weight is nearly zero. AdaEnsemble's expert gradients held hundreds of them within 40
steps of ``recsys bench models``' Criteo-shaped world, and its step went from about 190 ms to
650 ms by step 80; with them flushed it stayed at about 200 ms (DCN and DynInt held steady
either way). Flushing reads and writes them as zero: they lie far below anything a loss or a
metric can tell apart from zero.

``RECSYS_DENORMALS=keep`` keeps them (docs/environment.md).

Example:
    >>> flush_denormals()        # once, early in a process that trains or serves
    True
"""

from __future__ import annotations

import os

import torch

ENV = "RECSYS_DENORMALS"


def flush_denormals() -> bool:
    """Flush subnormals to zero in this process (its threads, present and future, included);
    True where it took effect (a CPU with the modes, and not turned off by
    ``RECSYS_DENORMALS=keep``)."""
    if os.environ.get(ENV, "").strip().lower() == "keep":
        return False
    return bool(torch.set_flush_denormal(True))
