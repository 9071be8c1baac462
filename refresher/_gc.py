"""Python's cyclic garbage collector held back while a refresh allocates its many small objects."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Allocations between young collections (Python's default is 700). A cold production refresh makes millions of
# short-lived objects (60,000 segments, their jobs, tables, manifest rows), freed by reference counting, not by
# the collector; at 700 the collector ran ~1,500 young and 10 full collections over them, each full one walking
# every live object with the GIL held: 1.8 s of the fetching thread's work, 0.2 s at 10,000 with the freeze.
YOUNG_THRESHOLD = 10_000

# One process-wide hold, counted: the collector is the process's, and its holders are threads (refreshes in one
# process, a worker's consumer loops). The first in takes each part, the last out gives it back; the two parts
# are counted apart, since only some holders freeze.
_lock = threading.Lock()
_held = 0  # blocks inside ``fewer_collections``
_frozen = 0  # of them, those that froze
_before: tuple[int, ...] = ()


@contextmanager
def fewer_collections(*, freeze: bool = True) -> Iterator[None]:
    """Collect rarely for the block: young collections wait for ``YOUNG_THRESHOLD`` allocations and, with
    ``freeze``, what exists already (modules, the profile) is out of every collection (``gc.freeze``). Undone by
    the last block out, on every path; cycles made meanwhile are collected later.

    ``freeze=False`` for holders whose blocks overlap without end (a worker's consumer threads, one batch each):
    what is frozen stays uncollected until no freezing block is left, so garbage the process had when the first
    began would wait for a moment when no batch runs, which a busy worker with ``--concurrency`` 2 may not have
    for hours. Without it, garbage waits at most for the next full collection, as in any Python process."""
    global _held, _frozen, _before
    with _lock:
        if _held == 0:
            _before = gc.get_threshold()
            gc.set_threshold(max(_before[0], YOUNG_THRESHOLD), *_before[1:])
        _held += 1
        if freeze:
            if _frozen == 0:
                gc.freeze()
            _frozen += 1
    try:
        yield
    finally:
        with _lock:
            if freeze:
                _frozen -= 1
                if _frozen == 0:
                    gc.unfreeze()
            _held -= 1
            if _held == 0:
                gc.set_threshold(*_before)
