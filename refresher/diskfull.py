"""The one-line error when the server's disk fills up under a load or a snapshot copy.

Postgres reports it as SQLSTATE 53100 with a HINT and a CONTEXT (three lines that name neither the directory
nor how much is missing). The transaction has rolled back by then, so nothing is half-written; what the user
needs is where the space ran out and roughly how much more it takes.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
import signal
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from refresher.errors import DiskFull

MB = 2**20


# A database copy also writes WAL and a checkpoint; one WAL segment of slack.
COPY_SLACK = 16 * MB


def require_room(conn: psycopg.Connection[Any], *, needed: int, what: str) -> None:
    """Raise ``DiskFull`` before ``what`` when the server's disk visibly lacks ``needed`` bytes.

    Measured: CREATE DATABASE on a full disk can make the server PANIC (its WAL write fails) rather than
    fail the statement, so a copy is checked first. The disk is measured as ``has_room`` does: from this host
    when it sees the server's own data directory (the local engine), else by the server (a container's);
    when nobody can tell, the statement's own error is left to say it.
    """
    path, free = _free_space(conn)
    room = free >= needed if free is not None else _server_has_room(conn, needed)
    if room is False:
        raise _disk_full(path, free, needed, what, sqlstate=None)


def server_disk_full(
    conn: psycopg.Connection[Any], exc: psycopg.errors.DiskFull, *, needed: int, what: str
) -> DiskFull:
    """``DiskFull`` naming the server's data directory, its free space when this host sees it (the local
    engine's), and ``needed`` (an estimate in bytes) for ``what`` ("loading AAPL/1m/2024-01")."""
    path, free = _free_space(conn)
    return _disk_full(path, free, needed, what, sqlstate=exc.sqlstate)


@contextlib.contextmanager
def store_disk_full(root: Path) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT under the feature store into one ``DiskFull`` line naming ``root`` and its free space.

    The store's writers (Parquet, DuckDB) often raise it without a file name ("disk full writing data").
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            free = 0
        raise DiskFull(
            f"disk full: {root} has {_mb(free)} free, not enough for the segments this refresh stores there; "
            "free some space (or point FEATURE_STORE_PATH elsewhere) and run again",
            path=str(root),
            free=free,
        ) from exc


def data_directory(conn: psycopg.Connection[Any]) -> Path | None:
    """The server's data directory when this host sees it (the local engine); None for a container's, also when
    this host has a directory at that path (a host's own Postgres at the image's path, another disk)."""
    path, own = _data_directory(conn)[:2]
    return Path(path) if path is not None and own else None


def has_room(conn: psycopg.Connection[Any], needed: int) -> bool | None:
    """Whether the server's data disk has ``needed`` bytes free; None when nobody can tell.

    Measured here when this host sees the server's own data directory (``data_directory``: the local engine's).
    Else the server itself is asked, when the role may run programs there (a superuser: the Docker and compose
    engines'): ``df`` in its data directory, answering through its exit status, which writes nothing on the full
    disk. A container's free space is not this host's: a guess from here dropped a database for a copy that then
    did not fit.
    """
    _, free = _free_space(conn)
    return free >= needed if free is not None else _server_has_room(conn, needed)


