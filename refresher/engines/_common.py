"""What every engine shares: the profile-name rule, server tuning, state files, locks and the readiness wait.

Private to ``refresher.engines``: other packages reach these through the engines' public names (``Engine``,
``make_engine``, ``validate_profile``), never by importing this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refresher._lazy import LazyModule
from refresher.errors import EngineStateError, EngineUnavailable, ProfileBusy
from refresher.profile_files import PROFILE_NAME as PROFILE_NAME
from refresher.profile_files import validate_profile as validate_profile

if TYPE_CHECKING:
    import filelock
    import psycopg

    from refresher import login
else:
    # taken around a server's start and stop only: `url` and a stamped no-op refresh take no lock
    filelock = LazyModule("filelock")
    login = LazyModule("refresher.login")  # read by a start's wait only, not by a stamped no-op refresh
    psycopg = LazyModule(
        "psycopg"
    )  # likewise: a stamped no-op asks its server through psql (refresher.stamp)

HOST = "127.0.0.1"
DB_SUPERUSER = "refresher"

# A throwaway dev database whose every row can be rebuilt from the feature store: durability buys nothing here,
# and turning it off roughly doubles COPY throughput. A crash may corrupt the cluster; `refresher down` and
# `refresher refresh` rebuild it. wal_level=minimal also lets COPY into a table created or truncated in the same
# transaction skip WAL entirely. Listening is each engine's business (loopback for local, the container's
# interfaces behind a loopback-only published port for Docker).
TUNING: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "checkpoint_timeout": "1h",
    "max_wal_size": "8GB",
    # After a checkpoint (every CREATE DATABASE ... FILE_COPY of a snapshot takes one), remove the WAL a load
    # wrote instead of keeping it as recycled segments (about as many as the load wrote, up to max_wal_size).
    "wal_recycle": "off",
    "min_wal_size": "32MB",
    "wal_init_zero": "off",  # new segments are sparse: with fsync off, zero-filling them buys nothing
    # Every database copy (snapshot, pool clone, reset without a clone) takes two checkpoints, and each logged two
    # lines (PG 15+): 99% of a server log's lines, about 0.8 KB a copy, forever (the log is never rotated).
    "log_checkpoints": "off",
    "shared_buffers": "256MB",
    "maintenance_work_mem": "256MB",
    "work_mem": "32MB",
    # The server's messages in English whatever locale its image or initdb chose (an image built with LANG=de_DE,
    # as the official image's docs show): a refusal at login reaches the client without its SQLSTATE (psycopg
    # #1188), so its words are all that tell a wrong password or a missing database from a server still starting.
    "lc_messages": "C",
}

# The server's environment (the postmaster's, so every backend's): glibc malloc keeps what a backend freed instead
# of handing it back to the kernel and faulting it in again. A month's primary-key build sorts about 60 MB of
# index tuples; by default glibc returns them at the end of the build (its trim threshold follows the largest
# freed block), so each month's build of a loader's connection faulted its memory in again, page by page: 14,600
# faults, a fifth of the build's CPU. Blocks up to 32 MB come from the heap and up to 128 MB of free heap is kept:
# the second build faults 2 pages. Measured on a month of 780,000 minute bars, 8 pairs alternating between two
# servers: the key build 0.30 -> 0.22 s of backend CPU (lower in 8 of 8), the COPY FREEZE unchanged. A backend's
# memory then stays at its peak, up to 128 MB, until it exits: a loader's connection lives for one refresh, but a
# user's pooled connection or a worker's keeps it too, hence not 256 MB (maintenance_work_mem) as first set.
SERVER_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(128 << 20),
}

# initdb options of every cluster an engine makes (the local engine's initdb, the Docker image's
# POSTGRES_INITDB_ARGS). 1 MB WAL segments instead of 16 MB: after a checkpoint a cluster keeps the WAL from the
# start of the segment its redo point is in, up to a whole segment or two of it (3 to 17 MB measured on a loaded
# ui_testing, 0.05x to 0.25x of its 66 MB database); with 1 MB segments about 1 MB. Each new segment costs
# about 0.5 ms of file creation, nothing next to what writes the WAL: loads write almost none (wal_level=minimal,
# COPY FREEZE), a cold backtesting refresh about 40 MB, a daily one about 10 MB. Fixed at initdb: a cluster made
# before keeps its 16 MB segments and works as before.
INITDB_ARGS: tuple[str, ...] = ("--wal-segsize=1",)
# What the local engine adds where its initdb lists it (PG 18, whose initdb turned page checksums on by
# default): no checksums. With fsync and full_page_writes off a torn page is not detected or repaired anyway,
# and every page written pays the checksum (pg_checksum_page, about 4% of the server's CPU in a month load).
# Not in INITDB_ARGS: the Docker image's PG 15 initdb rejects the flag, and makes no checksums without it. Fixed
# at initdb: a cluster made with checksums keeps them and works as before.
NO_CHECKSUMS = "--no-data-checksums"

# None: refused or reset while the server (or Docker's port proxy) starts; 57P03: "the database system is
# starting up" / "shutting down" between the image's init and the real start.
RETRYABLE_SQLSTATES: frozenset[str | None] = frozenset({None, "57P03"})
# What initdb and a first start need on disk (a PG 15-18 cluster with our settings is about 31 MB, 48 MB with the
# 16 MB WAL segments of clusters made before INITDB_ARGS).
INIT_BYTES_NEEDED = 64 * 1024 * 1024


# A temporary file of ``write_private_json`` untouched this long is a killed writer's (``sweep_private_tmps``).
STALE_TMP_SECONDS = 60.0


def write_private_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically and readable by the owner only (state files hold passwords).

    A crash leaves either the old file or the new one, never half of either, and never a world-readable copy.
    """
    _put_private_json(path, data, os.replace)


