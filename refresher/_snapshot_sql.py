"""The SQL both the snapshot and the pool are made of: names, marks, advisory locks, copies and renames.

Private to ``refresher.snapshot`` and ``refresher.pool`` (see the former for the layout of a database's copies
and the order its locks are taken in). Every statement that changes the catalog goes through ``_execute``, so a
test can kill the process between any two of them.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from refresher._planner_stats import _PENDING_NAME
from refresher.diskfull import server_disk_full
from refresher.engines.base import MAINTENANCE_DB as MAINTENANCE_DB  # the pool and snapshot take it here
from refresher.errors import SnapshotError
from refresher.settings import DEFAULT_POOL_SIZE

_T = TypeVar("_T")

TAKE = 1
REFILL = 2
SWEEP = 3  # dropping trash and half-built copies: one sweeper at a time, the others skip it
STATS = 4  # analyzing the pristine copy (``refresher.pool``): one analyzer at a time, under REFILL shared
COPIER = 100  # COPIER + k, k < the refill concurrency: tokens for copying at once
SLOT = 1000  # SLOT + n: the maker of pool slot n
# Slots a template checkout copies into before renaming its copy: never pool slots, so refillers skip them, but
# named like one so a copy whose maker was killed is recognised (unmarked) and dropped by the next refill.
PRIVATE_SLOTS = range(10_000, 100_000)
TRASH_INFIX = "__trash_"
BUILDING_INFIX = "__building_"


def _newer(known: str) -> str:
    """The words a newer refresher adds to a mark whose own fields are named ``known`` (space-separated), as
    f82876e added ' reflink' after the pool's words, read as absent: an older reader that matched the whole mark
    took the copy for none and rebuilt it from scratch. A word that starts with a known field's name is that field
    garbled (an empty ' pending=', an 'analyzed' out of place), never a newer one, so the mark it is in is still
    no mark: a newer refresher names its fields otherwise."""
    return r"(?: (?!" + "|".join(known.split()) + r")[^ ]+)*"


# The pristine copy's mark's fields, each a word's start (``PoolSizing.text``, ``_Mark.text``).
_NEWER = _newer("pool_size chosen auto reflink noreflink copy_bps ledger stamp generation analyzed pending")
_PRISTINE_MARK = re.compile(
    r"^refresher pool_size=(\d+)(?: (chosen|auto)( reflink| noreflink)?(?: copy_bps=(\d+))?)?"
    + _NEWER
    + r" ledger=([0-9a-f]{64}) stamp=(none|[0-9a-f]{16}) generation=([0-9a-f]{16})"
    r"( analyzed| pending=[a-z0-9_]+(?:,[a-z0-9_]+)*)?" + _NEWER + "$"
)
_CLONE_MARK = re.compile(r"^refresher clone_of=([0-9a-f]{16})" + _newer("clone_of") + "$")

# Tests only: called after every statement sent through ``_execute``, so a test can kill -9 the process between
# any two steps (see tests/refresher/test_snapshot_crash.py). Never set in the product.
_after_statement: Callable[[], None] | None = None


@dataclass(frozen=True)
class PoolSizing:
    """How many warm clones the pool keeps, and why (the pristine copy's mark records it).

    ``chosen``: the user's size ($REFRESHER_POOL_SIZE, ``--pool-size``), which sticks; else the default, decided
    again at each snapshot (``refresher.pool.default_pool_size``) from ``reflink`` (the server's copies are
    reflinks: a clone costs almost no disk) and ``copy_bps`` (bytes per second of the fastest copy of the
    database measured on this server, by its snapshots: what a reset without a warm clone pays; None: none measured).
    ``reflink`` is probed by every snapshot, whoever chose the size, so the pool's readers (``refresher status``,
    each tick of ``wait_for_pool``, each refill) need not probe; None: the mark does not say (an older
    refresher's, which probed only for the default and wrote no answer when it was no).
    A mark written before these were recorded says only the size: the old default (DEFAULT_POOL_SIZE) counts as
    not chosen, any other size as the user's."""

    size: int
    chosen: bool = True
    reflink: bool | None = None
    copy_bps: int | None = None

    def text(self) -> str:
        """How the mark says it (``_PRISTINE_MARK`` reads it back)."""
        return (
            f"pool_size={self.size} {'chosen' if self.chosen else 'auto'}"
            + ({True: " reflink", False: " noreflink", None: ""}[self.reflink])
            + (f" copy_bps={self.copy_bps}" if self.copy_bps is not None else "")
        )


@dataclass(frozen=True)
class _Mark:
    """What a complete pristine copy says about itself (its database comment)."""

    pool: PoolSizing
    ledger: str
    stamp: str
    generation: str
    # Whether its loaded tables' planner statistics are current (``refresher._planner_stats``): a copy made by a
    # refresh is not, until the refill has analyzed it (``refresher.pool``).
    analyzed: bool = False
    # Tables of a copy not analyzed yet whose statistics are out of date though its catalog cannot tell (a change
    # within a small table's last page): what the working database's activity counters said when the copy was
    # taken, or what a replay wrote (``refresher.snapshot``). Born with the copy, in the same COMMENT, so no kill
    # can lose them; cleared only by the analyzed copy that replaces it.
    pending: tuple[str, ...] = ()

    def text(self) -> str:
        """The comment that says it (``_PRISTINE_MARK`` reads it back). Pending names other than the loaded
        tables' lowercase ones are left out (a user's own table is autovacuum's)."""
        pending = sorted({name for name in self.pending if _PENDING_NAME.match(name)})
        return (
            f"refresher {self.pool.text()} ledger={self.ledger} stamp={self.stamp} generation={self.generation}"
            + (" analyzed" if self.analyzed else f" pending={','.join(pending)}" if pending else "")
        )

    @property
    def pool_size(self) -> int:
        return self.pool.size


def pristine_name(db: str) -> str:
    return f"{db}__pristine"


def pool_name(db: str, n: int) -> str:
    return f"{db}__pool_{n}"


def unreachable(exc: psycopg.OperationalError) -> SnapshotError:
    """The error of a server that does not answer: one line (libpq's message runs to three), marked
    ``unreachable`` so that a reset can wait for a server still starting and try again (``commands.reset``)."""
    lines = str(exc).strip().splitlines()
    return SnapshotError(
        f"cannot reach the server for snapshots: {lines[0] if lines else type(exc).__name__}",
        unreachable=True,
    )


@contextlib.contextmanager
def _admin(dsn: str, *, connect_timeout: int = 10) -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout)
    except psycopg.OperationalError as exc:
        raise unreachable(exc) from exc
    with conn:
        yield conn


