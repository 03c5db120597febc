"""Progress bars that stay readable in logs as well as in terminals."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar; when stderr is not a terminal (CI, ``make demo | tee``) it redraws every 10 s.

    Example:
        >>> for _ in progress_bar(range(3), desc="work", disable=True):
        ...     pass
    """
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 10.0)
    return tqdm(iterable, **kwargs)
