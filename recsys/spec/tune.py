"""The ``[tune]`` section: the search space and settings of ``recsys tune`` (recsys/tune/).

Each ``[[tune.space]]`` entry names a spec key path (the syntax of ``--set``: entries of
``features.fields`` / ``features.tables`` by name) and a distribution. The checks here are those
that need the section alone (bounds, choices, duplicate keys); whether a key exists in the spec and
whether its values fit it is checked against the whole spec by :mod:`recsys.tune.space`.

Example:
    >>> tune = TuneSpec.model_validate({"space": [
    ...     {"key": "train.dense_optimizer.lr", "type": "float", "low": 1e-4, "high": 1e-2,
    ...      "log": True},
    ...     {"key": "model.dcn.num_layers", "type": "int", "low": 1, "high": 4}]})
    >>> [e.key for e in tune.space], tune.pruner.kind
    (['train.dense_optimizer.lr', 'model.dcn.num_layers'], 'median')
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from recsys.validation import KeyedError, StrictModel

__all__ = ["DISTRIBUTIONS", "PrunerSpec", "SpaceEntry", "TuneSpec"]

# the distribution types a [[tune.space]] entry may name
DISTRIBUTIONS = ("float", "int", "categorical")


class SpaceEntry(StrictModel):
    """One searched key: ``float`` (low, high, log or step), ``int`` (low, high, step, log) or
    ``categorical`` (choices: any TOML values, lists and tables included)."""

    key: str
    type: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] | None = None

    def problems(self) -> list[tuple[str, str]]:
        """``(field, message)`` for each inconsistency of this entry on its own."""
        if self.type == "categorical":
            return self._categorical_problems()
        return self._numeric_problems()

    def _categorical_problems(self) -> list[tuple[str, str]]:
        out = [(name, "only for float and int distributions; a categorical one takes choices")
               for name in ("low", "high", "step") if getattr(self, name) is not None]
        if self.log:
            out.append(("log", "only for float and int distributions"))
        if not self.choices:
            out.append(("choices", "must list at least one value"))
        elif any(c is None for c in self.choices):
            out.append(("choices", "TOML has no null; list values only"))
        return out

    def _numeric_problems(self) -> list[tuple[str, str]]:
        if self.choices is not None:
            return [("choices", f"only for categorical distributions; a {self.type} one takes "
                                "low and high")]
        out = [(name, "required for a float or int distribution")
               for name in ("low", "high") if getattr(self, name) is None]
        if out:
            return out
        assert self.low is not None and self.high is not None
        if self.type == "int":
            out += [(name, f"must be an integer for an int distribution, got {value!r}")
                    for name, value in (("low", self.low), ("high", self.high),
                                        ("step", self.step))
                    if value is not None and not isinstance(value, int)]
        if not all(math.isfinite(v) for v in (self.low, self.high)):
            out.append(("low", "low and high must be finite numbers"))
        elif self.low >= self.high:
            out.append(("low", f"must be < high ({self.high}), got {self.low}"))
        if self.log and self.low <= 0:
            out.append(("low", f"must be > 0 for a log distribution, got {self.low}"))
        if self.step is not None and self.step <= 0:
            out.append(("step", f"must be > 0, got {self.step}"))
        if self.step is not None and self.log:
            out.append(("step", "a log distribution takes no step (Optuna samples it "
                                "continuously in log space)"))
        return out


class PrunerSpec(StrictModel):
    """``[tune.pruner]``: stop a trial whose periodic validation metric (every
    ``train.eval_every_steps``) is worse than the median of earlier trials at the same step."""

    kind: Literal["median", "none"] = "median"
    startup_trials: int = 5  # trials that run to the end before any is pruned
    warmup_steps: int = 0  # training steps of each trial before it may be pruned

    @model_validator(mode="after")
    def _check(self) -> PrunerSpec:
        for name in ("startup_trials", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        return self


class TuneSpec(StrictModel):
    """``[tune]``: what ``recsys tune`` searches and how.

    ``space`` empty means the defaults of the spec's arch and methods (recsys/tune/spaces.py).
    ``metric`` (default ``train.headline_metric``) is the validation metric the study optimizes;
    its direction comes from ``recsys.spec.HEADLINE_METRICS``, and trials train with it as their
    headline metric, so that early stopping and pruning follow it too.
    """

    space: list[SpaceEntry] = Field(default_factory=list)
    metric: str | None = None
    sampler_seed: int = 0
    startup_trials: int = 10  # TPE samples at random until this many trials have finished
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    timeout_s: float | None = None  # start no new trial after this long (running ones finish)

    @model_validator(mode="after")
    def _check(self) -> TuneSpec:
        seen: set[str] = set()
        for entry in self.space:
            if entry.key in seen:
                raise KeyedError(f"space[{entry.key}]", "listed twice; each key once")
            seen.add(entry.key)
            for field, message in entry.problems():
                raise KeyedError(f"space[{entry.key}].{field}", message)
        if self.startup_trials < 0:
            raise ValueError(f"startup_trials must be >= 0, got {self.startup_trials}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        return self
