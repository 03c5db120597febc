"""Which TorchRec train pipeline drives a training step, and the few calls that differ between them.

``TrainPipelineSparseDist`` starts the next batch's input distribution (its all-to-alls) before the
current batch's forward, so that the communication overlaps compute across ranks and devices.
With one process on CPU there is nothing to overlap: the all-to-all is with the process itself and
everything runs on one stream. There ``TrainPipelineBase`` (forward, backward, optimizer step, the
next batch fetched ahead) does the same arithmetic with less bookkeeping per step: DCN-v2 on
MovieLens at batch 1024 took 11.63 ms against 12.31 ms per step (medians, alternating in one
process). The sharded model, its plan and its fused optimizers are the same either way.

Example:
    >>> pipeline = make_pipeline(built.dmp, built.optimizer, torch.device("cpu"), world_size=1)
    >>> restart(pipeline)          # before each epoch's iterator
    >>> out = pipeline.progress(batches)
    >>> with detached(pipeline, built.dmp):   # plain forwards (evaluation)
    ...     built.dmp(batch)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist


class _ForwardCall:
    """``model`` called through ``forward`` (e.g. under autocast), for TrainPipelineBase, which
    calls its model directly; ``training`` is the model's own."""

    def __init__(self, model: torch.nn.Module, forward: Callable[[Any], Any]) -> None:
        self.model, self.forward = model, forward

    @property
    def training(self) -> bool:
        return self.model.training

    def __call__(self, batch: Any) -> Any:
        return self.forward(batch)


def make_pipeline(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                  world_size: int, forward: Callable[[Any], Any] | None = None,
                  overlap: bool | None = None) -> TrainPipelineBase | TrainPipelineSparseDist:
    """The train pipeline for ``model`` (a DistributedModelParallel).

    Args:
        model: what the pipeline trains; called on each batch, returns ``(losses, output)``.
        optimizer: stepped after each backward.
        device: where batches go.
        world_size: processes in the job.
        forward: called instead of ``model`` (the bf16 autocast forward); None: ``model``.
        overlap: TrainPipelineSparseDist (True) or TrainPipelineBase (False); None chooses
            SparseDist except for one process on CPU.
    """
    if overlap is None:
        overlap = not (world_size == 1 and device.type == "cpu")
    if overlap:
        return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True,
                                       custom_model_fwd=forward)
    called = model if forward is None else _ForwardCall(model, forward)
    return TrainPipelineBase(called, optimizer, device)  # type: ignore[arg-type]


def restart(pipeline: TrainPipelineBase | TrainPipelineSparseDist) -> None:
    """Ready ``pipeline`` for a new iterator (a new epoch's batches): TrainPipelineBase stops for
    good once an iterator ends, SparseDist refills itself from the next one."""
    if not isinstance(pipeline, TrainPipelineSparseDist):
        pipeline.reset()


@contextmanager
def detached(pipeline: TrainPipelineBase | TrainPipelineSparseDist,
             model: torch.nn.Module) -> Iterator[None]:
    """The sharded modules' own forwards inside (SparseDist rewrote them for pipelined input
    dists; in-flight training batches are kept); TrainPipelineBase rewrites nothing."""
    if not isinstance(pipeline, TrainPipelineSparseDist):
        yield
        return
    pipeline.detach()
    try:
        yield
    finally:
        pipeline.attach(model)