def _execute(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> psycopg.Cursor[Any]:
    cursor = conn.execute(query, params)
    if _after_statement is not None:
        _after_statement()
    return cursor


def _lock(conn: psycopg.Connection[Any], db: str, which: int, *, shared: bool = False) -> None:
    """Take advisory lock ``which`` of ``db`` (``shared``: in share mode), waiting for it; ``_unlock`` lets it go."""
    mode = "_shared" if shared else ""
    conn.execute(f"SELECT pg_advisory_lock{mode}(hashtext(%s), %s)", (db, which))


def _unlock(conn: psycopg.Connection[Any], db: str, which: int, *, shared: bool = False) -> None:
    mode = "_shared" if shared else ""
    conn.execute(f"SELECT pg_advisory_unlock{mode}(hashtext(%s), %s)", (db, which))


@contextlib.contextmanager
def _advisory(conn: psycopg.Connection[Any], db: str, which: int, *, shared: bool = False) -> Iterator[None]:
    _lock(conn, db, which, shared=shared)
    try:
        yield
    finally:
        if not conn.closed:
            _unlock(conn, db, which, shared=shared)


def _try_lock(conn: psycopg.Connection[Any], db: str, which: int) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s), %s)", (db, which)).fetchone()
    return bool(row and row[0])


# (is a template, comment) of a database, by name.
_COMMENT = (
    "SELECT datistemplate, coalesce(shobj_description(oid, 'pg_database'), '') FROM pg_database"
    " WHERE datname = %s"
)


