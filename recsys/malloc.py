"""The C allocator's settings for training and serving processes (glibc only; elsewhere nothing
changes).

A training step allocates and frees the same tensors every step: activations and gradients of
0.1-10 MB each. glibc serves such sizes from fresh ``mmap`` pages or trims the heap back to the
system once they are freed, so every step pays page faults to touch that memory again; on a
2-core machine that was about 10 % of a small model's step (DCN-v2 on MovieLens, batch 1024:
11.8 against 13.7 ms at best, measured side by side in one process). Keeping the freed memory in
the process (a high mmap and trim threshold, and some top pad) is what PyTorch's CPU performance
guides get from jemalloc or tcmalloc, without preloading a library. The price is resident memory
that is not handed back between steps, at most about :data:`TRIM_THRESHOLD` above the peak in use.
A server pays the same per request: RankTower's scorer took about 260 page faults per request
(1,000 candidates, one thread) under glibc's own settings and 2 under these.

``RECSYS_MALLOC=default`` leaves glibc's own settings (docs/environment.md).

Example:
    >>> tune_malloc()            # once, early in a process that trains or serves
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 64 << 20  # allocations below this come from the heap and are reused
TRIM_THRESHOLD = 512 << 20  # freed memory kept at the heap top before it is returned
TOP_PAD = 64 << 20  # extra heap asked for at each growth
ENV = "RECSYS_MALLOC"

_done = False


def tune_malloc() -> bool:
    """Apply the settings above once per process; True where they took effect (glibc, and not
    turned off by ``RECSYS_MALLOC=default``)."""
    global _done
    if _done:
        return True
    if os.environ.get(ENV, "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD)))
    return _done
