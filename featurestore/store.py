"""FeatureStore: get_or_compute over a content-addressed directory of Parquet files and a DuckDB manifest.

Files are the truth. A key lives in a file named by the key, or (small tables written in a batch) in a pack shared
with the rest of its batch (``featurestore._packs``). Either appears only by atomic rename, inside the same
exclusive manifest transaction that records its rows; deletions remove the rows, commit, then unlink a file no
row names any more. So a process killed at any instant leaves at worst an orphan file (collected by GC, or adopted
by ``rebuild_manifest``), never a row that points at a partial file. A single key's read tries its own file first,
without the manifest; many keys are located by one manifest query and each pack is read once for all of its keys.
Every read verifies content (a file's content hash; a pack's row-group checksums, falling back to each key's hash
when one does not match) and journals the access. A per-key flock makes computation single-flight across processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import functools
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import pyarrow as pa

from featurestore import _bodies, _files, _packs, _writes, maintenance
from featurestore._locks import READ_ONLY_ERRNOS, file_lock, open_lock_file
from featurestore.errors import ComputeError, StoreDiskFull, bad_value
from featurestore.fingerprint import HASH_METHODS, Concatenated, HashMethod, fingerprint_many
from featurestore.generation import read_generation
from featurestore.keys import Raw, feature_key, is_dataframe, time_ranges, to_arrow
from featurestore.maintenance import IntegrityReport
from featurestore.manifest import Entry, Manifest, Txn, ns_to_utc, utc_now

if TYPE_CHECKING:
    import pandas as pd

    from featurestore.gc import GCReport

DEFAULT_ROOT = Path("~/.feature_cache")
ROOT_ENV = "FEATURE_STORE_PATH"
_LOCK_DIR = "key-locks"
# Every checkout from before packs (store format 1) makes a directory ``locks`` on opening a store (its per-key
# locks), and its gc takes each packed row for corrupt (the pack's size is not the key's share) and unlinks the
# pack. A file there makes that mkdir fail: such code refuses the store before touching it (a FileExistsError
# naming this file, which says why).
_FORMAT_MARKER = "locks"
_MARKER_TEXT = (
    "featurestore store format 2 (packs): the per-key locks are in key-locks/. This file keeps featurestore code\n"
    "from before packs (which would delete the packs as corrupt) from opening the store: update that checkout.\n"
)
# The manifest's ``kind`` column says "features" for computed entries; users read "feature".
_KIND_NAMES = {"features": "feature"}

Features: TypeAlias = "pd.DataFrame | pa.Table"
ComputeFunc = Callable[[Any, Any], Features]


@dataclasses.dataclass(frozen=True)
class AccessCounts:
    """Hits and misses: the one definition both the store's stats and a caller's report use.

    Every key a caller asks the store for counts once per request: ``lookup(count=True)``, ``get``, ``get_many``
    and ``get_or_compute(_many)``. A hit is a key the store could serve (present, and sound when its file is
    read); a miss is one it could not (absent, or evicted as corrupt), which the caller then fetches or computes.
    ``put`` and manifest-only ``lookup`` (the default) count nothing.
    """

    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    def __sub__(self, other: AccessCounts) -> AccessCounts:
        return AccessCounts(self.hits - other.hits, self.misses - other.misses)


@dataclasses.dataclass(frozen=True)
class KindStats:
    """Entries and bytes of one kind of entry: ``segment`` (raw tables by key) or ``feature`` (computed)."""

    entries: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """What the store holds and how it has been used (hits and misses across every process, ``AccessCounts``)."""

    root: Path
    entries: int
    bytes: int
    hits: int
    misses: int
    hit_rate: float
    hash_methods: Mapping[str, int]
    kinds: Mapping[str, KindStats] = dataclasses.field(default_factory=dict)
    # COPY bodies kept beside the entries (``featurestore._bodies``), not counted in ``entries`` and ``bytes``:
    # a derived cache of some entries' content, which GC collects with them.
    bodies: KindStats = KindStats(0, 0)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "root": str(self.root)}


@dataclasses.dataclass(frozen=True)
class WarmReport:
    """Result of ``warm_cache``."""

    requested: int
    computed: int
    hits: int


class FeatureStore:
    """A cache of computed features and raw segments shared safely by many processes and threads."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        hash_method: HashMethod = "xxh3",
        compression_level: int = 3,
        lock_timeout: float | None = 600.0,
        pack_max_rows: int = _packs.PACK_MAX_ROWS,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        """``pack_max_rows``: tables of fewer rows written in one batch share a pack file (0: never). ``on_wait``
        is told in one line when the manifest is held by another process and waited for (``Manifest``), or a
        feature another process computes (``get_or_compute``)."""
        if root is None:
            root = os.environ.get(ROOT_ENV) or DEFAULT_ROOT
        if hash_method not in HASH_METHODS:
            raise bad_value("hash_method", hash_method, f"unknown (choose one of {', '.join(HASH_METHODS)})")
        self.root = Path(root).expanduser().absolute()
        self.hash_method: HashMethod = hash_method
        self.compression_level = compression_level
        self.lock_timeout = lock_timeout
        self.pack_max_rows = pack_max_rows
        self._on_wait = on_wait
        self.manifest = Manifest(
            self.root, lock_timeout=lock_timeout, restore=maintenance.restore_rows, on_wait=on_wait
        )
        self.manifest.refuse_newer()  # before anything is written
        try:
            (self.root / _files.DATA_DIR).mkdir(parents=True, exist_ok=True)
            _mkdir_unless_read_only(self.root / _LOCK_DIR)
            _refuse_code_before_packs(self.root)
        except (NotADirectoryError, FileExistsError) as exc:  # FEATURE_STORE_PATH naming a file: a traceback
            raise bad_value(
                "root", str(self.root), f"cannot hold a store: {exc.filename} ({exc.strerror})"
            ) from None
        self._session = AccessCounts()
        self._session_lock = threading.Lock()
        self._ensure_manifest()
        if read_generation(self.root) is None:  # a store from before generations: its first write makes one
            with self.manifest.write():
                pass

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    # -- computed features ------------------------------------------------------------------------------------

    def get_or_compute(
        self,
        symbol: str,
        raw: Raw,
        config: Any,
        compute_func: ComputeFunc,
        *,
        version: str | None = None,
    ) -> Features:
        """``compute_func(raw, config)``, from the cache when this exact input was computed before.

        On a hit ``compute_func`` is never called. When several processes miss the same key at once, one computes
        and the others wait for its file (per-key flock). A DataFrame result comes back as a DataFrame.
        """
        fkey = feature_key(symbol, raw, config, compute_func, version=version, hash_method=self.hash_method)
        key = fkey.key
        self._ensure_manifest()
        stored = self._read_many([key]).get(key)
        if stored is None:
            # No timeout: waiting for the key is waiting for its computation, however long that takes; a
            # computing process that dies releases the lock with its descriptors.
            with file_lock(self._key_lock(key), on_wait=self._computing()):
                stored = self._read_many([key]).get(key)  # another process may have computed it meanwhile
                if stored is None:
                    return self._compute_and_store(fkey.key, symbol, raw, config, compute_func, fkey)
        self._record([key])
        return self._present(stored)

    def get_or_compute_many(
        self,
        jobs: Sequence[tuple[str, Raw, Any]],
        compute_func: ComputeFunc,
        *,
        version: str | None = None,
    ) -> list[Features]:
        """``get_or_compute`` for many (symbol, raw, config) at once, results in the order of ``jobs``.

        Same keys, same single-flight guarantee, but every miss is recorded in ONE manifest transaction: a
        DuckDB open cost about 20 ms here (before the manifest was attached, see ``featurestore.manifest``), so
        200 features computed one by one spent 5 s on the manifest alone; a write still checkpoints the file.
        """
        fkeys = [
            feature_key(symbol, raw, config, compute_func, version=version, hash_method=self.hash_method)
            for symbol, raw, config in jobs
        ]
        results: dict[str, Features] = {}
        self._ensure_manifest()
        for key, stored in self._read_many([f.key for f in fkeys]).items():
            results[key] = self._present(stored)
        computed: set[str] = set()
        if len(results) < len({f.key for f in fkeys}):
            # Lock files are shared by key prefix: take each once, in sorted order, so that two batches
            # with overlapping keys cannot deadlock. All are held until the batch's one manifest transaction
            # has stored its keys: a stripe let go before its keys are stored lets another process find them
            # missing and compute them again, and storing each stripe's keys in a transaction of their own
            # undoes the one transaction (see the docstring).
            locks = sorted({self._key_lock(f.key) for f in fkeys if f.key not in results})
            computing = self._computing()
            with contextlib.ExitStack() as held:
                for lock in locks:
                    held.enter_context(file_lock(lock, on_wait=computing))
                # another process may have computed some while we waited
                again = self._read_many(sorted({f.key for f in fkeys if f.key not in results}))
                fresh: list[tuple[str, pa.Table, str | None, dict[str, Any]]] = []
                kinds: dict[str, str] = {}
                for fkey, (symbol, raw, config) in zip(fkeys, jobs, strict=True):
                    if fkey.key in results or fkey.key in kinds:
                        continue
                    if fkey.key in again:
                        results[fkey.key] = self._present(again[fkey.key])
                        continue
                    table, kind, meta = self._compute(fkey.key, symbol, raw, config, compute_func, fkey)
                    fresh.append((fkey.key, table, symbol, meta))
                    kinds[fkey.key] = kind
                for kind in sorted(set(kinds.values())):
                    batch = [item for item in fresh if kinds[item[0]] == kind]
                    self._store(batch, kind=kind, entry_kind="features", misses=len(batch))
                for key, table, _symbol, _meta in fresh:
                    results[key] = self._present(_files.Stored(table, {"kind": kinds[key]}, 0, 0))
                computed = set(kinds)
        self._record([f.key for f in fkeys if f.key not in computed])
        return [results[f.key] for f in fkeys]

    def _compute(
        self, key: str, symbol: str, raw: Raw, config: Any, compute_func: ComputeFunc, fkey: Any
    ) -> tuple[pa.Table, str, dict[str, Any]]:
        """Run ``compute_func`` and check its result: (table as stored, "pandas"|"arrow", file metadata)."""
        name = fkey.func_name
        try:
            result = compute_func(raw, config)
        except Exception as exc:
            exc.add_note(
                f"featurestore: compute_func {name} failed for {symbol} (key {key[:16]}...); nothing cached"
            )
            raise
        if is_dataframe(result):
            table, kind = pa.Table.from_pandas(result), "pandas"
        elif isinstance(result, pa.Table):
            table, kind = result, "arrow"
        else:
            raise ComputeError(
                name, key, f"returned {type(result).__name__}, not a DataFrame or pyarrow Table"
            )
        meta = {"func": name, "func_version": fkey.func_version, "config_hash": fkey.config_hash}
        return _files.as_stored(table), kind, meta

    def _compute_and_store(
        self, key: str, symbol: str, raw: Raw, config: Any, compute_func: ComputeFunc, fkey: Any
    ) -> Features:
        table, kind, meta = self._compute(key, symbol, raw, config, compute_func, fkey)
        self._store([(key, table, symbol, meta)], kind=kind, entry_kind="features", misses=1)
        # What a later hit will return, so a miss and a hit are indistinguishable (e.g. an index's freq is
        # not stored by Parquet; returning ``result`` as is would differ from every hit after it).
        return self._present(_files.Stored(table, {"kind": kind}, 0, 0))

    def warm_cache(
        self,
        jobs: Iterable[tuple[str, Raw, Any]],
        compute_func: ComputeFunc,
        *,
        version: str | None = None,
    ) -> WarmReport:
        """Make sure ``compute_func`` results for every (symbol, raw, config) are cached; compute the missing."""
        computed = 0

        def counting(raw: Any, config: Any) -> Features:
            nonlocal computed
            computed += 1
            return compute_func(raw, config)

        requested = 0
        for symbol, raw, config in jobs:
            requested += 1
            # The key must name compute_func, not the counting wrapper: pin identity and version explicitly.
            self.get_or_compute(symbol, raw, config, _Named(compute_func, counting), version=version)
        return WarmReport(requested, computed, requested - computed)

    # -- raw segments by explicit key -------------------------------------------------------------------------

    def put(
        self, key: str, table: pa.Table, *, symbol: str | None = None, meta: Mapping[str, Any] | None = None
    ) -> Entry:
        """Store ``table`` under ``key``; the same content under the same key again leaves the stored file and
        row as they are (the copy written meanwhile is discarded)."""
        return self._store([(key, table, symbol, dict(meta or {}))], kind="arrow", entry_kind="segment")[0]

    def put_many(self, items: Iterable[tuple[str, pa.Table, str | None]]) -> list[Entry]:
        """Store many tables: all files are written first, then recorded in ONE manifest transaction."""
        return self._store([(key, table, symbol, {}) for key, table, symbol in items], "arrow", "segment")

    def put_many_hashes(self, items: Iterable[tuple[str, pa.Table, str | None]]) -> list[str]:
        """``put_many``, answering each table's content hash rather than its ``Entry``: what a caller that records
        only the hash needs (an ``Entry`` per key was about a fifth of the CPU of a put of 2,000 daily segments)."""
        listed: list[tuple[str, pa.Table, str | None, dict[str, Any]]] = [
            (key, table, symbol, {}) for key, table, symbol in items
        ]
        batch, *_ = self._write(listed, "arrow", "segment")
        hashes = dict(zip(batch.keys, batch.contents, strict=True))
        return [hashes[key] for key, _t, _s, _m in listed]

    def get(self, key: str) -> pa.Table | None:
        """The verified table stored under ``key``, or None (absent, or corrupt and now evicted)."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str], *, count: bool = True) -> dict[str, pa.Table]:
        """The verified tables of every present key; absent or corrupt keys (now evicted) are left out.

        The keys missing from the result are exactly the ones the caller must fetch again. ``count=False`` for
        keys the caller already counted (with ``lookup(count=True)``), so one request counts once.
        """
        self._ensure_manifest()
        wanted = [_files.check_key(key) for key in keys]
        read = self._read_many(list(dict.fromkeys(wanted)))
        found = {key: read[key].table for key in wanted if key in read}
        hits = [key for key in wanted if key in read]
        misses = len(wanted) - len(hits)
        if count:
            self._record(hits, misses=misses)
        return found

    def lookup(self, keys: Sequence[str], *, count: bool = False) -> dict[str, Entry]:
        """Manifest rows of the keys present, in one query and without reading any file.

        ``count=True`` when the lookup is the request (a planner deciding what to fetch): present keys count as
        hits (and as accesses, which keeps them from expiring), absent ones as misses.
        """
        with self.manifest.read() as con:
            found = self.manifest.select(con, list(keys))
        if count:
            self._record(list(found), misses=len(set(keys) - set(found)))
        return found

    def lookup_hashes(self, keys: Sequence[str], *, count: bool = False) -> dict[str, tuple[str, int]]:
        """``lookup`` for a planner: (content hash, rows) of the keys present, nothing else, in one query.

        Leaves the access journal to the next write (no access time is shown); ``count`` as for ``lookup``.
        """
        with self.manifest.read(fold=False) as con:
            found = self.manifest.hashes(con, keys)
        if count:
            self._record(list(found), misses=len(set(keys) - set(found)))
        return found

    def files_gone(self, keys: Sequence[str]) -> set[str]:
        """Those ``keys`` present whose file (their own, or the pack they ride in) is not there: deleted by hand,
        say. Their rows stay until a read misses them (a read evicts a damaged file's row, not a missing one's), so
        a planner that trusts the rows would never fetch them again. One manifest query and one ``stat`` per file,
        no file read: a damaged file is not found here (its read evicts it)."""
        with self.manifest.read(fold=False) as con:
            files = self.manifest.files_of(con, keys)
        return {key for path, held in files.items() if not os.path.exists(path) for key in held}

    def lookup_hashes_ending(self, suffix: str) -> dict[str, tuple[str, int]]:
        """(content hash, rows) of every key that ends with ``suffix``: one scan of the manifest's keys.

        For entries that are few among many, such as the notes a source left with some of 60,000 segments:
        about 4 ms, where ``lookup_hashes`` of every candidate key took 95 ms. Counts nothing.
        """
        with self.manifest.read(fold=False) as con:
            return self.manifest.hashes_ending(con, suffix)

    def read_bodies(self, keys: Sequence[str], layout: str) -> dict[str, tuple[Entry, _bodies.CopyBody]]:
        """For those ``keys`` present whose content has a sound COPY body in ``layout`` (``featurestore._bodies``),
        the key's manifest row and the body, whose rows are the row's; without reading the keys' files. A body
        that cannot be used (damaged, truncated, of another layout, of other rows) is removed and left out: the
        caller reads the key's table instead. Counts nothing (as ``get_many(count=False)``)."""
        with self.manifest.read(fold=False) as con:
            entries = self.manifest.select(con, list(keys))
        bodies = _bodies.read(self.root, (entry.content_hash for entry in entries.values()), layout)
        found: dict[str, tuple[Entry, _bodies.CopyBody]] = {}
        for key, entry in entries.items():
            body = bodies.get(entry.content_hash)
            if body is None:
                continue
            if body.rows != entry.rows:  # a body can only be of this content: written wrong, never to be used
                path = self.body_path(entry.content_hash, layout)
                for each in _files.in_store([path] if path is not None else []):
                    each.unlink(missing_ok=True)
                continue
            found[key] = (entry, body)
        return found

    def body_path(self, content_hash: str, layout: str) -> Path | None:
        """The file that keeps the COPY body of ``content_hash`` in ``layout``, whether or not there is one (None:
        no body can be kept for that hash or layout)."""
        return _bodies.body_path(self.root, content_hash, layout)

    def put_bodies(self, items: Sequence[tuple[str, int, bytes | memoryview]], layout: str) -> int:
        """Keep the COPY bodies of ``items`` (content hash, rows, raw bytes) in ``layout`` beside the entries
        that hold that content (``featurestore._bodies``); returns the bytes written. One whose content no entry
        holds (any more) is an orphan GC removes."""
        return _bodies.write(self.root, items, layout)

    def require_writable(self) -> None:
        """StoreNotWritable now, if this user may not open the manifest's lock file, which every read and write
        takes: before a caller starts what the store's first use would leave behind (a refresh's new server)."""
        os.close(open_lock_file(self.manifest.lock_path))

    def session_counts(self) -> AccessCounts:
        """The hits and misses this FeatureStore object has added to the store's counters so far."""
        with self._session_lock:
            return self._session

    # -- maintenance ------------------------------------------------------------------------------------------

    def get_cache_stats(self) -> CacheStats:
        """Entries and bytes (in all and per kind), hits and misses of every process, hash methods in use."""
        with self.manifest.read() as con:
            per_kind = con.execute(
                "SELECT kind, count(*), coalesce(sum(file_size_bytes), 0) FROM entries GROUP BY 1 ORDER BY 1"
            ).fetchall()
            methods = dict(con.execute("SELECT hash_method, count(*) FROM entries GROUP BY 1").fetchall())
            counters = self.manifest.counters(con)
        kinds = {_KIND_NAMES.get(kind, kind): KindStats(int(n), int(size)) for kind, n, size in per_kind}
        for kind in ("segment", "feature"):
            kinds.setdefault(kind, KindStats(0, 0))
        access = AccessCounts(counters.get("hits", 0), counters.get("misses", 0))
        bodies = KindStats(*_bodies.sizes(self.root))
        return CacheStats(
            root=self.root,
            entries=sum(k.entries for k in kinds.values()),
            bytes=sum(k.bytes for k in kinds.values()),
            hits=access.hits,
            misses=access.misses,
            hit_rate=round(access.hit_rate, 4),
            hash_methods=methods,
            kinds=dict(sorted(kinds.items())),
            bodies=bodies,
        )

    def clear_cache(self, symbol: str | None = None) -> int:
        """Remove every entry (or every entry of ``symbol``), rows first, then files; returns the count."""
        with self.manifest.write() as txn:
            doomed = self.manifest.select(txn.con, symbol=symbol)
            self.manifest.delete(txn.con, doomed)
            unheld = self.manifest.unreferenced(txn.con, {entry.path for entry in doomed.values()})
            for path in _files.in_store(unheld):
                txn.after_commit(functools.partial(path.unlink, missing_ok=True))
            self._release_bodies(txn, doomed.values())
        return len(doomed)

    def cleanup_old_entries(self, days_old: float) -> GCReport:
        """Garbage-collect entries not accessed for ``days_old`` days (see ``featurestore.gc``)."""
        from featurestore.gc import collect_garbage

        return collect_garbage(self, retention=dt.timedelta(days=days_old))

    def validate_cache_integrity(self, *, deep: bool = True) -> IntegrityReport:
        """Check that every manifest row has a sound file (content hash when ``deep``, else footer and size)."""
        return maintenance.check_integrity(self.manifest, deep=deep)

    def rebuild_manifest(self) -> int:
        """Recreate every manifest row from the files' own metadata (after a lost or damaged manifest)."""
        return maintenance.rebuild(self.manifest)

    # -- internals --------------------------------------------------------------------------------------------

    def _ensure_manifest(self) -> None:
        # Hits read files, not the manifest; if the manifest was deleted, restore it before serving any, so
        # no file is served while it has no row (it would be an orphan GC deletes under a reader).
        if not self.manifest.path.exists():
            with self.manifest.write():
                pass

    def _record(self, hits: Sequence[str], *, misses: int = 0) -> None:
        """Count per ``AccessCounts``: journal the accesses and add them to this object's session counts."""
        self.manifest.record_access(hits, misses=misses)
        self._tally(len(hits), misses)

    def _tally(self, hits: int, misses: int) -> None:
        with self._session_lock:
            self._session = AccessCounts(self._session.hits + hits, self._session.misses + misses)

    def _computing(self) -> Callable[[], None] | None:
        """What a wait for keys' locks calls (``file_lock``): ``on_wait`` told once, however many of a batch's
        locks are waited for. Another process holds one while it computes a key of its stripe, for as long as that
        takes, or for good when it is stopped (Ctrl-Z). Not only a key this process wants: a batch
        (``get_or_compute_many``) holds every stripe of its misses until all are stored, and 200 keys take about
        5% of the 4,096 stripes, so two refreshes of unrelated profiles almost surely share one. The line said
        "the same features", a wrong cause for a normal concurrent run."""
        on_wait = self._on_wait
        if on_wait is None:
            return None
        line = (
            f"feature store {self.root}: another process computing features holds a lock these keys share "
            "(perhaps stopped: Ctrl-Z); waiting for it"
        )
        told = False

        def tell() -> None:
            nonlocal told
            if not told:
                told = True
                on_wait(line)

        return tell

    def _key_lock(self, key: str) -> Path:
        # A fixed set of 4,096 striped lock files: bounded on disk and never deleted, so no process can lock a
        # file another has just unlinked. Two keys sharing a stripe merely serialise their computations.
        return self.root / _LOCK_DIR / f"{key[:3]}.lock"

    def _read_many(self, keys: Sequence[str]) -> dict[str, _files.Stored]:
        """The verified contents of those ``keys`` the store can serve; corrupt ones are evicted on the way.

        One key (a single hit) tries its own file first, without opening the manifest. Many keys are located by
        one manifest query first, so a key the manifest places in a pack costs no failed open of a file of its
        own (60,000 packed segments: 60,000 of them), and each pack is read once for all of its keys.
        """
        found: dict[str, _files.Stored] = {}
        elsewhere = list(keys)
        if len(elsewhere) == 1:
            elsewhere = self._read_own(elsewhere, found)
        # A pack or file that vanished since (a newer put of its keys, or GC) is asked about again: the rows have
        # moved on with the keys.
        for _attempt in range(3):
            if not elsewhere:
                break
            with self.manifest.read(fold=False) as con:  # locations only: the journal waits for a write
                located = self.manifest.locations(con, elsewhere)
            by_pack: dict[Path, list[str]] = {}
            own: list[str] = []
            for key, (path, packed) in located.items():
                if packed:
                    by_pack.setdefault(path, []).append(key)
                else:
                    own.append(key)
            elsewhere = self._read_own(own, found) if own else []
            for pack, pack_keys in by_pack.items():
                try:
                    result = _packs.read_parts(pack, pack_keys)
                except FileNotFoundError:
                    elsewhere.extend(pack_keys)
                    continue
                found.update(result.found)
                if result.corrupt:
                    self._evict_packed(pack, list(result.corrupt), result.inode)
        return found

    def _read_own(self, keys: Sequence[str], found: dict[str, _files.Stored]) -> list[str]:
        """Read ``keys`` from files of their own into ``found``; the keys that have none (or a corrupt one, now
        evicted: its row may name a pack) to look for elsewhere."""
        elsewhere: list[str] = []
        for key in keys:
            path = _files.data_path(self.root, key)
            try:
                found[key] = _files.read_verified(path, key)
            except FileNotFoundError:
                elsewhere.append(key)
            except _files.CorruptFile as corrupt:
                self._evict(key, path, corrupt.inode)
                elsewhere.append(key)  # gone with its row, unless that row names a pack
        return elsewhere

    def _evict(self, key: str, path: Path, inode: int | None) -> None:
        with self.manifest.write() as txn:
            try:
                replaced = inode is not None and path.stat().st_ino != inode
            except FileNotFoundError:
                replaced = False
            if not replaced:  # a newer, good file took its place meanwhile: keep both it and its row
                gone = self.manifest.select(txn.con, [key]).values()
                self.manifest.delete_at(txn.con, [key], path)
                if _files.in_store([path]):
                    txn.after_commit(lambda: _files.remove_if_same(path, inode))
                self._release_bodies(txn, gone)

    def _evict_packed(self, pack: Path, keys: list[str], inode: int) -> None:
        """Evict the damaged keys of a pack; the pack itself goes only once no row names it."""
        with self.manifest.write() as txn:
            gone = self.manifest.select(txn.con, keys).values()
            self.manifest.delete_at(txn.con, keys, pack)
            if _files.in_store(self.manifest.unreferenced(txn.con, [pack])):
                txn.after_commit(lambda: _files.remove_if_same(pack, inode))
            self._release_bodies(txn, gone)

    def _release_bodies(self, txn: Txn, gone: Iterable[Entry]) -> None:
        """After ``gone``'s rows were deleted in ``txn``: the COPY bodies no entry holds now go after its commit."""
        released = _bodies.released(self.root, txn.con, (entry.content_hash for entry in gone))
        for path in _files.in_store(released):
            txn.after_commit(functools.partial(path.unlink, missing_ok=True))

    @staticmethod
    def _present(stored: _files.Stored) -> Features:
        if stored.meta.get("kind") == "pandas":
            frame: pd.DataFrame = stored.table.to_pandas()
            return frame
        return stored.table

    def _store(
        self,
        items: Sequence[tuple[str, pa.Table, str | None, dict[str, Any]]],
        kind: str,
        entry_kind: str,
        *,
        misses: int = 0,
    ) -> list[Entry]:
        """Store ``items`` (key, table, symbol, meta) in one batch; each item's entry."""
        batch, done, placed = self._write(items, kind, entry_kind, misses=misses)
        if placed is not None:
            done.update(_entries(batch, placed))
        return [done[key] for key, _t, _s, _m in items]

    def _write(
        self,
        items: Sequence[tuple[str, pa.Table, str | None, dict[str, Any]]],
        kind: str,
        entry_kind: str,
        *,
        misses: int = 0,
    ) -> tuple[_writes.Batch, dict[str, Entry], _writes.Placed | None]:
        """Write and record a batch: the batch, the entries of its keys left as they were (same content) and
        where the others were placed (None for an empty batch)."""
        # The batch field by field (``_writes.Batch``): each key once, its last table winning, in its first place.
        place: dict[str, int] = {}
        keys: list[str] = []
        tables: list[pa.Table] = []
        symbols: list[str | None] = []
        metas: list[dict[str, Any]] = []
        for key, table, symbol, meta in items:
            _files.check_key(key)
            if not (isinstance(table, pa.Table) or is_dataframe(table)):
                raise bad_value("table", type(table).__name__, f"must be a pyarrow Table (key {key})")
            stored = _files.as_stored(to_arrow(table))
            at = place.setdefault(key, len(keys))
            if at == len(keys):
                keys.append(key)
                tables.append(stored)
                symbols.append(symbol)
                metas.append(meta)
            else:
                tables[at], symbols[at], metas[at] = stored, symbol, meta
        # The batch's content hashes together: a batch of small tables shares its columns' work.
        # Made once for the batch's small tables, used again for their time ranges and their pack.
        concatenated = Concatenated()
        contents = fingerprint_many(tables, self.hash_method, concatenated=concatenated)
        bounds = time_ranges(tables, concatenated=concatenated)
        batch = _writes.Batch(
            keys, tables, symbols, [_files.dump_meta(meta) for meta in metas], contents, bounds,
            self.hash_method, kind, entry_kind, utc_now(),
        )  # fmt: skip
        # An instant no datetime holds (an entry's start or end) fails here, before anything is written, not
        # after the commit: the earliest start and the latest end hold every other.
        filled = [b for b in bounds if b is not None]
        if filled:
            ns_to_utc(min(b[0] for b in filled))
            ns_to_utc(max(b[1] for b in filled))
        done: dict[str, Entry] = {}
        placed: _writes.Placed | None = None
        written = _writes.Written()
        try:
            _writes.write(
                self.root,
                batch,
                written,
                compression_level=self.compression_level,
                pack_max_rows=self.pack_max_rows,
                concatenated=concatenated,
            )
            if keys:
                # One manifest transaction a batch: what it already holds is asked here, after the files are
                # written, not in a read of its own before (a DuckDB open and close were ~20 ms each, twice a
                # batch of 2,000 daily segments). The price is a put of content already stored: its files are
                # written and then discarded unpublished, which leaves the stored file and row as they were.
                with self.manifest.write() as txn:
                    held = self.manifest.select(txn.con, keys)
                    if entry_kind == "segment":
                        done = _unchanged(held, dict(zip(keys, contents, strict=True)))
                    replaced = [key for key in held if key not in done]
                    if replaced:
                        # A key written again with other content (or over a row whose file is gone): a
                        # replacement, before its own file is renamed over the old one.
                        self.manifest.removing()
                    stale = {e.path for e in held.values() if e.pack_offset is not None and e.key not in done}
                    placed = written.publish(self.root, batch, unchanged=done.keys())
                    self.manifest.insert(txn.con, self._rows(batch, placed), present=replaced)
                    # A pack whose every key has now moved elsewhere is no longer named by any row.
                    for path in _files.in_store(self.manifest.unreferenced(txn.con, stale)):
                        txn.after_commit(functools.partial(path.unlink, missing_ok=True))
                    self.manifest.add_counters(txn.con, misses=misses)
                self._tally(0, misses)
        except OSError as exc:
            # The batch's files filled the disk (the manifest's own writes say so themselves): one line, as
            # for the manifest, not an OSError traceback twice over (the Parquet writer's close fails too).
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreDiskFull.at(str(self.root), f"writing the batch's files: {exc.strerror}") from None
            raise
        finally:
            written.discard()
        return batch, done, placed

    def _rows(self, batch: _writes.Batch, placed: _writes.Placed) -> dict[str, list[Any]]:
        """The manifest rows of the keys ``placed``, column by column (``Manifest.insert``)."""
        at, n = placed.index, len(placed.index)
        bounds = [batch.bounds[i] for i in at]
        now = batch.now.astimezone(dt.UTC).replace(tzinfo=None)
        return {
            "key": [batch.keys[i] for i in at],
            "path": placed.path,
            "symbol": [batch.symbols[i] for i in at],
            # Nanoseconds floored to the manifest's microseconds, as ``ns_to_utc`` does.
            "start_ts": [None if b is None else b[0] // 1000 for b in bounds],
            "end_ts": [None if b is None else b[1] // 1000 for b in bounds],
            "rows": [batch.tables[i].num_rows for i in at],
            "file_size_bytes": placed.size,
            "content_hash": [batch.contents[i] for i in at],
            "hash_method": [batch.hash_method] * n,
            "created_ts": [now] * n,
            "last_accessed_ts": [now] * n,
            "kind": [batch.entry_kind] * n,
            "meta": [batch.metas[i] for i in at],
            "pack_offset": placed.offset,
            "pack_bytes": placed.pack_bytes,
        }


def _mkdir_unless_read_only(path: Path) -> None:
    """``path`` made if missing; on a store this user cannot write, left to the first lock to say so in one line."""
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        if exc.errno not in READ_ONLY_ERRNOS:
            raise


def _refuse_code_before_packs(root: Path) -> None:
    """Put the ``_FORMAT_MARKER`` file in place, replacing the ``locks`` directory of a store opened before it
    (by code from before packs, or since packs but before the marker). The marker's text is written first, the
    directory moved aside and the marker renamed into its place at once, and only then the old lock files removed
    (thousands of them): an older checkout's mkdir finds the marker all that while. One meeting a directory again
    (an older checkout's mkdir in between) moves it aside again. The lock files in a moved directory serve only
    single-flight: two processes may then compute one key twice, never wrongly."""
    marker = root / _FORMAT_MARKER
    if marker.is_file():
        return
    temporary = root / f".{_FORMAT_MARKER}-{uuid.uuid4().hex}.tmp"
    asides: list[Path] = []
    try:
        temporary.write_text(_MARKER_TEXT)
        for _ in range(8):
            if marker.is_dir():
                aside = root / f".{_FORMAT_MARKER}-{uuid.uuid4().hex}.old"
                with contextlib.suppress(FileNotFoundError):  # else another process moved it first
                    os.rename(marker, aside)
                    asides.append(aside)
            elif marker.exists():
                return
            try:
                os.rename(temporary, marker)  # over nothing, or another process's marker: the same text
                return
            except IsADirectoryError:  # an older checkout's mkdir came first: move it aside
                continue
        raise bad_value(
            "root",
            str(root),
            f"{marker} is made again as a directory each time it is replaced (featurestore code from before packs "
            "opening the store over and over?); stop that code, update its checkout and run again",
        )
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreDiskFull.at(str(root), f"writing {temporary.name}: {exc.strerror}") from None
        if exc.errno not in READ_ONLY_ERRNOS:  # a read-only store: no gc runs there
            raise
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)


def _unchanged(held: Mapping[str, Entry], contents: Mapping[str, str]) -> dict[str, Entry]:
    """The rows ``held`` of those keys the manifest already records with their content in ``contents``, whose
    file is there (one ``stat`` per file: a pack's keys share theirs)."""
    same = {key: entry for key, entry in held.items() if entry.content_hash == contents[key]}
    there = {path: path.exists() for path in {entry.path for entry in same.values()}}
    return {key: entry for key, entry in same.items() if there[entry.path]}


def _entries(batch: _writes.Batch, placed: _writes.Placed) -> dict[str, Entry]:
    """The entries of the keys ``placed``, as their rows record them."""
    # One conversion per distinct instant: a batch's months repeat across its symbols.
    times = functools.lru_cache(maxsize=None)(ns_to_utc)
    spans = [(None, None) if b is None else (times(b[0]), times(b[1])) for b in batch.bounds]
    return {
        batch.keys[i]: Entry(
            batch.keys[i],
            path,
            batch.symbols[i],
            *spans[i],
            batch.tables[i].num_rows,
            size,
            batch.contents[i],
            batch.hash_method,
            batch.now,
            batch.now,
            offset,
            pack_bytes,
        )
        for i, path, size, offset, pack_bytes in zip(
            placed.index, placed.path, placed.size, placed.offset, placed.pack_bytes, strict=True
        )
    }


class _Named:
    """A compute function wrapper that keeps the wrapped function's identity for the key."""

    def __init__(self, identity: ComputeFunc, call: ComputeFunc) -> None:
        self.__wrapped__ = identity
        self._call = call

    def __call__(self, raw: Any, config: Any) -> Features:
        return self._call(raw, config)


__all__ = ["AccessCounts", "CacheStats", "FeatureStore", "IntegrityReport", "KindStats", "WarmReport"]