def _comment(conn: psycopg.Connection[Any], name: str) -> tuple[bool, str] | None:
    """(is a template, comment) of database ``name``, or None when it does not exist."""
    row = conn.execute(_COMMENT, (name,)).fetchone()
    return (bool(row[0]), str(row[1])) if row else None


def _pristine_mark(conn: psycopg.Connection[Any], db: str) -> _Mark | None:
    """The mark of the complete pristine copy; None when there is none (or only a half-made one)."""
    return _mark_of(_comment(conn, pristine_name(db)))


def _mark_of(found: tuple[bool, str] | None) -> _Mark | None:
    """The mark a pristine copy's (is a template, comment) says; None for none or a half-made one."""
    match = _PRISTINE_MARK.match(found[1]) if found and found[0] else None
    if match is None:
        return None
    size, chosen, reflink, bps, ledger, stamp, generation, tail = match.groups("")
    pool = PoolSizing(
        int(size),
        chosen == "chosen" if chosen else int(size) != DEFAULT_POOL_SIZE,
        {" reflink": True, " noreflink": False}.get(reflink),
        int(bps) if bps else None,
    )
    pending = tuple(tail.removeprefix(" pending=").split(",")) if tail.startswith(" pending=") else ()
    return _Mark(pool, ledger, stamp, generation, tail == " analyzed", pending)


def _require_pristine(conn: psycopg.Connection[Any], db: str) -> _Mark:
    mark = _pristine_mark(conn, db)
    if mark is None:
        raise SnapshotError(
            f"{db}: no pristine snapshot; run `refresher refresh` first",
            database=db,
            missing=pristine_name(db),
        )
    return mark


def _pool_databases(conn: psycopg.Connection[Any], db: str) -> list[str]:
    """Every database named like a pool slot of ``db``, marked or not, in slot order."""
    return [name for name, _, _ in _pool_comments(conn, db)]


def _slot_of(db: str, name: str) -> int:
    """The slot number of ``name``, one of ``_pool_databases(conn, db)``."""
    return int(name[len(pool_name(db, 0)) - 1 :])


def _pool_comments(conn: psycopg.Connection[Any], db: str) -> list[tuple[str, bool, str]]:
    """(name, is a template, comment) of every database named like a pool slot of ``db``, in slot order: one
    query, as the refill asks it for every clone it makes."""
    prefix = pool_name(db, 0)[:-1]
    rows = conn.execute(
        "SELECT datname, datistemplate, coalesce(shobj_description(oid, 'pg_database'), '') FROM pg_database"
        " WHERE starts_with(datname, %s)",
        (prefix,),
    ).fetchall()
    slots = [(str(name), bool(template), str(note)) for name, template, note in rows]
    slots = [slot for slot in slots if slot[0][len(prefix) :].isdigit()]
    return sorted(slots, key=lambda slot: int(slot[0][len(prefix) :]))


def _ready_clones(conn: psycopg.Connection[Any], db: str) -> list[str]:
    """The pool clones of the current pristine copy: marked with its generation (so finished, and not stale)."""
    mark = _pristine_mark(conn, db)
    if mark is None:
        return []
    ready = []
    for name, template, note in _pool_comments(conn, db):
        match = _CLONE_MARK.match(note) if not template else None
        if match and match.group(1) == mark.generation:
            ready.append(name)
    return ready


# Tries of a rename or copy whose database a session (re)connected to after its sessions were ended
# (``_evicting``): each waits up to the server's 5 s for the sessions on it to exit, so 25 s at worst.
EVICT_TRIES = 5