def known_fields(cls: type[Any], recorded: Mapping[str, Any], *, path: Path, what: str) -> dict[str, Any]:
    """What of ``recorded`` (the JSON of the state file at ``path``, ``what`` it holds) the dataclass ``cls`` has a
    field for: one a newer refresher added is left out (given to ``cls``, it was a TypeError, 'unreadable' state
    whose advice, `refresher down`, removed the server). AttributeError when ``recorded`` is not a mapping.

    EngineStateError for an unknown key that looks like a field the file lacks (``prot`` with no ``port``): a
    key misspelled by hand. Left out, its field read as its default (a port of 0: a new one at the next start)
    or went missing (the advice then was `refresher down`, which removes the server for a typo). A newer
    refresher writes every field this one knows, so its own additions never meet a missing field; it names
    them unlike the fields it keeps (as the marks' words: docs/engines.md)."""
    fields = dataclasses.fields(cls)
    secret = {each.name for each in fields if not each.repr or "password" in each.name}
    refuse_misspelled(recorded, [each.name for each in fields], path=path, what=what, secret=secret)
    names = {each.name for each in fields}
    return {key: value for key, value in recorded.items() if key in names}


def refuse_misspelled(
    recorded: Mapping[str, Any],
    known: Collection[str],
    *,
    path: Path,
    what: str,
    secret: Collection[str] = (),
) -> None:
    """EngineStateError if a key of ``recorded`` (the state file at ``path``) is none of ``known`` but looks like
    one the file lacks: a key misspelled by hand (``known_fields``). The value of a key meant for one of
    ``secret`` is not shown. AttributeError when ``recorded`` is not a mapping."""
    unknown = [key for key in recorded if key not in known]
    if not unknown:
        return
    import difflib  # only for a file holding a key this refresher does not know

    missing = {name.lower(): name for name in known if name not in recorded}
    for key in unknown:
        close = difflib.get_close_matches(key.lower(), missing, n=1, cutoff=0.6)
        if not close:
            continue
        meant = missing[close[0]]
        shown = "not shown" if meant in secret else repr(recorded[key])  # a password stays out of the line
        raise EngineStateError(
            f"{path}: unreadable {what}: key {key!r} (value {shown}) is not one this refresher knows; did you"
            f" mean {meant!r}? Correct the key in the file",
            path=str(path),
            key=key,
        )


