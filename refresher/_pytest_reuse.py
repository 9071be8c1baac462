"""Loaded servers kept between pytest runs (``--refresher-reuse``), one per checkout and profile.

A kept server is recorded as ``<state dir>/pytest-reuse/<checkout>-<server key>.json`` (the ``LoadedServer``
plus a fingerprint of what it was loaded from), next to a lock file. Both are scoped by the checkout (pytest's
rootdir) as well as by the state dir, so two checkouts on one machine, even sharing ``$REFRESHER_STATE_DIR``,
never hand each other a server.

A record is trusted only when its server still answers, still has its pristine snapshot, and was loaded from
the same files (the profile's and its universe file's bytes), ``as_of``, engine, refresher version and code (its
source files' sizes and times, as the CLI's refresh stamp checks them; without a fixed ``as_of``, on the same
day and before the next session close of the profile's exchanges): anything else (a killed or rebooted server, an edited profile or universe file) is stopped and rebuilt. The lock is held from
reading the record to writing the new one, so two runs of one checkout never build two servers.

A kept server has no owner process once recorded (``mark_kept``): the sweep of abandoned servers never removes
it; until then its directory names the run building it, so a run killed mid-build leaves nothing for good. A run
without ``--refresher-reuse`` stops the checkout's kept server for its key, as pytest-django's ``--reuse-db``
does without the flag, unless a live run of the checkout uses it (each holds a shared lock on ``.inuse``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg
from filelock import FileLock

from refresher import __version__, snapshot
from refresher._pytest_servers import LoadedServer, mark_kept, stop_server
from refresher.engines import try_locked, write_private_json
from refresher.errors import ProfileError, SnapshotError
from refresher.profile_files import find_profile_file
from refresher.settings import Settings
from refresher.stamp import code_fingerprint, unchanged

REUSE_DIR = "pytest-reuse"


def record_path(settings: Settings, rootdir: Path, key: str) -> Path:
    """Where the kept server of ``key`` for the checkout at ``rootdir`` is recorded."""
    checkout = hashlib.sha256(str(rootdir.resolve()).encode()).hexdigest()[:10]
    return settings.state_dir / REUSE_DIR / f"{checkout}-{key}.json"


def fingerprint(
    profile: str, dirs: Sequence[Path], *, engine: str, as_of: dt.date | None, today: dt.date
) -> str:
    """What a kept server must have been loaded from to be reused: the profile file's bytes and the options."""
    found = _profile_file(profile, dirs)
    content = found.read_bytes() if found is not None else b""
    day = as_of.isoformat() if as_of else f"today={today.isoformat()}"
    digest = hashlib.sha256(content)
    digest.update(f"\0{profile}\0{engine}\0{day}\0{__version__}\0{code_fingerprint()}".encode())
    return digest.hexdigest()


def _profile_file(profile: str, dirs: Sequence[Path]) -> Path | None:
    """The file ``load_profile`` would read; None when there is none (building the server will say so)."""
    try:
        return find_profile_file(profile, dirs)
    except ProfileError:
        return None


class InUse:
    """A run's shared lock on a kept server's ``.inuse`` file, held while the run may use the server: no other run
    stops it meanwhile (``_unused``). The kernel drops it when the process dies."""

    def __init__(self, record: Path) -> None:
        self._fd: int | None = os.open(record.with_suffix(".inuse"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def _unused(record: Path) -> Iterator[bool]:
    """Whether no run holds the kept server of ``record`` in use; if so, none can start to until the block ends."""
    fd = os.open(record.with_suffix(".inuse"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def kept_or_built(
    path: Path,
    settings: Settings,
    mark: str,
    build: Callable[[], LoadedServer],
    build_own: Callable[[], LoadedServer],
) -> tuple[LoadedServer, InUse | None]:
    """The kept server recorded at ``path`` if it is alive and loaded from ``mark``; else ``build()``'s (a
    server built ``kept``), recorded, then marked kept. Either comes with this run's ``InUse`` of it, to close
    when the run ends. An outdated kept server that another live run still uses is left alone: this run then
    gets ``build_own()``'s server, one of its own that it stops (no ``InUse``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock"), thread_local=False):
        kept = _read(path)
        if kept is not None and kept[1] == mark and _current(kept[0]) and _serving(kept[0]):
            return kept[0], InUse(path)
        with _unused(path) as free:
            if not free:
                return build_own(), None
            _stop_recorded(path, settings)
            server = build()
            write_private_json(path, {"fingerprint": mark, "server": json.loads(server.to_json())})
            mark_kept(server)
        return server, InUse(path)


def drop_kept(path: Path, settings: Settings) -> None:
    """Stop the kept server recorded at ``path``, if any and if no live run uses it (a run without
    ``--refresher-reuse``; the next one stops what this one left). One whose lock a run holds, building or checking
    it, is in use too: never waited for, as that run may be stopped there (Ctrl-Z) for good."""
    if not path.exists():
        return
    with try_locked(path.with_suffix(".lock")) as ours, _unused(path) as free:
        if ours and free:
            _stop_recorded(path, settings)


def kept_servers(state_dir: Path) -> list[LoadedServer]:
    """Every kept server recorded under ``state_dir``, of any checkout."""
    found = (_read(path) for path in sorted((state_dir / REUSE_DIR).glob("*.json")))
    return [kept[0] for kept in found if kept is not None]


def stop_all_kept(settings: Settings) -> None:
    """Stop every kept server recorded under the state dir (a benchmark's or a test's clean-up)."""
    for path in sorted((settings.state_dir / REUSE_DIR).glob("*.json")):
        drop_kept(path, settings)


def _stop_recorded(path: Path, settings: Settings) -> None:
    kept = _read(path)
    if kept is not None:
        with contextlib.suppress(Exception):  # already gone (a reboot, a removed state dir): nothing to stop
            stop_server(kept[0], settings)
    path.unlink(missing_ok=True)


def _read(path: Path) -> tuple[LoadedServer, str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LoadedServer.from_json(json.dumps(data["server"])), str(data["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _current(server: LoadedServer) -> bool:
    """Whether every file the profile was read from (its universe file too) still holds the same bytes, and,
    without a fixed as_of, no session close has moved the data's default end since the load."""
    return unchanged(server.inputs, server.valid_until, now())


# How long a kept server is waited for to take a session. A dead one (killed, rebooted, its port closed) refuses at
# once, so only a live server slow to answer waits: 3 s here rejected a healthy kept server on a loaded machine (its
# postmaster slow to fork a backend), which the run then stopped and rebuilt, the user's reuse silently lost. A
# stopped one (SIGSTOP, Ctrl-Z) is given up after this, not waited for for good.
SERVING_TIMEOUT = 30


def _serving(server: LoadedServer) -> bool:
    """Whether the server answers and still has its pristine snapshot (what every clone is made from)."""
    try:
        with psycopg.connect(server.dsn, connect_timeout=SERVING_TIMEOUT, autocommit=True):
            pass
        return snapshot.has_pristine(server.info, connect_timeout=SERVING_TIMEOUT)
    except (psycopg.Error, SnapshotError):
        return False


__all__ = [
    "InUse",
    "drop_kept",
    "fingerprint",
    "kept_or_built",
    "kept_servers",
    "record_path",
    "stop_all_kept",
]
