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

_lock = threading.Lock()
_active = 0  # blocks inside ``fewer_collections`` (refreshes on several threads of one process)
_before: tuple[int, ...] = ()


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Collect rarely for the block: what exists already (modules, the profile) is frozen out of every
    collection (``gc.freeze``), and young collections wait for ``YOUNG_THRESHOLD`` allocations. The first block
    in sets both, the last one out undoes them, on every path; cycles made meanwhile are collected later."""
    global _active, _before
    with _lock:
        if _active == 0:
            _before = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(max(_before[0], YOUNG_THRESHOLD), *_before[1:])
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                gc.set_threshold(*_before)
                gc.unfreeze()