def _server_has_room(conn: psycopg.Connection[Any], needed: int) -> bool | None:
    """``has_room`` as the server's own ``df`` answers it; None, without asking, when its role may not run
    programs (``_Server.may_run``) or an earlier answer on ``conn`` was neither yes nor no: a load asks before
    every batch, and a refused ``COPY TO PROGRAM`` costs a savepoint and an ERROR in the server's log each time.
    A probe cut short (the session's ``statement_timeout`` over a slow df, which SIGINTs it, or a cancel) is no
    such answer: None this time, and asked again next time (a long-lived connection, a worker's, stopped checking
    for good), unless ``_INTERRUPTED_LIMIT`` probes in a row were cut short (a df always slower than the timeout
    would make every batch wait it out). Any other end (a df killed by another signal) is no answer either."""
    if needed <= 0:
        return True
    server = _data_directory(conn)
    if not server.may_run:
        return None
    kib = -(-needed // 1024)
    command = _DF_PROBE.format(kib=kib)
    try:
        with conn.transaction():  # a savepoint inside the caller's transaction: its failure ends only this
            # No rows: nothing is written to the program, which may exit before reading (a broken pipe).
            conn.execute(sql.SQL("COPY (SELECT WHERE false) TO PROGRAM {}").format(sql.Literal(command)))
    except psycopg.errors.ExternalRoutineException as exc:
        detail = exc.diag.message_detail or ""
        if detail.endswith("exit code 1"):
            _DATA_DIRECTORY[conn] = server._replace(interrupted=0)
            return False
        # A statement_timeout or a cancel SIGINTs the backend's process group, the program with it ("child
        # process was terminated by signal 2: Interrupt"): no answer this time, asked again next time.
        if re.search(rf"\bsignal {int(signal.SIGINT)}\b", detail):
            _interrupted(conn, server)
            return None
    except psycopg.errors.QueryCanceled:
        _interrupted(conn, server)  # the same, caught before the program's end
        return None
    except psycopg.Error:  # not allowed after all (42501), no df in the server's image, a df that crashed
        pass
    else:
        _DATA_DIRECTORY[conn] = server._replace(interrupted=0)
        return True
    _DATA_DIRECTORY[conn] = server._replace(may_run=False)  # it will not answer on this connection
    return None


def _interrupted(conn: psycopg.Connection[Any], server: _Server) -> None:
    """A probe cut short: asked again next time, unless it was the ``_INTERRUPTED_LIMIT``-th in a row."""
    n = server.interrupted + 1
    _DATA_DIRECTORY[conn] = server._replace(interrupted=n, may_run=n < _INTERRUPTED_LIMIT)


def _free_space(conn: psycopg.Connection[Any]) -> tuple[str | None, int | None]:
    """The server's data directory (as the server names it) and its free bytes when this host sees it."""
    path, own = _data_directory(conn)[:2]
    if path is None or not own:  # a container's path is not ours to measure
        return path, None
    try:
        return path, shutil.disk_usage(path).free
    except OSError:
        return path, None


def _disk_full(
    path: str | None, free: int | None, needed: int, what: str, *, sqlstate: str | None
) -> DiskFull:
    where = path or "the server's data directory"
    if free is not None:
        has = f" has {_mb(free)} free,"
    else:  # before the statement, the server's own df said it lacks ``needed``; after, its statement failed
        has = f" has less than {_mb(needed)} free," if sqlstate is None else " is full;"
    return DiskFull(
        f"disk full: {where}{has} {what} needs about {_mb(max(needed, MB))}; free some space and run again",
        path=where,
        free=free,
        needed=needed,
        sqlstate=sqlstate,
    )


class _Server(NamedTuple):
    """What a connection's server lets this host know of its disk."""

    path: str | None  # its data directory, as it names it (None: the role may not read it)
    own: bool  # the directory at ``path`` on this host is the server's own cluster (the local engine's)
    may_run: bool  # the role may run programs on the server (a superuser, pg_execute_server_program): its df
    interrupted: int = 0  # df probes in a row cut short (a statement_timeout, a cancel)


# The server's df, answering through its exit status (1: less than {kib} KiB free).
_DF_PROBE = "test \"$(df -Pk . | awk 'NR == 2 {{print $4}}')\" -ge {kib}"
# df probes in a row cut short after which a connection asks no more: a df always slower than the session's
# statement_timeout would otherwise make every load batch wait the timeout out.
_INTERRUPTED_LIMIT = 3

# Per connection: a load asks before every batch, and the answer never changes while it is open.
_DATA_DIRECTORY: weakref.WeakKeyDictionary[psycopg.Connection[Any], _Server] = weakref.WeakKeyDictionary()


def _data_directory(conn: psycopg.Connection[Any]) -> _Server:
    """The server's data directory, whether it is this host's: the cluster there is the server's own (its
    ``pg_control`` starts with the server's system identifier), and whether its role may run ``df`` there. A
    path alone says nothing: a container's data directory may also name a directory of this host, another
    cluster's or none.

    Asked once per connection, by the first caller: a load asks inside its own transaction, a snapshot on its
    autocommit connection, so this never opens a transaction of its own on the caller's connection.
    ``pg_settings`` rather than ``current_setting``: for a role that may not read the setting it has no row
    instead of raising, which would abort the caller's transaction; likewise ``pg_control_system`` is called
    only when the role may.
    """
    if conn not in _DATA_DIRECTORY:
        row = conn.execute(
            "SELECT (SELECT setting FROM pg_settings WHERE name = 'data_directory'), "
            "has_function_privilege('pg_control_system()', 'EXECUTE'), "
            "pg_has_role('pg_execute_server_program', 'USAGE')"  # true for a superuser too
        ).fetchone()
        assert row is not None
        path = str(row[0]) if row[0] else None
        own = False
        if path is not None and row[1]:
            try:
                with open(Path(path, "global", "pg_control"), "rb") as control:
                    here = int.from_bytes(control.read(8), sys.byteorder, signed=True)
            except OSError:  # none at that path on this host, or not ours to read
                pass
            else:
                ident = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
                own = ident is not None and ident[0] == here
        _DATA_DIRECTORY[conn] = _Server(path, own, bool(row[2]))
    return _DATA_DIRECTORY[conn]


def _mb(n: int) -> str:
    return f"{n / MB:,.0f} MB"


__all__ = ["data_directory", "has_room", "require_room", "server_disk_full", "store_disk_full"]
