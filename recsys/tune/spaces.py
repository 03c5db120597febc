"""The default search spaces: what ``recsys tune`` searches when the spec's ``[tune]`` section lists
no ``space``.

Every spec gets the learning rates (a decade either side of the spec's own), the dense weight
decay and, where tables take ``features.embedding_dim``, that dim; then its arch's knobs (widths
and depths, dropout, PIN's layers and subspaces, DynInt's rank, AdaEnsemble's top-k and number of
experts, RankTower's head dim and widths) and those of the methods it switches on (FTRL's λ1 / λ2, the
hierarchical λ with the RVQ levels and codes, the listwise weight). An arch's knobs are found from
the sections its ``[model]`` class declares, never from its name.

A default value that the spec rejects on its own (a subspace count that does not divide its
dim) is dropped by :func:`fitting_defaults`, so a default space always resolves.

Example:
    >>> [e.key for e in default_space(load_spec("specs/xdeepint.toml"))][:2]
    ['train.sparse_optimizer.lr', 'train.dense_optimizer.lr']
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from recsys.errors import SpecError
from recsys.spec import SpaceEntry, Spec
from recsys.tune.space import resolve_space

log = logging.getLogger("recsys.tune")

__all__ = ["default_space", "fitting_defaults"]

# widths x depths of an MLP tower: one categorical, since a depth changes how many widths there are
MLP_HIDDEN = [[128, 64], [256, 128], [256, 128, 64], [512, 256, 128], [1024, 512, 256]]


def _float(key: str, low: float, high: float, log: bool = False) -> SpaceEntry:
    return SpaceEntry(key=key, type="float", low=low, high=high, log=log)


def _int(key: str, low: int, high: int) -> SpaceEntry:
    return SpaceEntry(key=key, type="int", low=low, high=high)


def _choice(key: str, choices: list[Any]) -> SpaceEntry:
    return SpaceEntry(key=key, type="categorical", choices=choices)


def _around(key: str, value: float) -> SpaceEntry:
    """A log-uniform learning rate from a tenth of ``value`` to ten times it."""
    return _float(key, value / 10, value * 10, log=True)


def default_space(spec: Spec) -> list[SpaceEntry]:
    """The default entries for ``spec`` (not yet checked against it: :func:`fitting_defaults`)."""
    train = spec.train
    entries = [_around("train.sparse_optimizer.lr", train.sparse_optimizer.lr),
               _around("train.dense_optimizer.lr", train.dense_optimizer.lr),
               _choice("train.dense_optimizer.weight_decay", [0.0, 1e-6, 1e-5, 1e-4])]
    features = spec.features
    if any(t.embedding_dim is None for t in features.tables) or any(
            f.embedding_dim is None and f.table is None and f.kind != "dense"
            for f in features.fields):
        entries.append(_choice("features.embedding_dim", [8, 16, 32, 64]))
    entries += _arch_entries(spec.model)
    entries += _method_entries(spec)
    return entries


def _arch_entries(model: Any) -> list[SpaceEntry]:
    sections = type(model).model_fields
    out = []
    if "mlp" in sections:
        out += [_choice("model.mlp.hidden", MLP_HIDDEN), _float("model.mlp.dropout", 0.0, 0.3)]
    if "dcn" in sections:
        out.append(_int("model.dcn.num_layers", 1, 4))
    if "pin" in sections:
        out += [_int("model.pin.num_layers", 1, 5), _choice("model.pin.subspaces", [1, 2, 4, 8]),
                _float("model.pin.dropout", 0.0, 0.3)]
    if "dynint" in sections:
        out += [_int("model.dynint.rank", 2, 8), _int("model.dynint.num_basis", 2, 8)]
    if "moe" in sections:
        out += [_int("model.moe.top_k", 1, 3), _choice("model.moe", _expert_sets(model.moe))]
    if "ranktower" in sections:
        # (the number of heads stays the spec's: DSSM shares this section and ignores it, and
        # arch names are not compared outside recsys/models/archs/)
        out += [_choice("model.ranktower.head_dim", [16, 32, 64]),
                _choice("model.ranktower.hidden", [[64], [128], [256], [256, 128]])]
    return out


def _expert_sets(moe: Any) -> list[dict[str, Any]]:
    """AdaEnsemble with its first 3, 4, ... experts, each set with its prior renormalized (the
    prior must have one weight per expert, so the two are one choice)."""
    sets = []
    for n in range(3, len(moe.experts) + 1):
        prior = moe.expert_prior[:n]
        total = sum(prior)
        sets.append({"experts": [str(e) for e in moe.experts[:n]],
                     "expert_prior": [p / total for p in prior]})
    return sets


def _method_entries(spec: Spec) -> list[SpaceEntry]:
    out = []
    optimizers = {"sparse_optimizer": spec.train.sparse_optimizer,
                  "dense_optimizer": spec.train.dense_optimizer,
                  "interaction_optimizer": spec.train.interaction_optimizer}
    for name, opt in optimizers.items():
        if opt is not None and opt.name in ("gftrl", "ftrl"):
            out += [_float(f"train.{name}.ftrl.l1", 1e-4, 1.0, log=True),
                    _float(f"train.{name}.ftrl.l2", 1e-4, 1.0, log=True)]
    interaction = spec.train.interaction_optimizer
    if interaction is not None:
        out.append(_around("train.interaction_optimizer.lr", interaction.lr))
    hierarchical = spec.loss.hierarchical
    if hierarchical.weight > 0:
        out.append(_float("loss.hierarchical.weight", 0.03, 1.0, log=True))
        if hierarchical.codes == "online":
            out.append(_choice("loss.hierarchical.rvq.codes", [4, 8, 16, 32]))
            if hierarchical.level_weights is None:  # (one weight per level otherwise)
                out.append(_int("loss.hierarchical.rvq.levels", 2, 4))
    if spec.loss.listwise.weight > 0:
        out.append(_float("loss.listwise.weight", 0.03, 1.0, log=True))
    return out


def fitting_defaults(spec: Spec, raw: Mapping[str, Any], file: str) -> list[SpaceEntry]:
    """:func:`default_space` without the values ``spec`` rejects on their own (each dropped value
    is logged); entries left with no value are dropped whole."""
    kept = []
    for entry in default_space(spec):
        try:
            resolve_space(spec, raw, file, [entry])
            kept.append(entry)
            continue
        except SpecError as e:
            problem = e.problems[0]
        if entry.type != "categorical":
            log.info("default space: left out %s", problem)
            continue
        fits = [c for c in entry.choices or [] if _fits(spec, raw, file, entry, c)]
        log.info("default space: %s keeps %s of its choices", entry.key, fits)
        if fits:
            kept.append(entry.model_copy(update={"choices": fits}))
    return kept


def _fits(spec: Spec, raw: Mapping[str, Any], file: str, entry: SpaceEntry, choice: Any) -> bool:
    try:
        resolve_space(spec, raw, file, [entry.model_copy(update={"choices": [choice]})])
    except SpecError:
        return False
    return True
