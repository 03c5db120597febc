"""Benchmarks (`recsys bench NAME`): each measures side by side in one run and writes JSON + a table."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import pyarrow

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyarrow": pyarrow.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }


def write_result(out_dir: str | Path, name: str, result: dict[str, Any], table: str) -> Path:
    """Write ``NAME.json`` (the numbers and the machine, unless ``result`` brings its own record)
    and ``NAME.md`` (the table) into out_dir."""
    from recsys.fsutil import atomic_write_text, writing

    out = Path(out_dir)
    # a result may bring its own machine record (recsys bench archs: torch alone, no pyarrow)
    payload = {"benchmark": name, **result}
    if "machine" not in payload:
        payload["machine"] = machine()
    path = out / f"{name}.json"
    # whole files or none (a full disk must not leave a truncated JSON that later runs read)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))
        atomic_write_text(out / f"{name}.md", table + "\n")
    return path


def run_and_write(name: str, run: Callable[[Any], dict[str, Any]],
                  table: Callable[[dict[str, Any]], str], cfg: Any, out_dir: str | Path,
                  echo: bool = True) -> Path:
    """``run(cfg)``, then write ``NAME.json`` / ``NAME.md`` into out_dir (and print the table)."""
    result = run(cfg)
    text = table(result)
    path = write_result(out_dir, name, result, text)
    if echo:
        print(text)
        print(f"\nwrote {path}")
    return path
