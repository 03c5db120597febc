"""Progress bars that stay readable in logs as well as in terminals."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

# every bar made here that may still be open (an error closes them before it prints)
_bars: weakref.WeakSet[tqdm] = weakref.WeakSet()


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar; when stderr is not a terminal (CI, ``make demo | tee``) it redraws every 10 s.

    Example:
        >>> for _ in progress_bar(range(3), desc="work", disable=True):
        ...     pass
    """
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 10.0)
    bar = tqdm(iterable, **kwargs)
    _bars.add(bar)
    return bar


def close_progress_bars() -> None:
    """Close every bar that is still open.

    An error that stops a loop leaves its bar half-drawn, without a newline, until the bar is
    garbage-collected: the error message would be glued to the bar's line, and the bar redrawn
    below it. The command line calls this before it prints an error.
    """
    for bar in list(_bars):
        bar.close()  # (a no-op on a closed bar)
