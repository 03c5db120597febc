"""The pydantic base and small checks shared by the spec schema (recsys.spec) and the arch sections
(recsys.models.archs), kept apart so that neither imports the other's package."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors; values are checked with JSON-strict types (no '3' for 3)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class KeyedError(ValueError):
    """A check that knows the key path (relative to the model it validates) it is about."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


def positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def unique(what: str, names: Sequence[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{what} has '{n}' twice; names must be unique")
        seen.add(n)