# The other sessions on a database (``%s``: its name, or NULL for the session's own) that this role may end, and
# meet the condition put in ``{}`` (``_ending``): their pids.
# A superuser ends them all. Any other role only those of roles whose privileges it has, or of any role but a
# superuser as a member of pg_signal_backend; never a process without a role (an autovacuum worker: a rename or
# copy of the database ends those itself). pg_terminate_backend fails the statement on any other.
_TERMINATE_OTHERS = (
    "SELECT a.pid, pg_terminate_backend(a.pid) FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid "
    "WHERE a.datname = ANY(coalesce(%s::text[], ARRAY[current_database()::text])) AND a.pid <> pg_backend_pid() "
    "AND (current_setting('is_superuser')::bool OR (NOT r.rolsuper "
    "AND (pg_has_role(r.oid, 'USAGE') OR pg_has_role('pg_signal_backend', 'USAGE')))) AND ({})"
)


def _ending(conn: psycopg.Connection[Any], dbs: list[str] | None, where: str = "true") -> list[int]:
    """End the other sessions on databases ``dbs`` (None: ``conn``'s own) that this role may end and that meet
    ``where`` (SQL on ``pg_stat_activity a``); their pids."""
    return [row[0] for row in conn.execute(_TERMINATE_OTHERS.format(where), (dbs,)).fetchall()]


def _terminate_others(conn: psycopg.Connection[Any], db: str | None, *more: str) -> int:
    """End the other sessions on database ``db`` (None: ``conn``'s own) and ``more`` that this role may end; how
    many it ended."""
    return len(_ending(conn, None if db is None else [db, *more]))


def _move_to_trash(conn: psycopg.Connection[Any], db: str, *, taking: str) -> None:
    """Rename ``db`` out of the way for the refiller to drop later, in the caller's transaction, before ``taking``
    is renamed into its place in the same one: a kill or a failure between them leaves ``db`` as it was.

    The sessions on both end first (one query): a session left on a pool clone (a psql, a database browser that
    connects to every database) made the clone's rename wait the server's 5 s and fail, after ``db`` had gone to
    the trash: the reset left no database. DROP DATABASE of a 1 M-row database measured ~100 ms (unlinking its
    files); a rename is a catalog update.
    """
    _terminate_others(conn, db, taking)
    if _comment(conn, db) is None:
        return  # dropped by hand, or an older version's reset was interrupted between the two renames
    _rename(conn, db, f"{db}{TRASH_INFIX}{secrets.token_hex(4)}", ending=(db, taking))


def _rename(conn: psycopg.Connection[Any], old: str, new: str, *, ending: tuple[str, ...] = ()) -> None:
    """Rename database ``old`` to ``new``, each try under a savepoint of the caller's transaction; ``ending``:
    the databases (``old`` among them) whose sessions the caller ended just before, ended again on a retry
    (``_evicting``)."""
    query = sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new))

    def rename() -> None:
        with conn.transaction():
            _execute(conn, query)

    try:
        _evicting(conn, ending, rename)
    except psycopg.errors.DuplicateDatabase as exc:
        raise SnapshotError(f"database {new!r} already exists; drop it first", name=new) from exc
    except psycopg.errors.ObjectInUse as exc:
        raise _in_use(conn, old, exc) from exc
    except psycopg.errors.InsufficientPrivilege as exc:
        raise _not_allowed(conn, f"rename {old}", exc) from exc


