"""DuckDB, imported with Ctrl-C held back until its extension has initialised.

A KeyboardInterrupt raised inside DuckDB's native module initialisation (it builds Python enums from C++) is a
"Critical nanobind error" and aborts the process (SIGABRT, no cleanup, no one-line message): a Ctrl-C early in
a ``refresher refresh`` landed there. Held back, it is raised right after the import, like any other Ctrl-C.
Everything here imports DuckDB through this module.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """SIGINT recorded instead of raised inside the block, then raised once it ends (main thread only: the only
    one that receives Python's signal handlers; elsewhere, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held and callable(previous):
        previous(signal.SIGINT, None)
    elif held and previous == signal.SIG_DFL:
        raise KeyboardInterrupt


with _interrupts_held():
    import duckdb as duckdb
