"""What this process costs the machine (shared by ``recsys plan`` and the training benchmark)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this program's own memory.
    (``ru_maxrss`` is no use in a subprocess there: exec keeps the larger of the parent's RSS at
    fork time and the child's.) Elsewhere: ``ru_maxrss`` (bytes on macOS).

    Example:
        >>> peak_rss_bytes() > 0
        True
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