def create_private_json(path: Path, data: Mapping[str, Any]) -> bool:
    """Like ``write_private_json``, but only if ``path`` does not exist yet: whether this call made it.

    Of several processes creating one file at once, exactly one wins and the others keep its content: the file
    is linked into place complete, never replaced.
    """
    created = True

    def link(tmp: Path, target: Path) -> None:
        nonlocal created
        try:
            os.link(tmp, target)
        except FileExistsError:
            created = False
        os.unlink(tmp)

    _put_private_json(path, data, link)
    return created


def _put_private_json(path: Path, data: Mapping[str, Any], put: Callable[[Path, Path], None]) -> None:
    """Write ``data`` to a private temporary file beside ``path``, then ``put`` it in place (which consumes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Per thread, not only per process: two threads writing one file at once must not share a temporary.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        put(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sweep_private_tmps(directory: Path, names: str, *, age: float = STALE_TMP_SECONDS) -> None:
    """Remove what ``write_private_json`` of files named ``names`` (a glob) in ``directory`` left when killed
    between its write and its rename: temporary files not touched for ``age`` seconds. A writer holds its own for
    the milliseconds of one small write, so a live one's is never taken (and one taken from a writer stalled that
    long only makes its rename fail, which it reports as any failed write)."""
    cutoff = time.time() - age
    for tmp in directory.glob(f".{names}.*.tmp"):
        with contextlib.suppress(OSError):  # gone meanwhile: another sweeper, or its writer's rename
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()


def noted_servers(noted: Path) -> list[list[Any]]:
    """The servers ``pool.note_server`` listed at ``noted``: [host, port, cluster] each, and the Docker container
    that ran it when noted (its id, a fourth field); a field a newer refresher may add after these is left out,
    and an entry, or a file, that is not one reads as none (nothing to forget, nothing known)."""
    try:
        servers = json.loads(noted.read_text(encoding="utf-8"))["servers"]
    except (OSError, ValueError, TypeError, KeyError):
        return []
    if not isinstance(servers, list):
        return []
    return [
        entry[:4]
        for entry in servers
        if isinstance(entry, list)
        and len(entry) >= 3
        and isinstance(entry[0], str)
        and isinstance(entry[1], int)
    ]


def noted_cluster(servers: list[list[Any]], host: str, port: int, container: str) -> int | None:
    """The cluster noted (``noted_servers``) for the server at ``host``:``port`` in ``container``; None when none
    is. A container's data volume is fixed when it is made and cannot be removed while the container exists, so
    the container's id names its cluster; the address alone does not (a volume made again keeps the port)."""
    for entry in servers:
        if entry[:2] == [host, port] and entry[3:] == [container] and isinstance(entry[2], int):
            return int(entry[2])
    return None


# How long a lock another command holds is waited for before the wait is told (or a --no-wait beside the start/stop
# lock refuses): past a moment's hold (a start of the running server, a template's copy).
HOLD_GRACE_SECONDS = 1.0


