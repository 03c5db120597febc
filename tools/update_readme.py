"""Rewrite the results in docs/results.md, and their summary in the README, from benchmark outputs
(never typed by hand).

    python tools/update_readme.py [DIR ...]     # default: bench-results report

Every ``NAME.json`` / ``NAME.md`` pair that ``recsys bench NAME --out DIR`` or ``recsys report --out
DIR`` wrote becomes one subsection of docs/results.md, with the machine and versions it was measured
on; subsections of results not in DIR stay as they were. The README's summary is the targets table
(``recsys bench all``) with a link to the rest. Each sits between its markers below; everything else
in either file is left as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
SUMMARY_START, SUMMARY_END = "<!-- summary:start -->", "<!-- summary:end -->"
TARGETS = "### `recsys bench targets`"
ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("docs") / "results.md"


def measured_sections(dirs: list[Path]) -> dict[str, str]:
    """``{heading: subsection}`` for every ``NAME.json`` / ``NAME.md`` pair in ``dirs``, the
    targets summary (recsys bench all) first, then by name."""
    sections: dict[str, str] = {}
    paths = [p for d in dirs for p in sorted(d.glob("*.json"), key=lambda p: (p.stem != "targets",
                                                                             p.stem))]
    for path in paths:
        result = json.loads(path.read_text())
        table = path.with_suffix(".md")
        if not table.is_file():
            raise SystemExit(f"{table}: missing (rerun `recsys bench {path.stem}`)")
        m = result.get("machine", {})
        command = result.get("command", f"recsys bench {result.get('benchmark', path.stem)}")
        heading = f"### `{command}`"
        sections[heading] = "\n".join([
            heading, "", table.read_text().strip(), "",
            f"_Measured on {m.get('cores', '?')} cores ({m.get('cpu', '?')}), Python "
            f"{m.get('python', '?')}, torch {m.get('torch', '?')}, pyarrow "
            f"{m.get('pyarrow', '?')}._", ""])
    return sections


def kept_sections(old: str) -> dict[str, str]:
    """The subsections of the current results section, by heading."""
    sections: dict[str, str] = {}
    for chunk in ("\n" + old).split("\n### ")[1:]:
        heading, _, body = chunk.partition("\n")
        sections[f"### {heading}"] = f"### {heading}\n{body}".rstrip() + "\n"
    return sections


def results_section(dirs: list[Path], old: str = "") -> str:
    """The new results section: a subsection per result in ``dirs``; a subsection of ``old`` whose
    benchmark or report is not among them is kept as it was (``make bench`` does not rerun
    ``recsys report``)."""
    fresh = measured_sections(dirs)
    if not fresh:
        raise SystemExit(f"{', '.join(map(str, dirs))}: no results (run `recsys bench ...` or "
                         "`recsys report` first)")
    kept = {h: body for h, body in kept_sections(old).items() if h not in fresh}
    return "\n".join([START, "", *fresh.values(), *kept.values(), END])


# the paragraphs of the quality studies that the README repeats: (subsection, paragraph title)
SUMMARIZED = (("### `recsys report --only tuned`", "**goal:"),
              ("### `recsys report --only tuned`", "**why the misses**"),
              ("### `recsys report --only hgr-sweep`", "**where HGR beats both baselines**"))


def paragraph(section: str, title: str) -> str | None:
    """The block of ``section`` that starts with a line beginning with ``title``, up to the next
    block that starts with a bold title (or the end); None when there is none."""
    blocks = section.split("\n\n")
    for i, block in enumerate(blocks):
        if block.startswith(title):
            rest = blocks[i + 1:]
            end = next((j for j, b in enumerate(rest) if b.startswith("**") or
                        b.startswith("_Measured")), len(rest))
            return "\n\n".join([block, *rest[:end]]).strip()
    return None


def summary_section(results: str) -> str:
    """The README's summary: the targets subsection of ``results`` (when there is one), the goal
    of the equal-budget study and the HGR sweep's verdict (when they ran), and a link to the whole
    of docs/results.md."""
    sections = kept_sections(results.split(START, 1)[-1].split(END, 1)[0])
    targets = sections.get(TARGETS)
    body = [targets.replace(TARGETS, "**Targets** (`recsys bench targets`)", 1).strip()] \
        if targets else []
    for heading, title in SUMMARIZED:
        found = paragraph(sections.get(heading, ""), title)
        if found:
            first, _, rest = found.partition("\n")
            body.append(f"{first} (from {heading.removeprefix('### ')})\n{rest}")
    body.append(f"Every table (training, data, serving, the methods' benchmarks and the quality "
                f"experiments over seeds): [{RESULTS}]({RESULTS}).")
    return "\n".join([SUMMARY_START, "", "\n\n".join(body), "", SUMMARY_END])


def between(text: str, start: str, end: str, new: str, where: Path) -> str:
    """``text`` with what lies between ``start`` and ``end`` (markers included) replaced."""
    if start not in text or end not in text:
        raise SystemExit(f"{where}: the markers {start} and {end} are missing")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + new + tail


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv] or [ROOT / "bench-results", ROOT / "report"]
    dirs = [d for d in dirs if d.is_dir()]
    results_path, readme = ROOT / RESULTS, ROOT / "README.md"
    text = results_path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{results_path}: the markers {START} and {END} are missing")
    old = text.split(START, 1)[1].split(END, 1)[0]
    section = results_section(dirs, old)
    results_path.write_text(between(text, START, END, section, results_path))
    readme.write_text(between(readme.read_text(), SUMMARY_START, SUMMARY_END,
                              summary_section(section), readme))
    print(f"rewrote {results_path} and the README's summary from {', '.join(map(str, dirs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
