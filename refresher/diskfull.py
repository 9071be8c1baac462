"""The one-line error when the server's disk fills up under a load or a snapshot copy.

Postgres reports it as SQLSTATE 53100 with a HINT and a CONTEXT (three lines that name neither the directory
nor how much is missing). The transaction has rolled back by then, so nothing is half-written; what the user
needs is where the space ran out and roughly how much more it takes.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from refresher.errors import DiskFull

MB = 2**20


# A database copy also writes WAL and a checkpoint; one WAL segment of slack.
COPY_SLACK = 16 * MB


def require_room(conn: psycopg.Connection[Any], *, needed: int, what: str) -> None:
    """Raise ``DiskFull`` before ``what`` when the server's disk visibly lacks ``needed`` bytes.

    Measured: CREATE DATABASE on a full disk can make the server PANIC (its WAL write fails) rather than
    fail the statement, so a copy is checked first. Only a server whose data directory this host can see
    (the local engine) is checked; others are left to the statement's own error.
    """
    path, free = _free_space(conn)
    if free is not None and free < needed:
        raise _disk_full(path, free, needed, what, sqlstate=None)


def server_disk_full(
    conn: psycopg.Connection[Any], exc: psycopg.errors.DiskFull, *, needed: int, what: str
) -> DiskFull:
    """``DiskFull`` naming the server's data directory, its free space when this host can see it, and
    ``needed`` (an estimate in bytes) for ``what`` ("loading AAPL/1m/2024-01")."""
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
    """The server's data directory when this host can see it (the local engine); None for a container's."""
    path = _data_directory(conn)
    return Path(path) if path is not None and Path(path).is_dir() else None


def has_room(conn: psycopg.Connection[Any], needed: int, *, here: bool) -> bool | None:
    """Whether the server's data disk has ``needed`` bytes free; None when nobody can tell.

    Measured here when ``here`` (the local engine, whose data directory is this host's: a container's path may
    name another directory of this host) and this host sees the data directory. Else the server itself is asked,
    when the role may run programs there (a superuser: the Docker and compose engines'): ``df`` in its data
    directory, answering through its exit status, which writes nothing on the full disk. A container's free space
    is not this host's: a guess from here dropped a database for a copy that then did not fit.
    """
    _, free = _free_space(conn) if here else (None, None)
    if free is not None:
        return free >= needed
    if needed <= 0:
        return True
    kib = -(-needed // 1024)
    command = f"test \"$(df -Pk . | awk 'NR == 2 {{print $4}}')\" -ge {kib}"
    try:
        with conn.transaction():  # a savepoint inside the caller's transaction: its failure ends only this
            # No rows: nothing is written to the program, which may exit before reading (a broken pipe).
            conn.execute(sql.SQL("COPY (SELECT WHERE false) TO PROGRAM {}").format(sql.Literal(command)))
        return True
    except psycopg.errors.ExternalRoutineException as exc:
        return False if (exc.diag.message_detail or "").endswith("exit code 1") else None
    except psycopg.Error:  # not allowed to run programs (42501), no df in the server's image
        return None


def _free_space(conn: psycopg.Connection[Any]) -> tuple[str | None, int | None]:
    path = _data_directory(conn)
    if path is None or not Path(path).is_dir():  # a container's path is not ours to measure
        return path, None
    try:
        return path, shutil.disk_usage(path).free
    except OSError:
        return path, None


def _disk_full(
    path: str | None, free: int | None, needed: int, what: str, *, sqlstate: str | None
) -> DiskFull:
    where = path or "the server's data directory"
    has = f" has {_mb(free)} free," if free is not None else " is full;"
    return DiskFull(
        f"disk full: {where}{has} {what} needs about {_mb(max(needed, MB))}; free some space and run again",
        path=where,
        free=free,
        needed=needed,
        sqlstate=sqlstate,
    )


# Per connection: a load asks before every batch, and the answer never changes while it is open.
_DATA_DIRECTORY: weakref.WeakKeyDictionary[psycopg.Connection[Any], str | None] = weakref.WeakKeyDictionary()


def _data_directory(conn: psycopg.Connection[Any]) -> str | None:
    """Asked once per connection, by the first caller: a load asks inside its own transaction, a snapshot on
    its autocommit connection, so this never opens a transaction of its own on the caller's connection.

    ``pg_settings`` rather than ``current_setting``: for a role that may not read the setting it has no row
    instead of raising, which would abort the caller's transaction.
    """
    if conn not in _DATA_DIRECTORY:
        row = conn.execute("SELECT setting FROM pg_settings WHERE name = 'data_directory'").fetchone()
        _DATA_DIRECTORY[conn] = str(row[0]) if row and row[0] else None
    return _DATA_DIRECTORY[conn]


def _mb(n: int) -> str:
    return f"{n / MB:,.0f} MB"


__all__ = ["data_directory", "require_room", "server_disk_full", "store_disk_full"]
