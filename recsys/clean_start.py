"""Child processes that start clean: forked from a fork server, not from the process that asks.

A fork copies only the calling thread, with every lock as it was: one that another thread held
at that moment stays held in the child for good. The processes that train, evaluate and
benchmark have such threads (TensorBoard's writer, gloo's, Arrow's I/O pool, a user's own). A
DataLoader worker forked while another thread held torch's default generator hung in the
``manual_seed`` that every worker starts with (``tests/test_loader_workers.py`` reproduces it).

A fork server is a fresh process, started once per parent (about 2 s with the loader's imports),
that imported ``preload`` once; each child is then forked from it, as fast as a plain fork
(about 45 ms for two DataLoader workers). ``spawn`` where there is no fork server (Windows).
A script that starts such children needs the ``if __name__ == "__main__":`` guard.

Example:
    >>> DataLoader(dataset, num_workers=2, multiprocessing_context=clean_context(["my.module"]))
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from multiprocessing.context import BaseContext


def clean_context(preload: Sequence[str] = ()) -> BaseContext:
    """The multiprocessing context of clean children; ``preload``: modules the fork server
    imports when it starts (read only then: the first caller's list is the one used)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context
