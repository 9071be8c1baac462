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


@contextmanager
def interrupts_noted() -> Iterator[None]:
    """Inside the block, a SIGINT runs the handler as before and is also noted; if the block then ends without a
    KeyboardInterrupt (something inside caught it), one is raised (main thread, Python's own handler only: a
    handler of the caller's has run once, as before)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return
    noted: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        noted.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        if noted:
            raise KeyboardInterrupt from exc
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if noted:
        raise KeyboardInterrupt


with _interrupts_held():
    import duckdb as duckdb
