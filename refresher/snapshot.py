"""Pristine copies of a loaded database and a warm pool of clones, for instant resets.

Pure SQL over a ``ServerInfo``, so every engine shares it. For a database ``<db>``:

* ``<db>__pristine`` is a template copy taken after a refresh (``datistemplate``, connections disallowed);
* ``<db>__pool_<n>`` are ready clones of it. A reset renames ``<db>`` to ``<db>__trash_<hex>`` and a clone
  into its place (catalog updates: milliseconds whatever the size); a detached process then drops the trash
  and refills the pool.

Two advisory locks per database, always taken in this order, make this safe for many processes (xdist workers):
``REFILL`` (one refiller at a time; ``save_pristine`` holds it while it rebuilds) and ``TAKE`` (choosing and
renaming a clone). Clones being created are invisible to takers until their CREATE DATABASE commits.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from refresher.engines.base import ServerInfo
from refresher.errors import SnapshotError

MAINTENANCE_DB = "postgres"
TAKE = 1
REFILL = 2
DEFAULT_POOL_SIZE = 2
TRASH_INFIX = "__trash_"
_POOL_COMMENT = re.compile(r"refresher pool_size=(\d+)")


@dataclass(frozen=True)
class SnapshotInfo:
    """What ``save_pristine`` made."""

    database: str
    pristine: str
    pool: tuple[str, ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"database": self.database, "pristine": self.pristine, "pool": list(self.pool),
                "seconds": round(self.seconds, 6)}  # fmt: skip


@dataclass(frozen=True)
class RestoreReport:
    """How a reset went: ``pool`` (renamed a warm clone) or ``template`` (cloned the pristine copy)."""

    seconds: float
    method: Literal["pool", "template"]

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 6), "method": self.method}


@dataclass(frozen=True)
class PoolStatus:
    """The pristine copy and the clones ready right now."""

    pristine: bool
    ready: tuple[str, ...]
    target: int


def pristine_name(db: str) -> str:
    return f"{db}__pristine"


def pool_name(db: str, n: int) -> str:
    return f"{db}__pool_{n}"


def save_pristine(
    server: ServerInfo, *, pool_size: int = DEFAULT_POOL_SIZE, fill_pool: bool = True
) -> SnapshotInfo:
    """Snapshot ``server.dbname`` as its pristine template and fill the clone pool (replacing older ones).

    Other sessions on the database are terminated: a template copy needs it idle. ``fill_pool=False`` only
    records the pool size; the caller then fills it in the background (``spawn_refill``): each clone of a
    1 GB database costs about 2 s that a refresh need not wait for.
    """
    db, started = server.dbname, time.perf_counter()
    with _admin(server.dsn(MAINTENANCE_DB)) as conn, _advisory(conn, db, REFILL), _advisory(conn, db, TAKE):
        _drop_snapshot(conn, db)
        _create_from(conn, db, pristine_name(db), terminate=True)
        ident = sql.Identifier(pristine_name(db))
        conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(ident))
        note = sql.Literal(f"refresher pool_size={pool_size}")
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, note))
        pool = tuple(pool_name(db, n) for n in range(pool_size)) if fill_pool else ()
        for name in pool:
            _create_from(conn, pristine_name(db), name)
    return SnapshotInfo(db, pristine_name(db), pool, time.perf_counter() - started)


def restore_pristine(
    server: ServerInfo, *, refill: bool = True, refill_log: Path | None = None
) -> RestoreReport:
    """Put the pristine copy back as ``server.dbname``; its open connections are terminated.

    Returns as soon as the database is back; the pool is refilled by a detached process (``refill=False`` to
    skip, e.g. when the caller refills itself).
    """
    db, started = server.dbname, time.perf_counter()
    method: Literal["pool", "template"]
    with _admin(server.dsn(MAINTENANCE_DB)) as conn:
        _require_pristine(conn, db)
        with _advisory(conn, db, TAKE):
            ready = _ready_clones(conn, db)
            _move_to_trash(conn, db)
            if ready:
                _rename(conn, ready[0], db)
                method = "pool"
            else:
                _create_from(conn, pristine_name(db), db)
                method = "template"
    seconds = time.perf_counter() - started
    if refill:
        spawn_refill(server, log=refill_log)
    return RestoreReport(seconds, method)


def checkout_clone(
    server: ServerInfo, name: str, *, refill: bool = True, refill_log: Path | None = None
) -> str:
    """A fresh copy of the pristine database under ``name`` (a pool clone when ready); returns its DSN."""
    db = server.dbname
    with _admin(server.dsn(MAINTENANCE_DB)) as conn:
        _require_pristine(conn, db)
        with _advisory(conn, db, TAKE):
            ready = _ready_clones(conn, db)
            if ready:
                _rename(conn, ready[0], name)
        if not ready:  # cloning is slow; other takers need not wait for it
            _create_from(conn, pristine_name(db), name)
    if refill:
        spawn_refill(server, log=refill_log)
    return server.dsn(name)


def drop_clone(server: ServerInfo, name: str) -> None:
    """Drop a database made by ``checkout_clone`` (terminating its sessions); no error if it is gone."""
    if name in (server.dbname, pristine_name(server.dbname), MAINTENANCE_DB):
        raise SnapshotError(f"drop_clone: refusing to drop {name!r}, which is not a clone", name=name)
    with _admin(server.dsn(MAINTENANCE_DB)) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def drop_snapshot(server: ServerInfo) -> None:
    """Remove the pristine copy and the pool of ``server.dbname``."""
    db = server.dbname
    with _admin(server.dsn(MAINTENANCE_DB)) as conn, _advisory(conn, db, REFILL), _advisory(conn, db, TAKE):
        _drop_snapshot(conn, db)


def has_pristine(server: ServerInfo) -> bool:
    """Whether ``save_pristine`` has run for ``server.dbname`` (and its snapshot was not dropped since)."""
    with _admin(server.dsn(MAINTENANCE_DB)) as conn:
        return _has_pristine(conn, server.dbname)


def pool_status(server: ServerInfo) -> PoolStatus:
    with _admin(server.dsn(MAINTENANCE_DB)) as conn:
        return PoolStatus(_has_pristine(conn, server.dbname), tuple(_ready_clones(conn, server.dbname)),
                          _pool_target(conn, server.dbname))  # fmt: skip


def wait_for_pool(server: ServerInfo, *, timeout: float = 60.0) -> PoolStatus:
    """Wait until the pool is full again (after a reset or checkout); raise SnapshotError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        status = pool_status(server)
        if len(status.ready) >= status.target:
            return status
        if time.monotonic() > deadline:
            raise SnapshotError(
                f"{server.dbname}: pool has {len(status.ready)}/{status.target} clones after {timeout:.0f}s"
            )
        time.sleep(0.1)