def _evicting(
    conn: psycopg.Connection[Any],
    ending: tuple[str, ...],
    run: Callable[[], _T],
    tries: int = EVICT_TRIES,
    *,
    busy: type[psycopg.Error] | tuple[type[psycopg.Error], ...] = psycopg.errors.ObjectInUse,
    where: str = "true",
) -> _T:
    """``run`` a rename or copy of a database, which fails with ``busy`` (ObjectInUse) while another session is
    on it (the server waits up to 5 s for those the caller ended to exit); what it returns. A session that
    connected between the caller's ending of the sessions on ``ending`` and ``run`` (a database browser
    reconnecting, our own analyzer) made a reset fail with "being accessed by other users": such a one is ended
    in turn and ``run`` tried again, until a try finds none this role may end, at most ``tries`` times; then the
    last ``busy`` error is raised. No ``ending``: one try. (``busy``: LockNotAvailable for a read that waits for
    a lock an open transaction on the database holds.) ``where``: which sessions end, as ``_ending``'s."""
    for attempt in range(1, tries + 1):
        try:
            return run()
        except busy:
            if not ending or attempt == tries:
                raise
            # pg_stat_activity is read once per transaction: without this, the retry saw the sessions as they were.
            conn.execute("SELECT pg_stat_clear_snapshot()")
            if not _ending(conn, list(ending), where):
                raise  # what is still on it is no session this role may end
    raise AssertionError("unreachable: the last try returns or raises")


def _not_allowed(conn: psycopg.Connection[Any], doing: str, exc: psycopg.Error) -> SnapshotError:
    """The error for a rename or copy of a database the role may not make (its CREATEDB revoked since the
    refresh that checked it, ``snapshot.require_privileges``; or the database given to another owner)."""
    return SnapshotError(
        f"cannot {doing}: {exc.diag.message_primary or exc}; role {conn.info.user!r} needs CREATEDB, and to own "
        "the database it resets (see docs/engines.md, 'A server someone else runs')",
        role=conn.info.user,
    )


def _in_use(conn: psycopg.Connection[Any], db: str, exc: psycopg.Error) -> SnapshotError:
    """The error for database ``db`` still in use after its sessions were ended: a session this role may not end
    (``_TERMINATE_OTHERS``) is on it, or one (re)connected meanwhile."""
    hint = "close the other sessions on it and run again"
    if conn.info.parameter_status("is_superuser") != "on":
        hint = (
            f"role {conn.info.user!r} may not end another role's session on it (it needs to be a member of "
            "pg_signal_backend, or a superuser); " + hint
        )
    return SnapshotError(
        f"cannot rename or copy {db}: {exc.diag.message_primary or exc}; {hint}", database=db
    )


def _create_from(
    conn: psycopg.Connection[Any], template: str, target: str, *, terminate: bool = False, what: str = ""
) -> None:
    """CREATE DATABASE target TEMPLATE template, by file copy where the server supports it. ``what``: what a
    full disk's error says the copy was for (default: the snapshot).

    ``terminate``: end the other sessions on ``template`` first, and one connecting meanwhile (``_evicting``).

    FILE_COPY (PG 15+) measured ~3x faster than the default WAL_LOG here: with fsync off its checkpoint is
    cheap, and on PG 18 with file_copy_method=clone it reflinks on filesystems that can.
    """
    base = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(target), sql.Identifier(template))
    file_copy = base + sql.SQL(" STRATEGY FILE_COPY") if conn.info.server_version >= 150000 else None
    if terminate:
        _terminate_others(conn, template)
    try:
        _evicting(conn, (template,) if terminate else (), lambda: _execute_create(conn, base, file_copy))
    except psycopg.errors.DiskFull as exc:
        # The server removed the partial copy itself; the previous snapshot is untouched.
        row = conn.execute("SELECT pg_database_size(%s)", (template,)).fetchone()
        raise server_disk_full(
            conn, exc, needed=int(row[0]) if row else 0, what=what or f"copying {template} for the snapshot"
        ) from exc
    except psycopg.errors.ObjectInUse as exc:  # a session this role may not end, or one always reconnecting
        raise _in_use(conn, template, exc) from exc
    except psycopg.errors.InsufficientPrivilege as exc:
        raise _not_allowed(conn, f"copy {template} to {target}", exc) from exc


