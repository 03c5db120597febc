"""Plain-text tables for summaries printed at the end of long operations."""

from __future__ import annotations

from collections.abc import Sequence


def fmt(value: object) -> str:
    """Numbers to short readable strings: 1234567 -> '1,234,567', 0.123456 -> '0.1235'."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown-compatible table (numbers right-aligned).

    Example:
        >>> print(format_table(["split", "rows"], [["train", 200000]]))
        | split |    rows |
        |:------|--------:|
        | train | 200,000 |
    """
    bad = [i for i, row in enumerate(rows) if len(row) != len(headers)]
    if bad:
        raise ValueError(f"row {bad[0]} has {len(rows[bad[0]])} cells for {len(headers)} headers")
    cells = [[fmt(v) for v in row] for row in rows]
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                   for r in rows) if rows else False for i in range(len(headers))]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if numeric[i] else v.ljust(w)
                 for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if numeric[i] else (":" + "-" * (w + 1))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(list(headers)), rule, *(line(c) for c in cells)])