def refill_pool(server: ServerInfo) -> int:
    """Create the missing pool clones now, in this process; returns how many were made."""
    return _refill(server.dsn(MAINTENANCE_DB), server.dbname)


def spawn_refill(server: ServerInfo, *, log: Path | None = None) -> None:
    """Refill the pool in a detached process, so the caller (the CLI) can exit at once.

    ``sh ... &`` double-forks: the refiller is reparented to init, so no zombie or still-running Popen is left
    with the caller. The password travels in the environment, never on a command line.
    """
    command = [sys.executable, "-m", "refresher.snapshot", "refill"]
    command += ["--dsn", server.dsn(MAINTENANCE_DB, with_password=False), "--database", server.dbname]
    env = {"PGPASSWORD": server.password, "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("ab")) if log is not None else subprocess.DEVNULL
        subprocess.run(
            ["/bin/sh", "-c", '"$@" &', "sh", *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            check=True,
        )


# -- the work, on an autocommit connection to the maintenance database --------------------------------------------
def _refill(admin_dsn: str, db: str) -> int:
    created = 0
    with _admin(admin_dsn) as conn, _advisory(conn, db, REFILL):
        _empty_trash(conn, db)
        # Waiting (not try-lock) for a running refiller: it may have counted before our caller took a clone.
        while _has_pristine(conn, db):
            ready = _ready_clones(conn, db)
            if len(ready) >= _pool_target(conn, db):
                break
            free = next(n for n in range(len(ready) + 1) if pool_name(db, n) not in ready)
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                _create_from(conn, pristine_name(db), pool_name(db, free))
                created += 1
    return created


@contextlib.contextmanager
def _admin(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise SnapshotError(f"cannot reach the server for snapshots: {exc}") from exc
    with conn:
        yield conn


@contextlib.contextmanager
def _advisory(conn: psycopg.Connection[Any], db: str, which: int) -> Iterator[None]:
    conn.execute("SELECT pg_advisory_lock(hashtext(%s), %s)", (db, which))
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s), %s)", (db, which))


def _has_pristine(conn: psycopg.Connection[Any], db: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (pristine_name(db),)).fetchone()
    return row is not None


def _require_pristine(conn: psycopg.Connection[Any], db: str) -> None:
    if not _has_pristine(conn, db):
        raise SnapshotError(
            f"{db}: no pristine snapshot; run `refresher refresh` first",
            database=db,
            missing=pristine_name(db),
        )


def _pool_target(conn: psycopg.Connection[Any], db: str) -> int:
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        (pristine_name(db),),
    ).fetchone()
    match = _POOL_COMMENT.search(row[0] or "") if row else None
    return int(match.group(1)) if match else DEFAULT_POOL_SIZE


