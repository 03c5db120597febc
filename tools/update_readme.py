"""Rewrite the README's results section from benchmark outputs (never typed by hand).

    python tools/update_readme.py [DIR ...]     # default: bench-results report

Every ``NAME.json`` / ``NAME.md`` pair that ``recsys bench NAME --out DIR`` or ``recsys report --out
DIR`` wrote becomes one subsection, with the machine and versions it was measured on; subsections
of results not in DIR stay as they were. The section sits between the markers below; everything
else in the README is left as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
ROOT = Path(__file__).resolve().parents[1]


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


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv] or [ROOT / "bench-results", ROOT / "report"]
    dirs = [d for d in dirs if d.is_dir()]
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: the markers {START} and {END} are missing")
    head, rest = text.split(START, 1)
    old, tail = rest.split(END, 1)
    readme.write_text(head + results_section(dirs, old) + tail)
    print(f"rewrote the results section of {readme} from {', '.join(map(str, dirs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
