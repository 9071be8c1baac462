"""Run a function as an unprivileged user, as most users run refresher (tests and CI run as root, which passes
every file mode): a forked child, so no interpreter has to be reachable by that user, drops to ``nobody``."""

from __future__ import annotations

import multiprocessing
import os
import pwd
import traceback
from collections.abc import Callable
from pathlib import Path


def as_nobody(func: Callable[[], str], timeout: float = 300.0) -> str:
    """``func()``'s string, run by ``nobody`` when this process is root (else by this user), or its error's
    type and message; "no answer" when the child died or took longer than ``timeout``. Import what ``func``
    needs first: the interpreter's own files may be closed to ``nobody`` (a pyenv Python under /root)."""
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)

    def child() -> None:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
        try:
            writer.send(func())
        except BaseException as exc:
            writer.send(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    process = context.Process(target=child)
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
    return str(reader.recv()) if reader.poll(1) else "no answer"


def nobody_ids() -> tuple[int, int]:
    """The uid and gid ``as_nobody`` runs with (this process's own when not root)."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    nobody = pwd.getpwnam("nobody")
    return nobody.pw_uid, nobody.pw_gid


def nobody_state(prefix: str) -> tuple[Path, Path]:
    """A new world-traversable temporary directory and its ``state`` directory, owned by ``nobody``."""
    from tests.fixtures_postgres import world_traversable_tmp

    root = world_traversable_tmp(prefix)
    state = root / "state"
    state.mkdir()
    os.chown(state, *nobody_ids())
    return root, state
