"""tools/update_readme.py: docs/results.md from benchmark outputs, keeping the subsections of
results that were not rerun, and the README's summary of them."""

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


def test_the_readme_summary_is_the_targets_table_and_a_link(tmp_path: Path) -> None:
    _result(tmp_path, "targets", "| target | met |\n|:--|:--|\n| speed | yes |")
    _result(tmp_path, "data", "data table")
    section = update_readme.results_section([tmp_path], "")
    summary = update_readme.summary_section(section)
    assert summary.startswith(update_readme.SUMMARY_START)
    assert summary.endswith(update_readme.SUMMARY_END)
    assert "| speed | yes |" in summary and "data table" not in summary
    assert "[docs/results.md](docs/results.md)" in summary
    # without a targets table, only the link
    no_targets = tmp_path / "other"
    _result(no_targets, "moe", "moe table")
    summary = update_readme.summary_section(update_readme.results_section([no_targets], ""))
    assert "moe table" not in summary and "docs/results.md" in summary


def test_the_shipped_files_have_their_markers() -> None:
    readme = (ROOT / "README.md").read_text()
    assert update_readme.SUMMARY_START in readme and update_readme.SUMMARY_END in readme
    results = (ROOT / "docs" / "results.md").read_text()
    assert update_readme.START in results and update_readme.END in results


def test_the_summary_repeats_the_studies_verdicts(tmp_path: Path) -> None:
    tuned = ("**synthetic**\n\n| model | AUC |\n|:--|:--|\n| dcn | 0.7 |\n\n"
             "**goal: each seed method within seed spread**\n\n| method | met |\n|:--|:--|\n"
             "| pin | yes |\n\nΔ is the difference.\n\n**why the misses**: the gap\n\n"
             "| xdeepint | -0.002 |\n\n**what each paper claims**\n\n| x |")
    _result(tmp_path, "tuned", tuned, command="recsys report --only tuned")
    _result(tmp_path, "hgr-sweep", "**world a**\n\n| t |\n\n**where HGR beats both baselines** "
            "(HGR minus)\n\n| world | yes |", command="recsys report --only hgr-sweep")
    summary = update_readme.summary_section(update_readme.results_section([tmp_path], ""))
    assert "| pin | yes |" in summary and "Δ is the difference." in summary
    assert "**why the misses**: the gap (from" in summary and "| xdeepint | -0.002 |" in summary
    assert "what each paper claims" not in summary and "| dcn | 0.7 |" not in summary
    assert "| world | yes |" in summary and "| t |" not in summary
    assert "(from `recsys report --only tuned`)" in summary
    assert "(from `recsys report --only hgr-sweep`)" in summary