@contextlib.contextmanager
def locked(
    path: Path,
    *,
    timeout: float = -1,
    on_wait: Callable[[], None] | None = None,
    grace: float = HOLD_GRACE_SECONDS,
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed); the kernel drops it if the holder dies. With a
    ``timeout`` (seconds), ``filelock.Timeout`` (an OSError) once it has waited that long. ``on_wait`` is called
    once the lock has been waited for ``grace`` seconds (0: after one try); what it raises ends the wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: the lock belongs to the process, whichever thread releases it.
    lock = filelock.FileLock(path, thread_local=False)
    if on_wait is None or 0 <= timeout <= grace:
        lock.acquire(timeout=timeout)
    else:
        try:
            lock.acquire(timeout=grace)
        except filelock.Timeout:
            on_wait()
            lock.acquire(timeout=timeout - grace if timeout >= 0 else -1)
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def waited_for(
    path: Path,
    busy: Callable[[], Exception],
    waiting: str,
    *,
    grace: float,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the exclusive lock ``path`` (created if needed) for the block. Its holder may keep it for seconds or,
    stopped (Ctrl-Z), for good: a command never waits for it silently. Taken when free within ``grace`` seconds
    (0: tried once); else ``on_wait`` is told ``waiting`` before the wait, or with ``wait`` False ``busy()`` is
    raised. A grace is for a lock held for moments (``server_locked``); one held for a whole command (the
    profile's) has none: ``--no-wait`` beside it answers at once."""

    def told() -> None:
        if not wait:
            raise busy() from None
        if on_wait is not None:
            on_wait(waiting)

    with locked(path, on_wait=told, grace=grace):
        yield


def server_locked(
    path: Path, profile: str, engine: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> contextlib.AbstractContextManager[None]:
    """The lock of ``profile``'s start and stop (``waited_for``): another command's start or stop holds it, which
    a `down`, `url`, `reset` or refresh waited for without a word, and for good, --no-wait too, when that command
    was stopped (Ctrl-Z) on its way (an initdb, a pull, a cluster's removal). Taken when free within
    ``HOLD_GRACE_SECONDS``: a start of the running server holds it for a moment, and a ``--no-wait`` beside one was
    refused, a waiting command's line said a command might be stopped."""
    return waited_for(
        path,
        lambda: ProfileBusy.starting(profile, engine, path),
        f"profile {profile}: another command is starting or stopping its {engine} server (perhaps stopped: Ctrl-Z); "
        "waiting for it",
        grace=HOLD_GRACE_SECONDS,
        wait=wait,
        on_wait=on_wait,
    )


@contextlib.contextmanager
def try_locked(path: Path) -> Iterator[bool]:
    """Like ``locked``, without waiting: yields whether the lock was free, and holds it for the block if it was."""
    lock = filelock.FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def is_disk_full(text: str) -> bool:
    """Whether a program's output (initdb, the server log) says the disk ran out of space."""
    return "No space left on device" in text or "could not extend file" in text


def disk_full(path: Path, needed: int = INIT_BYTES_NEEDED) -> EngineUnavailable:
    """The one-line error for a full disk: which path, how much is free, how much is needed."""
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = 0
    return EngineUnavailable(
        f"disk full: {path} has {_mb(free)} free, the server needs at least {_mb(needed)}; "
        "free some space (or point REFRESHER_STATE_DIR elsewhere) and run the command again",
        path=str(path),
        free=free,
        needed=needed,
    )


def disk_error(path: Path, exc: OSError) -> OSError | EngineUnavailable:
    """ENOSPC/EDQUOT as the one-line disk-full error; any other OSError unchanged."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(path)
    return exc


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


def wait_ready(
    dsn: str,
    *,
    what: str,
    timeout: float,
    alive: Callable[[], bool],
    log_tail: Callable[[], str],
    query: str = "SELECT 1",
    retryable: frozenset[str | None] = RETRYABLE_SQLSTATES,
    interval: float = 0.05,
    listening: Callable[[], bool] | None = None,
) -> None:
    """Poll ``dsn`` with a real query until the server answers (the testcontainers/pytest-postgresql wait).

    Errors whose SQLSTATE is in ``retryable`` are retried until ``timeout``; any other is raised at once with
    its SQLSTATE in ``fields``. ``alive`` false (the process or container exited) stops the wait early. No login
    is tried before ``listening`` says our server holds the port: until then another server may, and would answer.
    On failure the server's log tail goes into the error, since that is where the reason is.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if listening is None or listening():
            try:
                with psycopg.connect(dsn, connect_timeout=3) as conn:
                    conn.execute(query.encode())
                    return
            except psycopg.OperationalError as exc:
                # A refusal at login has no SQLSTATE but its words (a wrong password: not a server still starting).
                state = login.refusal_sqlstate(exc)
                if state not in retryable:
                    raise EngineUnavailable(f"{what} refused us: {exc}", sqlstate=state) from exc
                last = exc
        if not alive():
            break
        time.sleep(interval)
    reason = "it exited" if time.monotonic() < deadline else "it never opened the port"
    tail = log_tail()
    if is_disk_full(tail):
        raise EngineUnavailable(f"{what} ran out of disk space while starting: {_last_line(tail)}")
    raise EngineUnavailable(
        f"{what} is not ready after {timeout:.0f}s ({last or reason}); log tail:\n{tail}",
        sqlstate=getattr(last, "sqlstate", None),
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return next((line for line in reversed(lines) if is_disk_full(line)), lines[-1] if lines else "")
