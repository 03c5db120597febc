"""Process-group setup: one process, or any number under torchrun, with the same code path."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from recsys.errors import RecsysError, RunError, SpecError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world, and its device.

    Example:
        >>> ctx = init_distributed("auto")
        >>> ctx.rank, ctx.world_size, ctx.device
        (0, 1, device(type='cpu'))
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def choose_device(wanted: str, local_rank: int = 0) -> torch.device:
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SpecError("spec", ["train.device: 'cuda' but no CUDA device is visible "
                                     "(use 'auto' or 'cpu')"])
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto") -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...), or make a
    one-process group, so that DistributedModelParallel runs the same way in both cases."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = choose_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            # a bounded wait: a worker whose peers never connect (e.g. after an elastic restart)
            # fails instead of hanging for torch's default 30 minutes, so the agent can restart
            # the group again; RECSYS_PG_TIMEOUT_S bounds every collective, so keep it generous
            timeout = timedelta(seconds=float(os.environ.get("RECSYS_PG_TIMEOUT_S", "600")))
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                    store=_attempt_store(world_size, timeout))
        else:
            if world_size != 1:
                raise RunError("WORLD_SIZE", f"{world_size} without MASTER_ADDR: launch several "
                               "processes with torchrun (or torchx), not by setting WORLD_SIZE")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def _attempt_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun's agent store, a store whose keys belong to this restart attempt only.

    The elastic agent keeps one store for the whole job, and the process group's keys (each rank's
    gloo address) have the same names in every attempt: a worker of a restarted group could read a
    dead worker's address left by the attempt before, connect to nothing, and time out (seen as
    "Gloo connectFullMesh failed ... Connect timeout"). A prefix per attempt keeps them apart.
    Elsewhere: None (``init_process_group`` makes its own store from MASTER_ADDR / MASTER_PORT).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt is None:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"recsys/attempt_{attempt}", store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int) -> None:
    """Model init equal on every rank (seed), data order from the loader's own seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    del rank  # every rank builds the same initial dense weights; DDP keeps them equal


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_max(value: int) -> int:
    """The largest ``value`` over all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


T = TypeVar("T")


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; if it fails, every rank fails
    with the same one-line error (instead of rank 0 dying while the others wait in a collective).

    Example:
        >>> path = on_main(lambda: checkpoint.latest(run_dir))   # one choice, the same on all ranks
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    payload: list[object] = [None, None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload[0] = fn()
        except RecsysError as e:
            failure, payload[1] = e, str(e)
        except Exception as e:  # a bug: rank 0 shows the traceback, the others one line
            failure, payload[1] = e, f"rank 0 failed: {type(e).__name__}: {e}"
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    if payload[1] is not None:
        raise RecsysError(str(payload[1]))
    return payload[0]  # type: ignore[return-value]
