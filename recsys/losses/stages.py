"""The cascade stages a candidate can reach (the values of a row's ``stage`` column).

Defined here, torch-free, so that the losses need nothing from the data package;
``recsys.data.schema`` re-exports :class:`Stage`.
"""

from __future__ import annotations

from enum import IntEnum


class Stage(IntEnum):
    """The deepest cascade stage a candidate reached (what a row's ``stage`` column holds).

    Example:
        >>> Stage.EXPOSED > Stage.PRERANKED, int(Stage.CLICKED)
        (True, 4)
    """

    RETRIEVED = 0  # retrieved, dropped by the pre-ranker
    PRERANKED = 1  # passed the pre-ranker, dropped by the ranker
    RANKED = 2  # in the ranker's top list, not shown
    EXPOSED = 3  # shown, not clicked
    CLICKED = 4
    CONVERTED = 5
