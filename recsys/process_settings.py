"""The process-wide settings of a process that trains, evaluates, serves or benchmarks, applied
together so that no such process gets one without the other: glibc's allocator thresholds
(:mod:`recsys.malloc`) and subnormal floats flushed to zero (:mod:`recsys.denormals`).

Example:
    >>> tune_process()   # once, early in the process
"""

from __future__ import annotations

from recsys.denormals import flush_denormals
from recsys.malloc import tune_malloc


def tune_process() -> None:
    """Apply both settings (each its own ``RECSYS_*`` switch: docs/environment.md)."""
    tune_malloc()
    flush_denormals()
