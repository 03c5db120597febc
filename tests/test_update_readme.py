"""tools/update_readme.py: the README's results section from benchmark outputs, keeping the
subsections of results that were not rerun."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("update_readme", ROOT / "tools" / "update_readme.py")
update_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(update_readme)  # type: ignore[union-attr]


def _result(out: Path, name: str, table: str, **extra: object) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"benchmark": name, "machine": {"cores": 2},
                                                  **extra}))
    (out / f"{name}.md").write_text(table + "\n")


def test_fresh_results_replace_their_subsection_and_the_others_stay(tmp_path: Path) -> None:
    old = ("\n\n### `recsys bench moe`\n\nold moe table\n\n"
           "### `recsys report --only interactions`\n\nthe report\n\n")
    _result(tmp_path, "moe", "new moe table")
    _result(tmp_path, "targets", "the targets")
    _result(tmp_path, "data", "data table")
    section = update_readme.results_section([tmp_path], old)
    headings = [line for line in section.splitlines() if line.startswith("### ")]
    assert headings == ["### `recsys bench targets`", "### `recsys bench data`",
                        "### `recsys bench moe`", "### `recsys report --only interactions`"]
    assert "new moe table" in section and "old moe table" not in section
    assert "the report" in section  # not rerun: kept as it was
    assert section.startswith(update_readme.START) and section.endswith(update_readme.END)
