"""A study's search space: its entries checked against the spec, Optuna distributions for them,
and sampled values applied to the raw spec.

An entry's key is a ``--set`` key path; it must name a key of the resolved spec (a key inside an
optional section the spec leaves unset, such as ``train.interaction_optimizer.lr`` without an
interaction optimizer, is an error too: setting it would switch the section on). Categorical
choices may be any TOML value; lists and tables reach Optuna as their JSON text (its categorical
distribution takes scalars only) and are decoded when applied. A table choice for a key that
names a section is merged into that section (one choice can set several keys that must agree,
such as AdaEnsemble's experts and their prior).

Example:
    >>> space = resolve_space(spec, raw, "specs/quickstart.toml")
    >>> params = {p.name: p.distribution for p in space}
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from recsys.errors import SpecError
from recsys.spec import SpaceEntry, Spec, only_arch_sections, spec_to_dict, validate_spec

__all__ = ["Param", "apply_params", "check_key", "resolve_space", "set_key"]


@dataclass(frozen=True)
class Param:
    """One searched key: its entry and the Optuna distribution it samples from."""

    entry: SpaceEntry
    distribution: BaseDistribution
    encoded: bool  # categorical choices held by Optuna as JSON text

    @property
    def name(self) -> str:
        return self.entry.key

    def decode(self, value: Any) -> Any:
        """The spec value of an Optuna parameter value."""
        return json.loads(value) if self.encoded else value

    def encode(self, value: Any) -> Any:
        """The Optuna parameter value of a spec value (enqueueing a trial by spec values)."""
        return json.dumps(value, sort_keys=True) if self.encoded else value


def make_param(entry: SpaceEntry) -> Param:
    """The Optuna distribution of an entry (whose own consistency pydantic checked)."""
    if entry.type == "categorical":
        choices = list(entry.choices or [])
        encoded = any(isinstance(c, (list, dict)) for c in choices)
        if encoded:  # every choice as JSON, so that a string choice cannot pass for a list
            choices = [json.dumps(c, sort_keys=True) for c in choices]
        return Param(entry, CategoricalDistribution(choices), encoded)
    if entry.type == "int":
        return Param(entry, IntDistribution(int(entry.low), int(entry.high), log=entry.log,  # type: ignore[arg-type]
                                            step=int(entry.step or 1)), False)
    return Param(entry, FloatDistribution(float(entry.low), float(entry.high),  # type: ignore[arg-type]
                                          log=entry.log,
                                          step=None if entry.step is None else float(entry.step)),
                 False)


def resolve_space(spec: Spec, raw: Mapping[str, Any], file: str,
                  entries: Iterable[SpaceEntry] | None = None) -> list[Param]:
    """The checked parameters of ``entries`` (default: the spec's ``tune.space``).

    Every key must exist in the resolved spec, and every value that a trial may take on its own
    (a float's low, an int's low and high, each choice) must give a valid spec with the base's
    other values: a wrong type or an out-of-range bound fails here, by key, before any trial
    runs. Combinations of values that clash are left to the trials (each such trial fails with
    the spec's message). Raises SpecError listing every problem.
    """
    if entries is None:
        entries = spec.tune.space if spec.tune is not None else []
    resolved = spec_to_dict(spec)
    problems: list[str] = []
    params = []
    for entry in entries:
        where = f"tune.space[{entry.key}]"
        problem = check_key(resolved, entry.key)
        if problem is None:
            problem = next((f"{field}: {message}" for field, message
                            in _bound_problems(entry, raw)), None)
            if problem is not None:
                problem = f".{problem}"
        else:
            problem = f": {problem}"
        if problem is not None:
            problems.append(f"{where}{problem}")
        else:
            params.append(make_param(entry))
    if problems:
        raise SpecError(file, problems)
    return params


def check_key(resolved: Mapping[str, Any], key: str) -> str | None:
    """Why ``key`` names no key of the resolved spec ``resolved`` (None when it does)."""
    node: Any = resolved
    parts = key.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = next((e for e in node if isinstance(e, dict) and e.get("name") == part), None)
            if node is None:
                return f"no entry '{part}' in {'.'.join(parts[:i])}"
            continue
        if not isinstance(node, dict):
            return f"'{'.'.join(parts[:i])}' is a value, not a section"
        if part not in node:
            known = ", ".join(sorted(node))
            return f"unknown spec key '{here}'; expected one of: {known}"
        node = node[part]
        if node is None and i < len(parts) - 1:
            return f"'{here}' is not set in this spec; set it there to tune its keys"
    return None


def _bound_problems(entry: SpaceEntry, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(field, message)`` for each value a trial may take alone that the spec rejects."""
    if entry.type == "categorical":
        values = [(f"choices[{i}]", c) for i, c in enumerate(entry.choices or [])]
    elif entry.type == "int":
        values = [("low", entry.low), ("high", entry.high)]
    else:  # a float's high is never sampled exactly (dropout < 1 may take high = 1.0)
        values = [("low", entry.low)]
    out = []
    for field, value in values:
        trial_raw = copy.deepcopy(dict(raw))
        set_key(trial_raw, entry.key, value)
        try:
            validate_spec(only_arch_sections(trial_raw))
        except SpecError as e:
            out.append((field, f"{value!r} gives an invalid spec: "
                               f"{'; '.join(e.problems)}"))
    return out


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (a ``--set`` key path) in the raw spec; a table value for a key that holds a
    table is merged into it, key by key.

    Example:
        >>> raw = {"model": {"moe": {"top_k": 2}}}
        >>> set_key(raw, "model.moe", {"top_k": 3, "depths": 2}); raw
        {'model': {'moe': {'top_k': 3, 'depths': 2}}}
    """
    node: Any = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            node = next(e for e in node if isinstance(e, dict) and e.get("name") == part)
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):  # (a whole entry of a list, by name)
        index = next(i for i, e in enumerate(node) if isinstance(e, dict) and e.get("name") == last)
        node[index] = _merged(node[index], value)
    else:
        node[last] = _merged(node.get(last), value)


def _merged(old: Any, value: Any) -> Any:
    if isinstance(old, dict) and isinstance(value, dict):
        out = dict(old)
        for k, v in value.items():
            out[k] = _merged(out.get(k), v)
        return out
    return copy.deepcopy(value)


def apply_params(raw: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the raw spec with each ``key: value`` set (spec values, not Optuna's)."""
    out = copy.deepcopy(dict(raw))
    for key, value in params.items():
        set_key(out, key, value)
    return only_arch_sections(out)
