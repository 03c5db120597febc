"""The arch registry: every module of this package that defines ``ARCH`` (an
:class:`~recsys.models.archs.base.ArchDef`) is an arch, named by ``ARCH.name``.

Adding an arch is adding one file here (see docs/architecture.md, "How to add an arch"); nothing
outside this package compares arch names.

Example:
    >>> sorted(ARCHS)[:3]
    ['dcn', 'deepfm', 'dlrm']
    >>> arch_of(spec.model).cascade_view
    False
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from recsys.models.archs.base import AUX_LOSS, ArchDef, Fields, ModelBase, OverArch

__all__ = ["ARCHS", "AUX_LOSS", "DEFAULT_ARCH", "ArchDef", "Fields", "ModelBase", "OverArch", "arch_of",
           "build_over_arch"]

DEFAULT_ARCH = "mlp"


def _discover() -> dict[str, ArchDef]:
    found: dict[str, ArchDef] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        arch = getattr(module, "ARCH", None)
        if not isinstance(arch, ArchDef):
            continue
        if arch.name in found:
            raise RuntimeError(f"arch '{arch.name}' is defined twice ({module.__name__})")
        found[arch.name] = arch
    return found


ARCHS: dict[str, ArchDef] = _discover()


def arch_of(model: Any) -> ArchDef:
    """The registry entry of a ``[model]`` section (or of an arch name)."""
    name = model if isinstance(model, str) else model.arch
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown arch '{name}'; known: {', '.join(sorted(ARCHS))}") from None


def build_over_arch(model: ModelBase, fields: Fields) -> OverArch:
    """The over-arch of ``model.arch`` for ``fields``."""
    return arch_of(model).build(model, fields)
