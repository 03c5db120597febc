"""Rewrite the README's results section from benchmark outputs (never typed by hand).

    python tools/update_readme.py [BENCH_DIR]     # default: bench-results

Every ``NAME.json`` / ``NAME.md`` pair that ``recsys bench NAME --out BENCH_DIR`` wrote becomes one
subsection, with the machine and versions it was measured on. The section sits between the
markers below; everything else in the README is left as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
ROOT = Path(__file__).resolve().parents[1]


def results_section(bench_dir: Path) -> str:
    parts = [START, ""]
    for path in sorted(bench_dir.glob("*.json")):
        result = json.loads(path.read_text())
        table = path.with_suffix(".md")
        if not table.is_file():
            raise SystemExit(f"{table}: missing (rerun `recsys bench {path.stem}`)")
        m = result.get("machine", {})
        parts += [f"### `recsys bench {result.get('benchmark', path.stem)}`", "",
                  table.read_text().strip(), "",
                  f"_Measured on {m.get('cores', '?')} cores ({m.get('cpu', '?')}), Python "
                  f"{m.get('python', '?')}, torch {m.get('torch', '?')}, pyarrow "
                  f"{m.get('pyarrow', '?')}._", ""]
    if len(parts) == 2:
        raise SystemExit(f"{bench_dir}: no benchmark results (run `recsys bench ...` first)")
    return "\n".join([*parts, END])


def main(argv: list[str]) -> int:
    bench_dir = Path(argv[0]) if argv else ROOT / "bench-results"
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: the markers {START} and {END} are missing")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + results_section(bench_dir) + tail)
    print(f"rewrote the results section of {readme} from {bench_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
