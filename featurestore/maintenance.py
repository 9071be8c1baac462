"""Store maintenance that both the store and GC use: strays, integrity checks, and the manifest rebuilt from files.

The Parquet files are the truth: each carries its key, symbol, range, content hash and kind in its own metadata
(a pack: the same for each of its keys, in its index), so the manifest can always be restored from them
(``restore_rows``). The manifest calls that when it has to create
its file (first use, deleted, or moved aside because it was unreadable), under its exclusive lock, so two
processes that find the damage at once rebuild it exactly once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Set
from pathlib import Path

from featurestore import _bodies, _files, _packs
from featurestore._duckdb import duckdb
from featurestore._files import in_store
from featurestore.errors import StoreFileUnreadable
from featurestore.manifest import Entry, Manifest, Row, ns_to_utc, utc_now


@dataclasses.dataclass(frozen=True)
class IntegrityReport:
    """Result of ``check_integrity``: clean when no manifest row lacks a sound file."""

    checked: int
    missing: tuple[str, ...]
    corrupt: tuple[str, ...]
    orphans: tuple[Path, ...]
    temporaries: tuple[Path, ...]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


@dataclasses.dataclass(frozen=True)
class Strays:
    """Files under ``data/`` that no manifest row names and bodies (``bodies/``) whose content no row holds:
    orphans (complete files) and write temporaries."""

    orphans: list[Path]
    temporaries: list[Path]


def find_strays(root: Path, entries: Mapping[str, Entry]) -> Strays:
    """Files of the store's data directory that are temporaries, or that no entry names (a pack: none of its keys;
    a key's own file: its key is absent, or its row names a pack); and of its bodies' directory, temporaries and
    the bodies whose content hash no entry holds (``featurestore._bodies``)."""
    strays = Strays([], [])
    named: Set[Path] = {entry.path for entry in entries.values()}
    for path in (root / _files.DATA_DIR).glob("*/*"):
        if path.name.endswith(_files.TEMP_SUFFIX):
            strays.temporaries.append(path)
        elif _packs.is_pack(path) or _files.key_of(path) is not None:
            if path not in named:
                strays.orphans.append(path)
        else:
            strays.orphans.append(path)
    held = {entry.content_hash for entry in entries.values()}
    for path in _bodies.files(root):
        if path.name.endswith(_files.TEMP_SUFFIX):
            strays.temporaries.append(path)
        elif _bodies.hash_of(path) not in held:
            strays.orphans.append(path)
    # A directory made by hand where a file goes is no file to remove (GC's unlink was a traceback after its
    # commit, at every run); a read of its key says so in one line (StoreFileUnreadable). Asked of the few
    # strays only: a stat of every file would cost a large store's GC ~60,000 of them.
    strays.orphans[:] = [path for path in in_store(strays.orphans) if not path.is_dir()]
    strays.temporaries[:] = in_store(strays.temporaries)
    return strays


def check_integrity(manifest: Manifest, *, deep: bool = True) -> IntegrityReport:
    """Check that every manifest row has a sound file (content hash when ``deep``, else footer and size)."""
    missing: list[str] = []
    corrupt: list[str] = []
    with manifest.read() as con:
        entries = manifest.select(con)
        packs: dict[Path, list[Entry]] = {}
        for key, entry in entries.items():
            if entry.pack_offset is not None:
                packs.setdefault(entry.path, []).append(entry)
                continue
            try:
                if deep:
                    _files.read_verified(entry.path, key)
                else:
                    _files.read_footer_meta(entry.path, key)
                    if entry.path.stat().st_size != entry.file_size_bytes:
                        raise _files.CorruptFile(entry.path, "size differs from the manifest", None)
            except FileNotFoundError:
                missing.append(key)
            except _files.CorruptFile:
                corrupt.append(key)
        for pack, packed in packs.items():
            bad = check_pack(pack, packed, deep=deep)
            if bad is None:
                missing.extend(sorted(entry.key for entry in packed))
            else:
                corrupt.extend(bad)
        strays = find_strays(manifest.root, entries)
    return IntegrityReport(
        len(entries), tuple(missing), tuple(corrupt), tuple(strays.orphans), tuple(strays.temporaries)
    )


def check_pack(pack: Path, entries: list[Entry], *, deep: bool) -> list[str] | None:
    """The keys of ``entries`` (all in ``pack``) that the pack cannot serve soundly; None if it is missing.

    Deep: every key's rows are decoded and hashed, so one damaged row group costs only the keys in it. Quick:
    the footer and its index must parse, name every key, and the size must be what was published.
    """
    keys = [entry.key for entry in entries]
    try:
        if deep:
            return sorted(_packs.read_parts(pack, keys).corrupt)
        index, _rows = _packs.read_footer_index(pack)
        if pack.stat().st_size != entries[0].pack_bytes:
            return sorted(keys)
        return sorted(key for key in keys if key not in index)
    except FileNotFoundError:
        return None
    except _files.CorruptFile:
        return sorted(keys)


def rows_from_files(root: Path, previous: Mapping[str, Entry]) -> list[Row]:
    """A manifest row for every sound data file, from the file's own metadata (footer reads only).

    Files whose footer is unreadable or whose metadata names another key are left out (GC removes them as
    orphans); the access time of a key already in ``previous`` is kept so a rebuild does not reset expiry, and
    any other key counts as accessed now, so its retention starts at the rebuild.
    """
    rows: dict[str, Row] = {}

    def keep(row: Row) -> None:
        # A key found twice (a pack written by a put that a later put superseded, not yet collected): the newest.
        held = rows.get(row.entry.key)
        if held is None or held.entry.created_ts <= row.entry.created_ts:
            rows[row.entry.key] = row

    for path in sorted((root / _files.DATA_DIR).glob("*/*.parquet")):
        if _packs.is_pack(path):
            for row in _rows_of_pack(path, previous):
                keep(row)
            continue
        key = _files.key_of(path)
        if key is None:
            continue
        try:
            meta, count = _files.read_footer_meta(path)
            size = path.stat().st_size
        except (_files.CorruptFile, FileNotFoundError, StoreFileUnreadable):
            continue  # unreadable: a manifest rebuilt (healed) without its row, never stopped by it
        if meta.get("key") != key or "content_hash" not in meta:
            continue
        keep(_row_from_meta(path, meta, count, size, previous.get(key)))
    return [rows[key] for key in sorted(rows)]


def _rows_of_pack(path: Path, previous: Mapping[str, Entry]) -> list[Row]:
    """A row per key of a pack, from its index; each key's share of the pack's bytes is by rows, as published."""
    try:
        index, _total = _packs.read_footer_index(path)
        size = path.stat().st_size
    except (_files.CorruptFile, FileNotFoundError, StoreFileUnreadable):
        return []
    parts = sorted(index.values(), key=lambda p: p.offset)
    rows: list[Row] = []
    for part, share in zip(parts, _packs.shares(size, [p.rows for p in parts]), strict=True):
        row = _row_from_meta(path, part.meta, part.rows, share, previous.get(part.key))
        entry = dataclasses.replace(row.entry, pack_offset=part.offset, pack_bytes=size)
        rows.append(dataclasses.replace(row, entry=entry))
    return rows


def restore_rows(manifest: Manifest, con: duckdb.DuckDBPyConnection) -> int:
    """Replace every row of the manifest (inside the caller's exclusive transaction) by the files' own rows."""
    rows = rows_from_files(manifest.root, manifest.select(con))
    manifest.removing()  # a key whose file is gone or unreadable leaves; one found twice may change content
    con.execute("DELETE FROM entries")
    manifest.upsert(con, rows)
    return len(rows)


def rebuild(manifest: Manifest) -> int:
    """Recreate every manifest row from the files; returns the number of entries."""
    with manifest.write() as txn:
        return restore_rows(manifest, txn.con)


def _row_from_meta(path: Path, meta: dict[str, str], count: int, size: int, previous: Entry | None) -> Row:
    created = dt.datetime.fromisoformat(meta["created_ts"]) if meta.get("created_ts") else utc_now()
    start = int(meta["start_ns"]) if meta.get("start_ns") else None
    end = int(meta["end_ns"]) if meta.get("end_ns") else None
    entry = Entry(
        key=meta["key"],
        path=path,
        symbol=meta.get("symbol") or None,
        start_ts=ns_to_utc(start),
        end_ts=ns_to_utc(end),
        rows=count,
        file_size_bytes=size,
        content_hash=meta["content_hash"],
        hash_method=meta.get("hash_method", "xxh3"),
        created_ts=created,
        # Without a previous row (the manifest was lost or damaged) when the key was last read is unknown:
        # its creation time made the next GC expire every key older than the retention, in use or not.
        last_accessed_ts=previous.last_accessed_ts if previous else utc_now(),
    )
    return Row(entry, meta.get("entry_kind", "segment"), meta.get("meta"))


__all__ = [
    "IntegrityReport",
    "Strays",
    "check_integrity",
    "find_strays",
    "in_store",
    "rebuild",
    "restore_rows",
    "rows_from_files",
]