def _ready_clones(conn: psycopg.Connection[Any], db: str) -> list[str]:
    prefix = pool_name(db, 0)[:-1]
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE starts_with(datname, %s) AND NOT datistemplate", (prefix,)
    ).fetchall()
    names = [r[0] for r in rows if r[0][len(prefix) :].isdigit()]
    return sorted(names, key=lambda name: int(name[len(prefix) :]))


def _rename(conn: psycopg.Connection[Any], old: str, new: str) -> None:
    try:
        conn.execute(
            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new))
        )
    except psycopg.errors.DuplicateDatabase as exc:
        raise SnapshotError(f"database {new!r} already exists; drop it first", name=new) from exc


def _create_from(
    conn: psycopg.Connection[Any], template: str, target: str, *, terminate: bool = False
) -> None:
    """CREATE DATABASE target TEMPLATE template, by file copy where the server supports it.

    FILE_COPY (PG 15+) measured ~3x faster than the default WAL_LOG here: with fsync off its checkpoint is
    cheap, and on PG 18 with file_copy_method=clone it reflinks on filesystems that can.
    """
    base = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(target), sql.Identifier(template))
    file_copy = base + sql.SQL(" STRATEGY FILE_COPY") if conn.info.server_version >= 150000 else None
    attempts = 20 if terminate else 1
    for attempt in range(attempts):
        if terminate:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (template,),
            )
        try:
            _execute_create(conn, base, file_copy)
            return
        except psycopg.errors.ObjectInUse as exc:  # a session (re)connected to the template: evict it again
            if attempt == attempts - 1:
                raise SnapshotError(f"cannot copy {template}: {exc}", database=template) from exc
            time.sleep(0.05)


def _execute_create(
    conn: psycopg.Connection[Any], base: sql.Composed, file_copy: sql.Composed | None
) -> None:
    if file_copy is not None:
        try:
            conn.execute(file_copy)
            return
        except (psycopg.errors.ObjectInUse, psycopg.errors.DuplicateDatabase, psycopg.errors.QueryCanceled):
            raise
        except psycopg.Error:
            pass  # e.g. file_copy_method=clone on a filesystem that cannot clone: the default strategy works
    conn.execute(base)


def _move_to_trash(conn: psycopg.Connection[Any], db: str) -> None:
    """Rename ``db`` out of the way for the refiller to drop later.

    DROP DATABASE of a 1 M-row database measured ~100 ms (unlinking its files); a rename is a catalog update.
    """
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone() is None:
        return  # an earlier reset was interrupted between the two renames
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (db,),
    )
    # The rename waits (up to 5 s, in the server) for the terminated sessions to exit.
    _rename(conn, db, f"{db}{TRASH_INFIX}{secrets.token_hex(4)}")


def _empty_trash(conn: psycopg.Connection[Any], db: str) -> None:
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (f"{db}{TRASH_INFIX}",)
    ).fetchall()
    for (name,) in rows:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _drop_snapshot(conn: psycopg.Connection[Any], db: str) -> None:
    _empty_trash(conn, db)
    for name in [*_ready_clones(conn, db), pristine_name(db)]:
        ident = sql.Identifier(name)
        if name == pristine_name(db) and _has_pristine(conn, db):
            conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(ident))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def main(argv: list[str] | None = None) -> int:
    """``python -m refresher.snapshot refill --dsn DSN --database DB``: the detached pool refiller."""
    parser = argparse.ArgumentParser(prog="python -m refresher.snapshot")
    sub = parser.add_subparsers(dest="command", required=True)
    refill = sub.add_parser("refill", help="create the missing pool clones of a database")
    refill.add_argument(
        "--dsn", required=True, help="the maintenance database's DSN (password via PGPASSWORD)"
    )
    refill.add_argument("--database", required=True)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    created = _refill(args.dsn, args.database)
    print(f"refill {args.database}: {created} clone(s) in {time.perf_counter() - started:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "PoolStatus",
    "RestoreReport",
    "SnapshotInfo",
    "checkout_clone",
    "drop_clone",
    "drop_snapshot",
    "has_pristine",
    "pool_name",
    "pool_status",
    "pristine_name",
    "refill_pool",
    "restore_pristine",
    "save_pristine",
    "spawn_refill",
    "wait_for_pool",
]