def _execute_create(
    conn: psycopg.Connection[Any], base: sql.Composed, file_copy: sql.Composed | None
) -> None:
    if file_copy is not None:
        try:
            _execute(conn, file_copy)
            return
        except (
            psycopg.errors.ObjectInUse,
            psycopg.errors.DuplicateDatabase,
            psycopg.errors.QueryCanceled,
            psycopg.errors.DiskFull,
            psycopg.errors.InsufficientPrivilege,
        ):
            raise
        except psycopg.Error as exc:
            if conn.closed:
                raise
            _ = exc  # e.g. file_copy_method=clone on a filesystem that cannot clone: the default strategy works
    _execute(conn, base)


def _drop_database(conn: psycopg.Connection[Any], name: str) -> None:
    """Drop database ``name``, ending its sessions; no error if it is gone. SnapshotError, in one line naming the
    sessions, when one this role may not end is on it (see ``_TERMINATE_OTHERS``)."""
    held = _drop_unless_held(conn, name)
    if held is not None:
        raise held


def _drop_unless_held(conn: psycopg.Connection[Any], name: str) -> SnapshotError | None:
    """``_drop_database``, returning the error instead of raising it: what a sweep of leftovers calls, which leaves
    a held one where it is for a later sweep (another role's session on an old clone must not stop a refill or a
    refresh)."""
    found = _comment(conn, name)
    if found is None:
        return None
    ident = sql.Identifier(name)
    if found[0]:  # a template cannot be dropped
        _execute(conn, sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(ident))
    try:
        _execute(conn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ObjectInUse) as exc:
        if conn.closed:
            raise
        return _held(conn, name, exc)
    return None


def _held(conn: psycopg.Connection[Any], name: str, exc: psycopg.Error) -> SnapshotError:
    """The error for database ``name`` that a DROP ... WITH (FORCE) could not take: who is on it, and what to do."""
    rows = conn.execute(
        "SELECT usename, pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() ORDER BY pid",
        (name,),
    ).fetchall()
    sessions = ", ".join(f"role {user!r} (pid {pid})" for user, pid in rows) or "another session"
    return SnapshotError(
        f"cannot drop {name}: a session of {sessions} is on it, which role {conn.info.user!r} may not end "
        f"({exc.diag.message_primary or exc}); close it, or have a superuser end it "
        "(pg_terminate_backend), and run again",
        database=name,
    )


def _derelicts(conn: psycopg.Connection[Any], db: str) -> list[str]:
    """Trash, half-built copies and a half-made pristine copy of ``db``."""
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE starts_with(datname, %s) OR starts_with(datname, %s)",
        (f"{db}{TRASH_INFIX}", f"{db}{BUILDING_INFIX}"),
    ).fetchall()
    doomed = [r[0] for r in rows]
    if _pristine_mark(conn, db) is None:
        doomed.append(pristine_name(db))
    return doomed


def _publish(conn: psycopg.Connection[Any], db: str, building: str, mark: _Mark) -> None:
    """Make ``building`` the pristine copy: a template, with ``mark`` (what it holds, a new generation)."""
    ident = sql.Identifier(building)
    _execute(conn, sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(ident))
    _execute(conn, sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(mark.text())))
    # A session that connected to the copy while it was made (a database browser lists every database) made its
    # rename wait 5 s and fail the refresh: no session connects to it now, and those on it end.
    _terminate_others(conn, building)
    with _advisory(conn, db, TAKE):
        _swap_in(conn, db, building)


def _swap_in(conn: psycopg.Connection[Any], db: str, building: str) -> None:
    """Replace the pristine copy by ``building`` atomically: both renames commit together or not at all."""
    with conn.transaction():
        if _comment(conn, pristine_name(db)) is not None:
            _rename(conn, pristine_name(db), f"{db}{TRASH_INFIX}{secrets.token_hex(4)}")
        _rename(conn, building, pristine_name(db), ending=(building,))


