"""The exported modules' flat tensor inputs, shared by the ranker's export and the two-tower
serving split."""

from __future__ import annotations

from typing import Any

import torch


def flat_inputs(batch: Any, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Batch as the exported module's inputs: ``(dense, values, lengths)`` in ``keys`` order."""
    jagged = [batch.sparse[k] for k in keys]
    values = torch.cat([j.values() for j in jagged]).to(torch.int64)
    lengths = torch.cat([j.lengths() for j in jagged]).to(torch.int32)
    return batch.dense, values, lengths
