"""What this process costs the machine: its peak memory and the bytes of its tensors (shared by
``recsys plan`` and the training benchmark)."""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor


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


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, ShardedTensor):
        for shard in obj.local_shards():
            yield shard.tensor
    elif isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (tensors, ShardedTensors' local shards, nested dicts and
    lists), each distinct (address, size) once.

    Example:
        >>> tensor_bytes({"w": torch.zeros(4, 4), "b": [torch.zeros(4)]})
        80
    """
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    for t in _tensors(obj):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
