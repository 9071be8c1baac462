"""The DuckDB manifest: one row per stored file, behind a cross-process lock held from attach to detach.

DuckDB lets one process open a database file while it is open for writing (even read-only opens fail then). So
every access is short: take the thread lock and the flock (shared for reads, exclusive for writes), attach the
file, run, commit, detach. Measured on 8 processes x 50 upserts: serialised by flock 7.3 s and no error; retrying
on lock errors instead 21.7 s, 9,340 errors and lost acknowledged upserts. The file is never kept open between
calls. What is kept is an in-memory DuckDB per process (and manifest) to attach it to: starting DuckDB costs
12-20 ms whatever the file (70 ms on a busy machine), an ATTACH and DETACH about 1 ms (a cold refresh of 60,000
segments opened the manifest 60 times).

Hits do not write the manifest directly (a write takes the exclusive lock and checkpoints the file): they append
one line per key to an access journal (O_APPEND, under a shared flock) and the next write transaction folds the
journal into ``last_accessed_ts`` and the hit counters. Reads that show access times or counters (``lookup``,
stats, integrity) fold a pending journal first, so the manifest never shows stale access times to a caller; reads
that only locate files or hashes (``read(fold=False)``: a warm read's pack lookup, a planner's hashes) leave it to
the next write unless it has grown past ``_JOURNAL_FOLD_BYTES``: folding is a write transaction (~50 ms), and a
warm grid search that folded on every read spent 6 s of 17 on it. An append that takes the journal past that size
folds it too (own-file hits never open the manifest). Access tracking never relies on file atimes.

The manifest heals itself: the Parquet files are the truth. Whenever a write finds no manifest (first use, or
deleted) or one DuckDB cannot open (garbage, truncated, a checksum error), it moves the damaged file aside as
``manifest.duckdb.damaged-<time>``, creates a fresh one and fills it from the files' own metadata (the ``restore``
hook), all under the exclusive flock: two processes that find the damage at once heal it once, the second simply
opens the healed file. A read that cannot open the manifest takes the same path. One line goes to the
``featurestore`` logger (stderr when nothing is configured); never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import logging
import os
import stat
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from featurestore._duckdb import duckdb, interrupts_noted
from featurestore._locks import file_lock, raise_not_writable, thread_lock
from featurestore.errors import (
    FeatureStoreError,
    ManifestBusy,
    StoreDiskFull,
    StoreFormatNewer,
    StoreLockTimeout,
    StoreNotWritable,
)
from featurestore.generation import MANIFEST_FILE, move_generation, note_manifest, read_generation

log = logging.getLogger("featurestore")

_LOCK_FILE = "manifest.lock"
_JOURNAL_FILE = "access.journal"
_JOURNAL_LOCK = "access.journal.lock"
# A read(fold=False) still folds a journal this large (~20,000 lines): it never grows without bound between writes.
_JOURNAL_FOLD_BYTES = 1 << 20
# A batch of this many accesses (0.9 MB of journal lines for segment keys) is written to the manifest at once.
_DIRECT_ACCESSES = 10_000
_FOLDING_SUFFIX = ".folding"
# The errors of a stat that Path.exists and Path.is_dir take for no file there.
_NO_FILE = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)
_DAMAGED_SUFFIX = ".damaged-"
# The remedy of a manifest this user may not write: reads go on (read-only), writes cannot.
_READ_ONLY = (
    "reads work, writes need write access to it: ask its owner, or point the store elsewhere (--store, "
    "FEATURE_STORE_PATH, --cache-root)"
)
# A counters row written in the same transaction that fills a new manifest from the files.
_FILLED = "restored_from_files"
# DuckDB's message when another program holds the file: not damage, the file must not be moved aside.
_HELD_ELSEWHERE = "Could not set lock"
# DuckDB's IOException (also raised for damage) for a file in a storage version it cannot read yet.
_NEWER_DUCKDB = "newer version of DuckDB"
_INTERRUPTED = "Query interrupted"  # DuckDB's RuntimeError after it took a SIGINT (see ``_interrupts_kept``)
# DuckDB's words (the C library's) for a write that found the disk or the quota full: not damage either.
_DISK_FULL = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key VARCHAR NOT NULL,
    path VARCHAR NOT NULL,
    symbol VARCHAR,
    start_ts TIMESTAMP,
    end_ts TIMESTAMP,
    rows BIGINT NOT NULL,
    file_size_bytes BIGINT NOT NULL,
    content_hash VARCHAR NOT NULL,
    hash_method VARCHAR NOT NULL,
    created_ts TIMESTAMP NOT NULL,
    last_accessed_ts TIMESTAMP NOT NULL,
    kind VARCHAR NOT NULL,
    hits BIGINT NOT NULL DEFAULT 0,
    meta VARCHAR
);
CREATE TABLE IF NOT EXISTS counters (name VARCHAR NOT NULL, value BIGINT NOT NULL);
ALTER TABLE entries ADD COLUMN IF NOT EXISTS pack_offset BIGINT;
ALTER TABLE entries ADD COLUMN IF NOT EXISTS pack_bytes BIGINT;
"""
# Store format: 1 = one Parquet file per key (no row in ``counters``); 2 = packs beside single files
# (``pack_offset``: the key's first row in the pack named by ``path``; ``pack_bytes``: that pack's size, while
# ``file_size_bytes`` is the key's share of it). A format-1 manifest is migrated by its first write (two
# nullable columns: every old row stays a single file) and format-1 files are read as before.
STORE_FORMAT = 2
_FORMAT = "store_format"
# No PRIMARY KEY: uniqueness of `key` is kept by delete-then-insert under the exclusive lock, which avoids DuckDB's
# over-eager index checks on delete+insert of one key inside a transaction; scans of a manifest are milliseconds.
_ARROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("path", pa.string()),
        ("symbol", pa.string()),
        ("start_ts", pa.timestamp("us")),
        ("end_ts", pa.timestamp("us")),
        ("rows", pa.int64()),
        ("file_size_bytes", pa.int64()),
        ("content_hash", pa.string()),
        ("hash_method", pa.string()),
        ("created_ts", pa.timestamp("us")),
        ("last_accessed_ts", pa.timestamp("us")),
        ("kind", pa.string()),
        ("hits", pa.int64()),
        ("meta", pa.string()),
        ("pack_offset", pa.int64()),
        ("pack_bytes", pa.int64()),
    ]
)
_COLUMNS = tuple(_ARROW_SCHEMA.names)
# The columns of every store format (format 1 lacks the pack columns until its first write adds them).
_REQUIRED = {
    "entries": tuple(name for name in _COLUMNS if not name.startswith("pack_")),
    "counters": ("name", "value"),
}
_TIMES = frozenset(field.name for field in _ARROW_SCHEMA if pa.types.is_timestamp(field.type))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One manifest row: a stored file and what it holds. Times are timezone-aware UTC."""

    key: str
    path: Path
    symbol: str | None
    start_ts: dt.datetime | None
    end_ts: dt.datetime | None
    rows: int
    file_size_bytes: int
    content_hash: str
    hash_method: str
    created_ts: dt.datetime
    last_accessed_ts: dt.datetime
    # Set when the key rides in a pack (``path``): its first row there, and the whole pack's size.
    pack_offset: int | None = None
    pack_bytes: int | None = None


# The columns an Entry holds, each under its field's name (``Manifest.upsert``).
_ENTRY_FIELDS = tuple(field.name for field in dataclasses.fields(Entry))


@dataclasses.dataclass
class Txn:
    """An open write transaction: its connection and what to do once it has committed."""

    con: duckdb.DuckDBPyConnection
    actions: list[Callable[[], object]] = dataclasses.field(default_factory=list)

    def after_commit(self, action: Callable[[], object]) -> None:
        self.actions.append(action)


@dataclasses.dataclass(frozen=True)
class Row:
    """A manifest row as written: an Entry plus the columns only the store needs."""

    entry: Entry
    kind: str
    meta: str | None = None


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ns_to_utc(value: int | None) -> dt.datetime | None:
    """UTC nanoseconds since the epoch as an aware datetime (microsecond precision, as the manifest stores)."""
    if value is None:
        return None
    return dt.datetime.fromtimestamp(value // 1_000_000_000, dt.UTC) + dt.timedelta(
        microseconds=(value % 1_000_000_000) // 1000
    )


def _naive(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else value.astimezone(dt.UTC).replace(tzinfo=None)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else value.replace(tzinfo=dt.UTC)


@contextmanager
def _acquired(lock: threading.RLock, wait: bool, path: Path) -> Iterator[None]:
    """``lock`` held for the block; without ``wait``, StoreLockTimeout at once if another thread holds it."""
    if not lock.acquire(blocking=wait):
        raise StoreLockTimeout(str(path), 0)
    try:
        yield
    finally:
        lock.release()


class Manifest:
    """Short locked transactions over ``<root>/manifest.duckdb``; never holds the file open between calls."""

    def __init__(
        self,
        root: Path,
        *,
        lock_timeout: float | None = 600.0,
        restore: Callable[[Manifest, duckdb.DuckDBPyConnection], int] | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        """``on_wait`` is told, in one line, when a read or write waits for another process's hold of the manifest
        (or of its journal): a gc or a write stopped there (Ctrl-Z) holds it until it goes on, and a command
        waited ``lock_timeout`` without a word."""
        self.root = root
        self._on_wait = on_wait
        self._restore = restore
        self._root_prefix = str(root) + os.sep
        self.path = root / MANIFEST_FILE
        self._lock_path = root / _LOCK_FILE
        self._journal = root / _JOURNAL_FILE
        self._journal_lock = root / _JOURNAL_LOCK
        self._lock_timeout = lock_timeout
        self._thread_lock = thread_lock(self._lock_path)
        # Whether the generation has moved in this exclusive hold (``removing``); None outside one.
        self._moved: bool | None = None

    def _waiting(self, what: str) -> Callable[[], None] | None:
        """What ``file_lock`` calls when ``what`` (the manifest, its journal) is held by another: ``on_wait``."""
        on_wait = self._on_wait
        if on_wait is None:
            return None
        most = "" if self._lock_timeout is None else f", {self._lock_timeout:g} s at most"
        line = (
            f"feature store {self.root}: another process holds its {what} (a write or a gc, perhaps stopped: "
            f"Ctrl-Z); waiting for it{most}"
        )
        return lambda: on_wait(line)

    @property
    def lock_path(self) -> Path:
        """The file every read and write of the manifest locks."""
        return self._lock_path

    # -- transactions -----------------------------------------------------------------------------------------

    @contextmanager
    def write(self, *, wait: bool = True) -> Iterator[Txn]:
        """An exclusive transaction, committed when the block ends cleanly, rolled back otherwise.

        ``txn.after_commit`` actions (file deletions) run after COMMIT but before the locks are released: a row is
        gone before its file, so a crash in between leaves an orphan file, never a row pointing at nothing, and no
        writer can publish the same key between the commit and the unlink. ``wait=False``: StoreLockTimeout at
        once if another thread or process holds the manifest.
        """
        with (
            _interrupts_kept(),
            _acquired(self._thread_lock, wait, self._lock_path),
            self._started(),
            file_lock(
                self._lock_path,
                timeout=self._lock_timeout if wait else 0,
                on_wait=self._waiting("manifest"),
            ),
            self._held(),
            self._open_healed() as con,
        ):
            con.execute("BEGIN TRANSACTION")
            txn = Txn(con)
            try:
                folded = self._fold_journal(con)
                yield txn
                con.execute("COMMIT")
            except BaseException as exc:
                # None may be left to roll back: a Ctrl-C during COMMIT ends it ("Query interrupted"), and an
                # error here would be raised over the one that matters.
                with contextlib.suppress(duckdb.TransactionException):
                    con.execute("ROLLBACK")
                if isinstance(exc, duckdb.Error):
                    self._raise_if_disk_full(exc)
                raise
            for path in folded:
                path.unlink(missing_ok=True)
            for action in txn.actions:
                action()

    @contextmanager
    def read(self, *, fold: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """A consistent read; other readers may run at the same time, writers wait.

        ``fold=False`` for a read that needs no access time nor counter: a pending journal is left for the next
        write (unless past ``_JOURNAL_FOLD_BYTES``), so the read opens the manifest read-only. So does every read
        of a manifest this user may not write (``_unwritable``): its access times stay as they are.
        """
        pending = self._journal_pending(0 if fold else _JOURNAL_FOLD_BYTES)
        if self.path.exists() and (not pending or self._unwritable() is not None):
            with (
                _interrupts_kept(),
                self._thread_lock,
                self._started(),
                file_lock(
                    self._lock_path,
                    shared=True,
                    timeout=self._lock_timeout,
                    on_wait=self._waiting("manifest"),
                ),
            ):
                con = self._open(read_only=True)
                if not isinstance(con, duckdb.Error):
                    try:
                        if self._filled(con) and self._format(con) == STORE_FORMAT:
                            yield con
                            return
                    finally:
                        self._detach(con)
        # A journal to fold, no manifest, one that would not open or was never filled: the write path heals
        # (or, for a manifest this user may not write, says so).
        with self.write() as txn:
            yield txn.con

    def refuse_newer(self) -> None:
        """StoreFormatNewer if a newer featurestore (or DuckDB) wrote the manifest, before anything is written:
        called when a store is opened, as a read of a key with a file of its own never opens the manifest. Once
        per version of the file in a process; a damaged or missing one is left to the first write."""
        identity = _identity(self.path)
        if identity is None or _NOT_NEWER.get(self.path) == identity:
            return
        try:
            lock = file_lock(self._lock_path, shared=True, timeout=0)
            with _interrupts_kept(), self._thread_lock, self._started(), lock:
                con = self._open(read_only=True)
                if isinstance(con, duckdb.Error):
                    return
                try:
                    found = self._format(con)
                finally:
                    self._detach(con)
        except StoreLockTimeout:
            # Held by a writer (or a process stopped while writing): opening a store never waits on it; the
            # manifest's first read or write checks the format under its own lock (`_open_healed`).
            return
        if found > STORE_FORMAT:
            raise StoreFormatNewer.store_format(str(self.path), found, STORE_FORMAT)
        _NOT_NEWER[self.path] = identity

    def _open(self, *, read_only: bool) -> duckdb.DuckDBPyConnection | duckdb.Error:
        """A connection whose tables answer (created when writing), or the error that shows the file damaged.

        The connection is this process's in-memory DuckDB with the file attached and in use; ``_detach`` closes
        the file again. The caller holds the thread lock, which also keeps the connection to one thread at a time.
        """
        con = self._host()
        try:
            con.execute(f"ATTACH {_literal(str(self.path))} AS {_ALIAS}{' (READ_ONLY)' if read_only else ''}")
            con.execute(f"USE {_ALIAS}")
        except duckdb.Error as exc:
            self._detach(con)
            _raise_if_interrupt(exc)
            self._raise_if_disk_full(exc)
            if _HELD_ELSEWHERE in str(exc):
                raise ManifestBusy(str(self.path), _first_line(exc)) from None
            if _NEWER_DUCKDB in str(
                exc
            ):  # not damage: set aside and rebuilt, the newer DuckDB's file is lost
                raise StoreFormatNewer(
                    str(self.path),
                    f"{_first_line(exc)} ({_NEWER_DUCKDB}, this is {duckdb.__version__})",
                    "duckdb",
                ) from None
            return exc
        try:
            if not read_only:
                con.execute(_SCHEMA)
            if _identity(self.path) != _SOUND.get(self.path):
                # count(*) is answered from metadata; only reading every column finds a cut or damaged block.
                # That costs ~2 ms per 5,000 rows, so it runs once per version of the file, not per access.
                con.execute("SELECT bit_xor(hash(COLUMNS(*))) FROM entries").fetchall()
                con.execute("SELECT bit_xor(hash(COLUMNS(*))) FROM counters").fetchall()
                foreign = self._foreign(con)
                if foreign is not None:
                    self._detach(con)
                    return foreign
                _SOUND[self.path] = _identity(self.path)
        except duckdb.Error as exc:
            self._detach(con)
            _raise_if_interrupt(exc)
            self._raise_if_disk_full(exc)
            return exc
        return con

    def _foreign(self, con: duckdb.DuckDBPyConnection) -> duckdb.Error | None:
        """The error that shows the file is no manifest of this store's layout (tables without the columns every
        format has: another program's DuckDB file), or with a column this code cannot fill (NOT NULL without a
        default: another tool's variant of the layout), None if it is one. Such a file opened whole, and every
        query (without the columns) or every put (with the extra one: a ConstraintException traceback) then
        failed, so nothing healed it. A newer featurestore's manifest is StoreFormatNewer here, as when its
        columns are all ours: never set aside as damage."""
        found = con.execute(
            "SELECT table_name, column_name, is_nullable OR column_default IS NOT NULL FROM duckdb_columns()"
            " WHERE database_name = ?",
            [_ALIAS],
        ).fetchall()
        named = {(table, column) for table, column, _ in found}
        lacking = sorted(
            f"{table}.{column}"
            for table, columns in _REQUIRED.items()
            for column in columns
            if (table, column) not in named
        )
        ours = {"entries": _COLUMNS, "counters": _REQUIRED["counters"]}
        unfillable = sorted(
            f"{table}.{column}"
            for table, column, fillable in found
            if table in ours and column not in ours[table] and not fillable
        )
        if not lacking and not unfillable:
            return None
        with contextlib.suppress(duckdb.Error):
            if (newer := self._format(con)) > STORE_FORMAT:
                self._detach(con)
                raise StoreFormatNewer.store_format(str(self.path), newer, STORE_FORMAT)
        if lacking:
            more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
            return duckdb.CatalogException(f"not a manifest: no column {', '.join(lacking[:3])}{more}")
        more = f" and {len(unfillable) - 3} more" if len(unfillable) > 3 else ""
        return duckdb.CatalogException(
            f"not this featurestore's layout: column {', '.join(unfillable[:3])}{more} is NOT NULL without a default"
        )

    def _raise_if_disk_full(self, exc: duckdb.Error) -> None:
        """StoreDiskFull if DuckDB could not write for lack of space: one line, and never taken for damage (a
        manifest set aside and rebuilt loses every access time and counter)."""
        if any(words in str(exc) for words in _DISK_FULL):
            raise StoreDiskFull.at(str(self.root), _first_line(exc)) from None

    @contextmanager
    def _started(self) -> Iterator[None]:
        """This process's DuckDB started before the file lock is taken (under the thread lock): the first start
        takes a third of a second, more on a busy machine, which every writer of the store waited out when it
        ran under the lock, and forever when the process was stopped there (a worker frozen at its first read
        stalled every other worker's batch)."""
        self._host()
        yield

    def _host(self) -> duckdb.DuckDBPyConnection:
        """This process's in-memory DuckDB for this manifest, started on first use.

        By process id: a forked child starts its own rather than use a copy of its parent's.
        """
        key = (os.getpid(), self.path)
        host = _HOSTS.get(key)
        if host is None:
            host = _HOSTS[key] = duckdb.connect(":memory:", config={"threads": 1})
        return host

    def _detach(self, con: duckdb.DuckDBPyConnection) -> None:
        """Close the file (with a checkpoint, as closing a connection to it did); nothing if it is not attached.

        If that fails (a checkpoint on a full disk, say), the whole in-memory DuckDB is closed, which closes the
        file too: it must never stay open, and locked against every other process, for the rest of this one's
        life. What was committed is in DuckDB's WAL either way, replayed by the next attach.
        """
        try:
            # A transaction left open (a failed restore, a caller's) would hold the file past its DETACH; none is,
            # usually, and ROLLBACK then says so.
            with contextlib.suppress(duckdb.TransactionException):
                con.execute("ROLLBACK")
            con.execute("USE memory")
            con.execute(f"DETACH DATABASE IF EXISTS {_ALIAS}")
        except duckdb.Error:
            _HOSTS.pop((os.getpid(), self.path), None)
            con.close()

    @contextmanager
    def _held(self) -> Iterator[None]:
        """The exclusive hold of ``write``, for ``removing``: the generation has not moved in it yet."""
        self._moved = False
        try:
            yield
        finally:
            self._moved = None

    @contextmanager
    def _open_healed(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open for writing (exclusive lock held): a damaged file is set aside; a new one is filled from files."""
        refused = self._unwritable()
        if refused is not None:
            raise refused
        # Asked before the file is opened (which may write it): as the last writer of this code left it?
        unknown = read_generation(self.root) is None
        opened = self._open(read_only=False)
        if isinstance(opened, duckdb.Error):
            damage = opened
            self.removing()  # its rows are about to be restored from the files: some may be gone
            aside = self._set_aside()
            opened = self._open(read_only=False)
            if isinstance(opened, duckdb.Error):  # a fresh file that will not open: the disk is at fault
                raise FeatureStoreError(
                    f"manifest={str(self.path)!r}: cannot create a fresh manifest ({_first_line(opened)})",
                    path=str(self.path),
                )
            log.warning(
                "featurestore: manifest %s unreadable (%s); moved to %s and rebuilt from the data files",
                self.path,
                _first_line(damage),
                aside.name,
            )
        con = opened
        try:
            if unknown:
                # A new store, one from before generations, or one another program wrote since this code last
                # did (featurestore from before ``note_manifest``: it may have removed keys without a move).
                self.removing()
            found = self._format(con)
            if found > STORE_FORMAT:  # before anything is written: its layout is not this code's to change
                raise StoreFormatNewer.store_format(str(self.path), found, STORE_FORMAT)
            if found != STORE_FORMAT:  # _open has added the columns; say so once
                con.execute("DELETE FROM counters WHERE name = ?", [_FORMAT])
                con.execute("INSERT INTO counters VALUES (?, ?)", [_FORMAT, STORE_FORMAT])
            # "New" is a marker row, not a check for the file: a process killed between creating the file and
            # filling it leaves a file without the marker, which the next writer fills again.
            if not self._filled(con):
                con.execute("BEGIN TRANSACTION")
                if self._restore is not None:
                    self._restore(self, con)
                self._mark_filled(con)
                con.execute("COMMIT")
            yield con
        finally:
            self._detach(con)
            _SOUND[self.path] = _identity(self.path)  # what this writer leaves behind is sound
            note_manifest(self.root)

    def _unwritable(self) -> StoreNotWritable | None:
        """Why this user cannot write the manifest (the file or the store's directory, where DuckDB writes its
        WAL: 0444, a teammate's shared store, a read-only mount), or None. DuckDB's error for it ("Permission
        denied") looked like damage: the file was set aside and rebuilt, every access time lost, with a line
        calling it unreadable; a directory it could not write ended in a traceback. Asked before each write."""
        # Asked, not opened: closing a descriptor of the file drops every POSIX lock this process holds on it,
        # DuckDB's own among them (another thread's connection), which let another process open it to write.
        if self.path.exists() and not os.access(self.path, os.W_OK, effective_ids=True):
            read_only = os.statvfs(self.path).f_flag & os.ST_RDONLY
            reason = os.strerror(errno.EROFS if read_only else errno.EACCES)
            return StoreNotWritable(str(self.path), reason, _READ_ONLY, what="manifest")
        if not os.access(self.root, os.W_OK | os.X_OK, effective_ids=True):
            read_only = os.statvfs(self.root).f_flag & os.ST_RDONLY
            reason = os.strerror(errno.EROFS if read_only else errno.EACCES)
            return StoreNotWritable(str(self.root), reason, _READ_ONLY, what="store directory")
        return None

    @staticmethod
    def _filled(con: duckdb.DuckDBPyConnection) -> bool:
        return bool(con.execute("SELECT count(*) FROM counters WHERE name = ?", [_FILLED]).fetchall()[0][0])

    @staticmethod
    def _format(con: duckdb.DuckDBPyConnection) -> int:
        """The manifest's store format: 1 for a manifest from before packs, which has no row for it."""
        row = con.execute("SELECT max(value) FROM counters WHERE name = ?", [_FORMAT]).fetchall()
        return int(row[0][0]) if row and row[0][0] is not None else 1

    @staticmethod
    def _mark_filled(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("INSERT INTO counters VALUES (?, 1)", [_FILLED])

    def _set_aside(self) -> Path:
        stamp = utc_now().strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(self.path.name + _DAMAGED_SUFFIX + stamp)
        wal = self.path.with_name(self.path.name + ".wal")
        if self.path.exists():
            os.replace(self.path, aside)
        if wal.exists():
            os.replace(wal, aside.with_name(aside.name + ".wal"))
        return aside

    def checkpoint(self) -> None:
        """Compact the file (DuckDB's VACUUM reclaims nothing; CHECKPOINT rewrites and frees blocks)."""
        with (
            _interrupts_kept(),
            self._thread_lock,
            file_lock(self._lock_path, timeout=self._lock_timeout, on_wait=self._waiting("manifest")),
        ):
            con = self._host()
            try:
                con.execute(f"ATTACH {_literal(str(self.path))} AS {_ALIAS}")
                con.execute(f"FORCE CHECKPOINT {_ALIAS}")
            finally:
                self._detach(con)
                note_manifest(self.root)

    # -- access journal ---------------------------------------------------------------------------------------

    def record_access(self, keys: Sequence[str], *, misses: int = 0) -> None:
        """Append hits (one line per key) and misses to the journal; folded by the next write transaction.

        A batch of ``_DIRECT_ACCESSES`` or more (a planner's one request for 60,000 segments) is written to the
        manifest at once instead, when that needs no wait: its lines would bring the journal to its fold limit,
        to be read back and folded by this same call (60,000 segment keys: 5 MB of lines written, split and
        parsed again: about 0.15 s of a production no-op refresh).
        """
        now = int(utc_now().timestamp() * 1_000_000)
        if len(keys) + misses >= _DIRECT_ACCESSES and self._recorded_now(keys, misses, now):
            return
        lines = [f"H\t{key}\t{now}\n" for key in keys] + [f"M\t-\t{now}\n"] * misses
        if not lines:
            return
        payload = "".join(lines).encode()
        size = 0
        with file_lock(
            self._journal_lock, shared=True, timeout=self._lock_timeout, on_wait=self._waiting("journal")
        ):
            try:
                fd = os.open(self._journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, payload)
                    size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
            except OSError as exc:
                # A full disk must not fail the read that was served (it did, ENOSPC): these accesses go
                # unrecorded, so their keys may expire a little sooner. A line cut short is never folded.
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise_not_writable(self._journal, exc)
                    raise
        if size > _JOURNAL_FOLD_BYTES and self._journal_pending(_JOURNAL_FOLD_BYTES):
            # Reads of keys with files of their own never open the manifest, so nothing folded their lines: a
            # read-only workload grew the journal without bound. Past the limit, the reader folds it (a write
            # transaction per ~13,000 accesses); a manifest it cannot write now leaves that to the next one, and
            # one a gc or a put holds is not waited for: the read was served (it waited up to lock_timeout, then
            # raised StoreLockTimeout from a get that had its table).
            with (
                contextlib.suppress(ManifestBusy, StoreDiskFull, StoreLockTimeout, StoreNotWritable),
                self.write(wait=False),
            ):
                pass

    def _journal_pending(self, beyond: int = 0) -> bool:
        """Whether the journal holds more than ``beyond`` bytes (or a dead folder's files wait to be folded)."""
        try:
            return self._journal.stat().st_size > beyond
        except FileNotFoundError:
            return any(self.root.glob(_JOURNAL_FILE + ".*" + _FOLDING_SUFFIX))

    def _fold_journal(self, con: duckdb.DuckDBPyConnection) -> list[Path]:
        # Appenders hold the journal lock shared, so renaming under it exclusively never cuts a line in two;
        # files left by a folder that died before committing are folded again (access times are idempotent).
        with file_lock(self._journal_lock, timeout=self._lock_timeout, on_wait=self._waiting("journal")):
            try:
                journal: os.stat_result | None = self._journal.stat()
            except OSError as exc:
                if exc.errno not in _NO_FILE:
                    raise
                journal = None
            if journal is not None and stat.S_ISDIR(journal.st_mode):
                # Made by hand: renamed to .folding, it would fail every write to come.
                raise_not_writable(self._journal, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
            if journal is not None and journal.st_size > 0:
                self._journal.rename(self.root / f"{_JOURNAL_FILE}.{uuid.uuid4().hex}{_FOLDING_SUFFIX}")
        pending = sorted(self.root.glob(_JOURNAL_FILE + ".*" + _FOLDING_SUFFIX))
        keys: list[str] = []
        micros: list[int] = []
        misses = 0
        for path in pending:
            # Only newline-terminated lines count: the last one may be cut short by a killed writer.
            for line in path.read_text(errors="replace").split("\n")[:-1]:
                parts = line.split("\t")
                if len(parts) != 3 or not parts[2].isdigit():
                    continue
                if parts[0] == "H":
                    keys.append(parts[1])
                    micros.append(int(parts[2]))
                elif parts[0] == "M":
                    misses += 1
        self._touch(con, keys, micros, misses=misses)
        return pending

    def _recorded_now(self, keys: Sequence[str], misses: int, now: int) -> bool:
        """``record_access`` in a write transaction of its own, if one can be had at once (else False: nothing
        was recorded, and the caller journals as usual)."""
        try:
            with self.write(wait=False) as txn:
                self._touch(txn.con, keys, [now] * len(keys), misses=misses)
        except (ManifestBusy, StoreDiskFull, StoreLockTimeout, StoreNotWritable):
            return False
        return True

    def _touch(
        self, con: duckdb.DuckDBPyConnection, keys: Sequence[str], micros: Sequence[int], *, misses: int
    ) -> None:
        """One hit of ``keys[i]`` at ``micros[i]`` (UTC microseconds) each, and ``misses``: each key's access time
        moves to its latest, its hits and the counters grow by as many."""
        if keys:
            touched = {"key": keys, "ts": np.array(micros, dtype=np.int64)}
            with _registered(con, "touched", touched):
                con.execute(
                    "UPDATE entries SET last_accessed_ts = greatest(entries.last_accessed_ts, latest.ts),"
                    " hits = entries.hits + latest.n"
                    " FROM (SELECT key, make_timestamp(max(ts)) AS ts, count(*) AS n FROM touched GROUP BY key)"
                    " latest WHERE entries.key = latest.key"
                )
        self.add_counters(con, hits=len(keys), misses=misses)

    # -- queries (each takes the connection of an open transaction) -------------------------------------------

    @staticmethod
    def add_counters(con: duckdb.DuckDBPyConnection, *, hits: int = 0, misses: int = 0) -> None:
        for name, value in (("hits", hits), ("misses", misses)):
            if value:
                updated = con.execute(
                    "UPDATE counters SET value = value + ? WHERE name = ? RETURNING value", [value, name]
                ).fetchall()
                if not updated:
                    con.execute("INSERT INTO counters VALUES (?, ?)", [name, value])

    @staticmethod
    def counters(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
        return {
            str(name): int(value)
            for name, value in con.execute("SELECT name, value FROM counters").fetchall()
        }

    def upsert(self, con: duckdb.DuckDBPyConnection, rows: Sequence[Row]) -> None:
        """Record ``rows``, each replacing its key's row (``insert``): an Entry's fields are columns of their
        names, its times converted to naive UTC."""
        if not rows:
            return
        seen: dict[dt.datetime | None, dt.datetime | None] = {}

        def naive(value: dt.datetime | None) -> dt.datetime | None:
            # A batch shares its times (one ``now``; months across symbols): each converted once.
            if value not in seen:
                seen[value] = _naive(value)
            return seen[value]

        columns: dict[str, list[Any]] = {
            "kind": [row.kind for row in rows],
            "meta": [row.meta for row in rows],
        }
        for name in _ENTRY_FIELDS:
            values = [getattr(row.entry, name) for row in rows]
            columns[name] = [naive(value) for value in values] if name in _TIMES else values
        self.insert(con, columns)

    def insert(
        self,
        con: duckdb.DuckDBPyConnection,
        columns: Mapping[str, Sequence[Any]],
        *,
        present: Collection[str] | None = None,
    ) -> None:
        """Record rows given column by column (each of ``_COLUMNS`` but ``hits``, which starts at 0; one value per
        row; times as naive UTC datetimes or microseconds since the epoch, paths as ``Path``s in the store), each
        replacing its key's row.

        One INSERT of one Arrow table, inside the caller's transaction: a kill anywhere before COMMIT leaves
        none of them. ``present``: which of these keys the manifest holds (asked in this same exclusive
        transaction); only their rows are deleted first, and none when it is empty (a cold batch, which no
        other writer can change meanwhile: a scan of the manifest and a join saved). None: the rows of every
        key are deleted first."""
        paths: dict[Path, str] = {}  # a pack's keys share its path: one relative form per file
        skip = len(self._root_prefix)
        relative = [paths.get(p) or paths.setdefault(p, self._relative(p, skip)) for p in columns["path"]]
        hits = [0] * len(relative)
        table = pa.table({**columns, "path": relative, "hits": hits}, schema=_ARROW_SCHEMA)
        con.register("incoming", table)
        try:
            if present is None:
                self.removing()
                con.execute("DELETE FROM entries WHERE key IN (SELECT key FROM incoming)")
            else:
                self.delete(con, present)
            con.execute(f"INSERT INTO entries ({', '.join(_COLUMNS)}) SELECT * FROM incoming")
        finally:
            con.unregister("incoming")

    def _relative(self, path: Path, skip: int) -> str:
        """``path`` relative to the root, as the manifest records it (POSIX separators)."""
        text = str(path)
        if text.startswith(self._root_prefix):
            return text[skip:].replace(os.sep, "/")
        return path.relative_to(self.root).as_posix()  # raises for a path outside the store, as before

    def delete(self, con: duckdb.DuckDBPyConnection, keys: Iterable[str]) -> None:
        """Delete the rows of ``keys``; the store's generation moves first (``removing``)."""
        keys = list(keys)
        if keys:
            self.removing()
            con.execute("DELETE FROM entries WHERE key IN (SELECT unnest(?::VARCHAR[]))", [keys])

    def removing(self) -> None:
        """Move the store's generation (``featurestore.generation``): a key is about to leave the manifest or
        change its content. Inside the exclusive transaction, before it commits (and before a key's own file is
        replaced): a reader never sees the old generation with the change made.

        Once per exclusive hold: a move already made in it came before anything of the hold commits, so it
        covers every later change too. Each move is a fsynced replace, and a replacing put asked twice (its
        own and its rows' delete), a damaged manifest three times (set aside, restored, and a new store's)."""
        if self._moved:
            return
        move_generation(self.root)
        if self._moved is not None:
            self._moved = True

    def select(
        self, con: duckdb.DuckDBPyConnection, keys: Sequence[str] | None = None, *, symbol: str | None = None
    ) -> dict[str, Entry]:
        query = (
            "SELECT key, path, symbol, start_ts, end_ts, rows, file_size_bytes, content_hash, hash_method,"
        )
        query += " created_ts, last_accessed_ts, pack_offset, pack_bytes FROM entries"
        params: list[Any] = []
        if keys is not None:
            # A join, not ``key IN (...)``, as in ``hashes``.
            query += " JOIN (SELECT DISTINCT unnest(?::VARCHAR[]) AS key) wanted USING (key)"
            params.append(list(keys))
        elif symbol is not None:
            query += " WHERE symbol = ?"
            params.append(symbol)
        return {row[0]: self._entry(row) for row in con.execute(query, params).fetchall()}

    def locations(self, con: duckdb.DuckDBPyConnection, keys: Sequence[str]) -> dict[str, tuple[Path, bool]]:
        """(file, whether it is a pack) of those ``keys`` present: what a read needs, in one query, with one
        ``Path`` per file rather than an ``Entry`` per key (2,000 keys of one pack: one path)."""
        with _registered(con, "wanted", {"key": keys}):
            rows = con.execute(
                "SELECT key, e.path, e.pack_offset IS NOT NULL FROM entries e JOIN wanted USING (key)"
            ).fetchall()
        paths: dict[str, Path] = {}
        return {
            key: (paths.get(path) or paths.setdefault(path, Path(self._root_prefix + path)), bool(packed))
            for key, path, packed in rows
        }

    def files_of(self, con: duckdb.DuckDBPyConnection, keys: Sequence[str]) -> dict[str, list[str]]:
        """The files (absolute paths, as text) that hold those ``keys`` present, each with its keys: one row per
        file from the query, no ``Path`` built (``FeatureStore.files_gone``: 2,600 keys in 1,100 files, about a
        quarter of ``locations``' time)."""
        rows = con.execute(
            "SELECT e.path, list(key) FROM entries e JOIN (SELECT unnest(?::VARCHAR[]) AS key) k USING (key)"
            " GROUP BY e.path",
            [list(keys)],
        ).fetchall()
        return {self._root_prefix + path: list(held) for path, held in rows}

    @staticmethod
    def hashes(con: duckdb.DuckDBPyConnection, keys: Sequence[str]) -> dict[str, tuple[str, int]]:
        """(content hash, rows) of those ``keys`` present: no ``Entry`` per key (its path and four datetimes
        were ~70% of a no-op plan over 60,000 segments)."""
        # A join, not ``key IN (...)``; and columns, not rows: a tuple per row cost 60,000 keys a third more.
        with _registered(con, "wanted", {"key": keys}):
            found = con.execute(
                "SELECT key, e.content_hash, e.rows FROM entries e JOIN wanted USING (key)"
            ).fetchnumpy()
        entries = zip(found["content_hash"].tolist(), found["rows"].tolist(), strict=True)
        return dict(zip(found["key"].tolist(), entries, strict=True))

    @staticmethod
    def hashes_ending(con: duckdb.DuckDBPyConnection, suffix: str) -> dict[str, tuple[str, int]]:
        """(content hash, rows) of every key ending with ``suffix``."""
        rows = con.execute(
            "SELECT key, content_hash, rows FROM entries WHERE ends_with(key, ?)", [suffix]
        ).fetchall()
        return {key: (content_hash, int(n)) for key, content_hash, n in rows}

    def _entry(self, row: tuple[Any, ...]) -> Entry:
        return Entry(
            key=row[0],
            path=Path(self._root_prefix + row[1]),  # one parse, not a join: lookups build thousands
            symbol=row[2],
            start_ts=_aware(row[3]),
            end_ts=_aware(row[4]),
            rows=int(row[5]),
            file_size_bytes=int(row[6]),
            content_hash=row[7],
            hash_method=row[8],
            created_ts=_aware(row[9]) or utc_now(),
            last_accessed_ts=_aware(row[10]) or utc_now(),
            pack_offset=row[11],
            pack_bytes=row[12],
        )

    def unreferenced(self, con: duckdb.DuckDBPyConnection, paths: Iterable[Path]) -> list[Path]:
        """Those of ``paths`` that no row names any more (a pack goes only when none of its keys is left)."""
        wanted = {path.relative_to(self.root).as_posix(): path for path in paths}
        if not wanted:
            return []
        named = con.execute(
            "SELECT DISTINCT path FROM entries WHERE path IN (SELECT unnest(?::VARCHAR[]))", [list(wanted)]
        ).fetchall()
        left = {row[0] for row in named}
        return [path for rel, path in wanted.items() if rel not in left]

    def delete_at(self, con: duckdb.DuckDBPyConnection, keys: Iterable[str], path: Path) -> None:
        """Delete the rows of ``keys`` that still name ``path`` (a newer put may have moved a key elsewhere)."""
        keys = list(keys)
        if keys:
            self.removing()
            con.execute(
                "DELETE FROM entries WHERE key IN (SELECT unnest(?::VARCHAR[])) AND path = ?",
                [keys, path.relative_to(self.root).as_posix()],
            )


# Per process: the (inode, size, mtime) of each manifest last seen whole, so the full read runs once per version.
_SOUND: dict[Path, tuple[int, int, int] | None] = {}
# Per process: the identity of each manifest found no newer than this code (``Manifest.refuse_newer``).
_NOT_NEWER: dict[Path, tuple[int, int, int]] = {}
# Per process and manifest: the in-memory DuckDB the file is attached to for each access (``Manifest._host``),
# and the name it is attached under.
_HOSTS: dict[tuple[int, Path], duckdb.DuckDBPyConnection] = {}
_ALIAS = "manifest"


@contextmanager
def _interrupts_kept() -> Iterator[None]:
    """A Ctrl-C during a DuckDB query raised as KeyboardInterrupt, as everywhere else.

    DuckDB's Python client takes the signal itself, cancels the query and raises RuntimeError("Query
    interrupted"): the KeyboardInterrupt is gone, and a CLI would end in a traceback instead of its one line.
    And one it raises no error for is lost outright: a KeyboardInterrupt raised in a module import DuckDB makes
    from C++ (waiting on the import lock of a module another thread is importing) is taken for a missing module.
    So a SIGINT during the block is also noted (``interrupts_noted``) and raised when the block ends.
    """
    with interrupts_noted():
        try:
            yield
        except RuntimeError as exc:
            _raise_if_interrupt(exc)
            raise


def _raise_if_interrupt(exc: Exception) -> None:
    """KeyboardInterrupt if ``exc`` is DuckDB's word for a Ctrl-C (never taken for a damaged manifest)."""
    if isinstance(exc, duckdb.InterruptException) or (type(exc) is RuntimeError and str(exc) == _INTERRUPTED):
        raise KeyboardInterrupt from exc


@contextmanager
def _registered(con: duckdb.DuckDBPyConnection, name: str, columns: Mapping[str, Any]) -> Iterator[None]:
    """``columns`` (lists or NumPy arrays of one length) as the relation ``name`` on ``con`` for the block.

    As NumPy arrays, which DuckDB scans in place: a list parameter is converted value by value (60,000 keys: about
    0.15 s; the journal's three columns: 0.65 s), and a pyarrow array imports pandas (to ask whether its input is
    a Series), a second of imports in a refresh that has nothing to do.
    """
    arrays = {
        column: values if isinstance(values, np.ndarray) else np.array(values, dtype=object)
        for column, values in columns.items()
    }
    con.register(name, arrays)
    try:
        yield
    finally:
        con.unregister(name)


def _literal(text: str) -> str:
    """``text`` as a SQL string literal: ATTACH takes no parameters, so the path is quoted here, quotes doubled."""
    return "'" + text.replace("'", "''") + "'"


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        status = path.stat()
    except (FileNotFoundError, NotADirectoryError):  # a root under a file: FeatureStore says so in one line
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def _first_line(exc: object) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


__all__ = ["MANIFEST_FILE", "STORE_FORMAT", "Entry", "Manifest", "Row", "Txn", "ns_to_utc", "utc_now"]
