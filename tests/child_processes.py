"""Ending the child processes a test starts, on every path out of it."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from typing import Any


def reap(*procs: subprocess.Popen[Any] | None) -> None:
    """Kill each of ``procs`` still running, wait for it and close its pipes: what a test's ``finally`` owes a
    child it started, however the test ended.

    Only ``kill`` and ``wait`` left a piped child's pipes open, and a child never waited for was still running
    when its ``Popen`` was collected: either is a ResourceWarning raised at some later test's garbage collection,
    which ``filterwarnings = error`` turns into that innocent test's failure (PytestUnraisableExceptionWarning), a
    second CI failure beside the real one. ``Popen.__exit__`` closes the pipes, then waits."""
    for proc in procs:
        if proc is None:
            continue
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(BrokenPipeError), proc:  # a killed child's stdin: its flush fails, it waits
            pass


def outputs(procs: Sequence[subprocess.Popen[Any]], timeout: float) -> list[tuple[Any, Any]]:
    """Each of ``procs``' (stdout, stderr), each waited for ``timeout`` seconds in turn; all reaped, whatever
    happens (the others still running when one times out, say)."""
    try:
        return [proc.communicate(timeout=timeout) for proc in procs]
    finally:
        reap(*procs)
