"""Stored files: Zstandard Parquet, one per key, written atomically and verified on every read.

A file becomes visible only by ``rename`` of a fully written, fsynced temporary in the same directory, so a reader
or a crash sees either no file or a whole one. Each file carries its own key metadata (key, symbol, range, content
hash, kind) in the Parquet key-value metadata, which lets ``rebuild_manifest`` restore the manifest from the files.

Reads verify the full content hash, not just the footer: xxh3 runs at >10 GB/s, far faster than Parquet decoding,
so checking every value costs a few percent of a read, and it is the only check that catches a flipped bit in a
data page that still decompresses. Truncation fails earlier, at the footer.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from featurestore.errors import StoreFileUnreadable, bad_value
from featurestore.fingerprint import HashMethod, fingerprint_table

DATA_DIR = "data"
# Threads of ``fsync_paths``: enough to put a batch's fsyncs into a few journal commits.
FSYNC_THREADS = 16
TEMP_SUFFIX = ".tmp"
META_PREFIX = "featurestore."
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


class CorruptFile(Exception):
    """A stored file is unreadable, truncated or does not match its own content hash (internal)."""

    def __init__(self, path: Path, reason: str, inode: int | None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.inode = inode


@dataclass(frozen=True)
class Stored:
    """A verified table read from a file, with its key metadata and the inode it came from."""

    table: pa.Table
    meta: dict[str, str]
    inode: int
    size: int


def check_key(key: str) -> str:
    """Keys name files: only a safe, bounded alphabet reaches the file system."""
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise bad_value("key", key, "must be 1-200 characters of [A-Za-z0-9._-], not starting with '.'")
    return key


def data_path(root: Path, key: str) -> Path:
    # One parse of a formatted string, not three joins: a batch names thousands of these.
    return Path(f"{root}{os.sep}{DATA_DIR}{os.sep}{key[:2]}{os.sep}{key}.parquet")


def with_own_files(root: Path, keys: Iterable[str]) -> set[str]:
    """Those of ``keys`` that have a file of their own now: one directory listing per key prefix shared by many
    keys, not a stat per key (a batch of 2,000 packed segments has none, and asked 2,000 times)."""
    by_dir: dict[str, list[str]] = {}
    for key in keys:
        by_dir.setdefault(key[:2], []).append(key)
    found: set[str] = set()
    for prefix, members in by_dir.items():
        directory = f"{root}{os.sep}{DATA_DIR}{os.sep}{prefix}"
        if len(members) < _LIST_FROM:
            found.update(key for key in members if os.path.exists(f"{directory}{os.sep}{key}.parquet"))
            continue
        try:
            names = set(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        found.update(key for key in members if f"{key}.parquet" in names)
    return found


# Keys of one prefix from which a directory listing beats a stat per key.
_LIST_FROM = 8


def key_of(path: Path) -> str | None:
    """The key a data file is named by, None for anything else (temporaries, strays)."""
    if path.name.startswith(".") or path.suffix != ".parquet":
        return None
    return path.name[: -len(".parquet")]


def as_stored(table: pa.Table) -> pa.Table:
    """The table cast to the types Parquet gives back (date64 -> date32, seconds -> milliseconds...).

    The content hash must be the hash of what a later read returns, so it is taken after this cast. The stored
    schema of each input schema is learnt once by a zero-row round trip and memoised.
    """
    stored = _stored_schema(table.schema)
    return table if stored.equals(table.schema) else table.cast(stored)


@functools.lru_cache(maxsize=256)
def _stored_schema_cached(schema: pa.Schema) -> pa.Schema:
    sink = io.BytesIO()
    pq.write_table(schema.empty_table(), sink)
    sink.seek(0)
    return pq.ParquetFile(sink).schema_arrow.with_metadata(schema.metadata)


# The last (input, stored) schema pair: a batch's tables share a schema, and comparing it is cheaper than hashing
# it for the cache (about 1 against 8 us).
_LAST_STORED: list[tuple[pa.Schema, pa.Schema]] = []


def _stored_schema(schema: pa.Schema) -> pa.Schema:
    last = _LAST_STORED[-1:]
    if last and last[0][0].equals(schema, check_metadata=True):
        return last[0][1]
    try:
        stored = _stored_schema_cached(schema)
        _LAST_STORED[:] = [(schema, stored)]
        return stored
    except TypeError:  # an unhashable schema (never seen in practice): do the round trip every time
        return _stored_schema_cached.__wrapped__(schema)


def write_temp(
    final: Path,
    table: pa.Table,
    meta: dict[str, str],
    *,
    compression_level: int,
    row_group_size: int | None = None,
    footer_only: dict[str, str] | None = None,
    use_dictionary: bool | list[str] = True,
    column_encoding: dict[str, str] | None = None,
    sync: bool = True,
) -> Path:
    """Write ``table`` to a fsynced temporary beside ``final``; the caller publishes it with ``publish``.

    ``meta`` goes into the table's Arrow schema metadata, ``footer_only`` into the Parquet footer's key-value
    metadata alone (both prefixed ``featurestore.``). pyarrow writes the schema metadata into the footer twice:
    as its own entries and again inside the base64 Arrow schema (``ARROW:schema``), so a large entry (a pack's
    index) belongs in ``footer_only``; those entries are read from ``ParquetFile.metadata.metadata``, not from the
    Arrow schema. ``sync=False`` leaves the fsync to the caller, who must ``fsync_paths`` the temporary before
    publishing it (a batch's files then share journal commits).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
    schema_meta = dict(table.schema.metadata or {})
    schema_meta.update({(META_PREFIX + k).encode(): v.encode() for k, v in meta.items()})
    stored = table.replace_schema_metadata(schema_meta)
    try:
        with open(temp, "wb") as handle:
            with pq.ParquetWriter(
                handle,
                stored.schema,
                compression="zstd",
                compression_level=compression_level,
                use_dictionary=use_dictionary,
                column_encoding=column_encoding,
                # Nothing reads a page's min/max (every read takes whole files, or a pack's row groups by its
                # index): computing them was a sixth of a minute segment's write (2.5 -> 2.05 ms of CPU a file).
                write_statistics=False,
            ) as writer:
                writer.write_table(stored, row_group_size=row_group_size)
                if footer_only:
                    writer.add_key_value_metadata({META_PREFIX + k: v for k, v in footer_only.items()})
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def writer_alive(temp: Path) -> bool:
    """Whether the process that named ``temp`` (``write_temp``: ``.<final>.<pid>.<token>.tmp``) still runs here,
    so its write may still be in flight: GC must leave it, however old (a batch slower than the grace period,
    or ``--grace-hours 0``, lost its temporaries and ended in a traceback).

    The process with that pid counts as the writer only if it started before the temporary was last written:
    a killed writer's pid taken since by a newer process (a reused pid, the init of a container started later)
    kept its temporary forever. psutil's start time (``/proc/<pid>/stat`` field 22 plus the boot time, whole
    seconds rounded down) is never later than the true one, so a live writer is never taken for a newer process.
    A process of another machine or pid namespace is not seen: one here with its pid that is older than the
    temporary keeps it as long as it runs."""
    import psutil  # gc alone asks (80 ms to import)

    parts = temp.name.rsplit(".", 3)
    if len(parts) != 4 or not parts[1].isdigit() or int(parts[1]) <= 0:
        return False
    try:
        written = temp.stat().st_mtime
        started = psutil.Process(int(parts[1])).create_time()
    except (FileNotFoundError, psutil.NoSuchProcess, OverflowError, ValueError):  # a zombie is NoSuchProcess
        return False
    except psutil.AccessDenied:  # alive, and its start unreadable: taken as the writer, as before
        return True
    return bool(started <= written)


def publish(temp: Path, final: Path) -> int:
    """Atomically move a temporary into place (replacing any older file) and make the rename durable."""
    os.replace(temp, final)
    fsync_dir(final.parent)
    return final.stat().st_size


def publish_many(moves: Sequence[tuple[Path, Path]]) -> list[int]:
    """``publish`` of many (temporary, final) pairs: every rename, then each directory's fsync once."""
    for temp, final in moves:
        os.replace(temp, final)
    fsync_paths([final.parent for _temp, final in moves])
    return [final.stat().st_size for _temp, final in moves]


def fsync_paths(paths: Iterable[Path]) -> None:
    """fsync each file or directory of ``paths`` once, many at a time.

    Why threads: fsyncs issued one by one each wait for a journal commit of their own, while concurrent ones
    share commits. 200 segment files and their directories on this machine's ext4: 0.80 s one by one, 0.05 s
    on 16 threads; a cold backtesting run writes 2,400 such files."""
    unique = list(dict.fromkeys(paths))
    if len(unique) < 2:
        for path in unique:
            fsync_dir(path)
        return
    with ThreadPoolExecutor(max_workers=min(FSYNC_THREADS, len(unique))) as pool:
        list(pool.map(fsync_dir, unique))


def fsync_dir(directory: Path) -> None:
    """fsync a directory (or a file: the same call)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_stored(path: Path) -> BinaryIO:
    """``path`` opened for reading; FileNotFoundError if absent, StoreFileUnreadable if something else is there
    (a directory) or this user may not read it: never taken for a corrupt file, which is evicted (removed)."""
    try:
        return open(path, "rb")
    except OSError as exc:
        # A directory, a file where its directory goes (ENOTDIR), a symbolic link that loops: in the way.
        if exc.errno not in (errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EPERM):
            raise
        in_the_way = exc.errno not in (errno.EACCES, errno.EPERM)
        raise StoreFileUnreadable(str(path), (exc.strerror or str(exc)).lower(), in_the_way) from None


def read_verified(path: Path, key: str | None = None) -> Stored:
    """Read and verify a stored file; FileNotFoundError if absent, CorruptFile if it cannot be trusted, or if
    its metadata names another key than ``key`` (given)."""
    with open_stored(path) as handle:
        status = os.fstat(handle.fileno())
        data = handle.read()
        try:
            # ParquetFile, not pq.read_table: no dataset scanner threads left to abort a short process at exit
            table = pq.ParquetFile(pa.BufferReader(data)).read()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CorruptFile(path, f"unreadable: {exc}", status.st_ino) from None
    meta = own_meta(table.schema.metadata)
    _check_holds(path, meta, key, status.st_ino)
    expected = meta.get("content_hash")
    method: HashMethod = "footer" if meta.get("hash_method") == "footer" else "xxh3"
    if expected is None:
        raise CorruptFile(path, "no content hash in its metadata", status.st_ino)
    actual = fingerprint_table(strip_meta(table), method)
    if actual != expected:
        raise CorruptFile(path, f"content hash {actual} != recorded {expected}", status.st_ino)
    return Stored(strip_meta(table), meta, status.st_ino, status.st_size)


def read_footer_meta(path: Path, key: str | None = None) -> tuple[dict[str, str], int]:
    """The key metadata and row count from the footer alone (cheap check: raises on truncation, and on metadata
    naming another key than ``key``, given)."""
    with open_stored(path) as handle:
        try:
            metadata = pq.read_metadata(handle)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CorruptFile(path, f"unreadable footer: {exc}", None) from None
    meta = own_meta(metadata.metadata)
    _check_holds(path, meta, key, None)
    return meta, metadata.num_rows


def _check_holds(path: Path, meta: Mapping[str, str], key: str | None, inode: int | None) -> None:
    """CorruptFile if ``meta`` is another key's than ``key`` (None: not asked): a file copied or renamed over
    this key's by hand is whole and matches its own content hash, and was served as this key's table."""
    if key is not None and meta.get("key") != key:
        raise CorruptFile(path, f"holds key {meta.get('key')!r}, not {key!r}", inode)


def own_meta(raw: Mapping[bytes, bytes] | None) -> dict[str, str]:
    """The store's own entries (prefix removed) of Arrow schema or Parquet footer key-value metadata."""
    raw = raw or {}
    prefix = META_PREFIX.encode()
    return {k[len(prefix) :].decode(): v.decode() for k, v in raw.items() if k.startswith(prefix)}


def strip_meta(table: pa.Table) -> pa.Table:
    """The table without the store's own metadata keys (other metadata, e.g. pandas', is kept)."""
    raw = table.schema.metadata
    if not raw:
        return table
    prefix = META_PREFIX.encode()
    kept = {k: v for k, v in raw.items() if not k.startswith(prefix)}
    return table.replace_schema_metadata(kept or None)


def in_store(paths: list[Path]) -> list[Path]:
    """Those of ``paths`` (files under ``data/`` or ``bodies/``) whose directory is no symbolic link. The store
    makes those directories itself; one linked elsewhere by hand is outside the store, and GC removed the files
    it found there (orphans to it) and, through a row, an expired key's file: GC never deletes there, nor does a
    clear, an eviction or a read that finds a body unusable. One lstat per directory, of the few files removed."""
    linked: dict[Path, bool] = {}
    for path in paths:
        if path.parent not in linked:
            linked[path.parent] = path.parent.is_symlink()
    return [path for path in paths if not linked[path.parent]]


def remove_if_same(path: Path, inode: int | None) -> bool:
    """Unlink ``path`` unless it was replaced since we read inode ``inode`` (a newer good file stays)."""
    with contextlib.suppress(FileNotFoundError):
        if inode is None or path.stat().st_ino == inode:
            path.unlink()
            return True
    return False


def dump_meta(value: object) -> str:
    if value == {}:  # every segment's
        return "{}"
    return json.dumps(value, sort_keys=True, default=str)


__all__ = [
    "DATA_DIR",
    "TEMP_SUFFIX",
    "CorruptFile",
    "Stored",
    "as_stored",
    "check_key",
    "data_path",
    "dump_meta",
    "in_store",
    "key_of",
    "own_meta",
    "publish",
    "read_footer_meta",
    "read_verified",
    "remove_if_same",
    "with_own_files",
    "write_temp",
    "writer_alive",
]