# The server processes starting a session on the database of oid ``%s`` (another than the asker's): a backend
# holds this lock on its database from before it checks ``datallowconn`` until it shows in pg_stat_activity.
_STARTING = (
    "SELECT pid FROM pg_locks WHERE locktype = 'object' AND database = 0 AND classid = 'pg_database'::regclass "
    "AND objid = %s AND mode = 'RowExclusiveLock' AND granted AND pid <> pg_backend_pid()"
)


def _close_door(conn: psycopg.Connection[Any], db: str, oid: int) -> bool:
    """Make database ``db`` refuse new sessions (ALLOW_CONNECTIONS false, committed at once); the caller holds
    TAKE, taken first. False, nothing changed, when ``db`` is no longer the database of ``oid`` (another reset
    swapped it meanwhile).

    A reset's last read of the ledger calls this before ending the sessions: between that read and its swap no
    session can connect and commit a segment the swap throws away. Under TAKE, as the swap itself: the state a
    kill leaves (a closed ``db``, TAKE free) is what ``_reopen_abandoned`` repairs, and no live reset's door is
    opened by it. The database swapped in is a clone, open; the closed one goes to the trash.
    """
    row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (db,)).fetchone()
    if row is None or row[0] != oid:
        return False
    _execute(conn, sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(db)))
    return True


def _refuses_sessions(conn: psycopg.Connection[Any], db: str) -> bool:
    """Whether database ``db`` exists and refuses new sessions (ALLOW_CONNECTIONS false: ``_close_door``)."""
    row = conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (db,)).fetchone()
    return row is not None and not row[0]


def _open_door(conn: psycopg.Connection[Any], db: str) -> None:
    """Let database ``db`` take sessions again, if it refuses them (a reset that did not swap, or copies first);
    the caller holds TAKE."""
    if _refuses_sessions(conn, db):
        _execute(conn, sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(db)))


def _reopen_abandoned(conn: psycopg.Connection[Any], db: str, *, wait: bool = True) -> bool:
    """Whether database ``db`` refused new sessions: a reset closes it from its last read of the ledger to its
    swap (``_close_door``), under TAKE. Once TAKE is free (the reset swapped, or was killed), one still closed is
    opened. One query when it is open. ``wait`` False: a TAKE held is not waited for (False, the door left to its
    reset): a reset stopped there (Ctrl-Z) holds it for good, and `refresher status` hung on it without a word."""
    if not _refuses_sessions(conn, db):
        return False
    if wait:
        _lock(conn, db, TAKE)
    elif not _try_lock(conn, db, TAKE):
        return False
    try:
        _open_door(conn, db)
    finally:
        if not conn.closed:
            _unlock(conn, db, TAKE)
    return True


def _wait_started(conn: psycopg.Connection[Any], oid: int) -> None:
    """Wait (5 s at most) until no session is starting on the database of ``oid``: once it refuses new ones
    (``_close_door``), one that got past that check before is then in pg_stat_activity, to be ended."""
    deadline = time.monotonic() + 5.0
    while conn.execute(_STARTING, (oid,)).fetchone() is not None and time.monotonic() < deadline:
        time.sleep(0.001)


def _wait_gone(conn: psycopg.Connection[Any], *pids: int | None, timeout: float = 1.0) -> None:
    """Wait (``timeout`` s at most) for the server processes ``pids`` (closed or ended sessions; None: none) to exit.

    A rename of the database waits for every session on it, polling every 100 ms: the ledger check's own
    just-closed session, still exiting, made resets 10 ms -> 55 ms. Polling for it here takes a millisecond.
    """
    waiting = [pid for pid in pids if pid is not None]
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("SELECT pg_stat_clear_snapshot()")  # pg_stat_activity is read once per transaction
        if conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (waiting,)).fetchone() is None:
            return
        time.sleep(0.001)
