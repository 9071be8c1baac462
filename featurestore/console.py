"""How the console scripts (``refresher``, ``featurestore``) end their process."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn


def leave(status: int, *, finalize: bool = True) -> NoReturn:
    """End the process with ``status``, skipping the interpreter's teardown of native libraries.

    That teardown can abort a command that has already succeeded: Arrow's and DuckDB's thread pools, destroyed at
    exit while one of their threads is alive, end in ``std::terminate`` ('terminate called without an active
    exception', SIGABRT, exit -6; apache/arrow#34314, seen after ``refresher plan`` printed its plan). With
    ``finalize``, what a normal exit does first is done as it would be: other threads finished (an executor's
    workers included) and the ``atexit`` handlers run. Without it (after an interrupt, already handled), only
    the output is flushed: the rest is what a kill -9 skips, which every step is built to survive.
    """
    if finalize:
        try:
            threading._shutdown()  # type: ignore[attr-defined]  # what interpreter exit runs: joins the threads
            if _exit_handlers_interrupted():
                status = 130
        except KeyboardInterrupt:
            # A Ctrl-C while a thread is waited for: it was a traceback, then the very teardown this skips.
            _say_interrupted()
            status = 130
    os._exit(_flushed(status))


def _exit_handlers_interrupted() -> bool:
    """Run the ``atexit`` handlers with a Ctrl-C held off until they end; whether one came.

    A KeyboardInterrupt raised inside a handler is no exception anyone can catch: the interpreter printed
    'Exception ignored in atexit callback' with its traceback, cut that handler short (a temporary directory's
    removal, weakref.finalize's, half done) and went on to the next, exit status unchanged. The handlers are
    brief cleanups, so the first Ctrl-C is said at once and waited out (status 130); a second one ends the process
    where it is, as a kill does, for a handler that does not end (a native library's teardown waiting on a thread;
    the default action works inside native code, where a Python handler would not run). From a thread other than
    the main one (no signal handler can be set), or with Ctrl-C ignored (started in the background by a shell) or
    handled outside Python, the handlers run as the interpreter runs them."""
    came: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        came.append(signum)
        _say_interrupted()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None) or threading.current_thread() is not threading.main_thread():
        atexit._run_exitfuncs()
        return False
    signal.signal(signal.SIGINT, hold)
    try:
        atexit._run_exitfuncs()
    finally:
        signal.signal(signal.SIGINT, previous)
    return bool(came)


def _say_interrupted() -> None:
    """The one line of a Ctrl-C that ends the process here. Written to the descriptor, not through sys.stderr:
    said from a signal handler, a print could land inside one of a handler's own writes to it (a 'reentrant call'
    RuntimeError, the very traceback this avoids); stderr may also be gone."""
    with contextlib.suppress(OSError):
        os.write(2, f"{_prog()}: interrupted\n".encode(errors="backslashreplace"))


def _flushed(status: int) -> int:
    """Flush stdout and stderr; ``status``, or 2 when what the command printed on stdout could not be written.

    Small output is still in stdout's buffer here (8 KB when not a terminal): on a full disk (``> out.json``) it
    was lost with status 0 and not a word, where the interpreter's own exit says so and fails (120). A reader
    gone (``| head``) has read what it wanted: that is no failure, and a closed stream is nothing to flush. An
    answer lost earlier, as ``say`` printed it, is said here the same way."""
    lost: OSError | None = _LOST[0] if _LOST else None
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (BrokenPipeError, ValueError):
            pass
        except OSError as exc:  # stderr's own failure has no one to tell
            if stream is sys.stdout:
                lost = exc
    if lost is None:
        return status
    with contextlib.suppress(OSError, ValueError, AttributeError):
        print(f"{_prog()}: stdout: {lost.strerror or lost}: the output is lost", file=sys.stderr)
        sys.stderr.flush()
    return status or 2


def _prog() -> str:
    """The console script's name, which begins each line it says about its own end."""
    return Path(sys.argv[0]).name


# What lost the command's answer on its way to stdout while it ran (``say``): said at the process's end.
_LOST: list[OSError] = []


def say(text: str) -> None:
    """Print ``text``, the command's answer or a line of it, on stdout. A reader gone (``| head``) read what it
    wanted (``reader_left``). Any other failure (a full disk, met here when stdout is unbuffered or the answer is
    past its buffer) loses the answer: stdout goes nowhere from then on, and the process's end says so in one
    line, status 2 (``_flushed``), where it was a traceback, status 1, and the interpreter's teardown."""
    try:
        print(text)
    except BrokenPipeError:
        reader_left()
    except OSError as exc:
        _LOST.append(exc)
        reader_left()


def reader_left() -> None:
    """After a BrokenPipeError writing the answer to stdout (``| head``: its reader read what it wanted and left,
    which is not the command's failure): what is still buffered for it goes nowhere, so no later flush fails."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- stdout for the rest of the process


def end(status: int, argv: Sequence[str] | None) -> int:
    """A console script's ``main``'s last step: ``status`` for a caller in-process (``argv`` given), the end of
    the process through ``leave`` for the console script itself (``argv`` None)."""
    if argv is None:
        leave(status)
    return status
