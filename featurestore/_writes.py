"""Writing a batch of keys: each to a file of its own or, small tables of one schema, to a shared pack.

Everything is written to fsynced temporaries first (``write``); ``Written.publish`` then renames them into place
inside the caller's exclusive manifest transaction, which records their rows (``FeatureStore._store``), and
``Written.discard`` removes whatever was not published, on every path out.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa

from featurestore import _files, _packs
from featurestore.manifest import Entry, Row, ns_to_utc

# Threads writing a batch's own files.
WRITE_THREADS = 2


@dataclasses.dataclass(frozen=True)
class Incoming:
    """One key to write: its stored table, its own metadata (footer or pack index) and its manifest row."""

    table: pa.Table
    meta: dict[str, str]
    row: Row

    @property
    def key(self) -> str:
        return self.row.entry.key


@dataclasses.dataclass(frozen=True)
class PendingPack:
    """A pack written and fsynced but not yet published: its temporary, final path, parts and their rows."""

    temp: Path
    final: Path
    parts: list[_packs.Part]
    rows: dict[str, Row]


@dataclasses.dataclass
class Written:
    """The temporaries of a batch: files of their own (by key) and packs."""

    singles: list[tuple[Path, Row]] = dataclasses.field(default_factory=list)
    packs: list[PendingPack] = dataclasses.field(default_factory=list)

    def publish(self, root: Path) -> list[Row]:
        """Rename every temporary into place; the rows to record. Call inside the exclusive manifest transaction,
        so that no deleter can run between a file appearing and its row being recorded (a crash before COMMIT
        leaves only an orphan file)."""
        rows: list[Row] = []
        sizes = _files.publish_many([(temp, row.entry.path) for temp, row in self.singles])
        for (_temp, row), size in zip(self.singles, sizes, strict=True):
            rows.append(dataclasses.replace(row, entry=dataclasses.replace(row.entry, file_size_bytes=size)))
        for pack in self.packs:
            rows.extend(_publish_pack(root, pack))
        return rows

    def discard(self) -> None:
        """Remove the temporaries (those published are gone already)."""
        for temp in [temp for temp, _row in self.singles] + [pack.temp for pack in self.packs]:
            temp.unlink(missing_ok=True)


def describe(
    root: Path,
    key: str,
    table: pa.Table,
    symbol: str | None,
    meta: dict[str, Any],
    content: str,
    bounds: tuple[int, int] | None,
    *,
    hash_method: str,
    kind: str,
    entry_kind: str,
    now: dt.datetime,
) -> Incoming:
    """A key's own metadata (the footer of its file, or its part of a pack's index) and its manifest row;
    ``bounds`` is the table's ``keys.time_range`` (taken for a whole batch by ``keys.time_ranges``)."""
    start, end = bounds if bounds is not None else (None, None)
    file_meta = {
        "key": key,
        "symbol": symbol or "",
        "start_ns": "" if start is None else str(start),
        "end_ns": "" if end is None else str(end),
        "content_hash": content,
        "hash_method": hash_method,
        "kind": kind,
        "entry_kind": entry_kind,
        "created_ts": now.isoformat(),
        "meta": _files.dump_meta(meta),
    }
    entry = Entry(
        key, _files.data_path(root, key), symbol, ns_to_utc(start), ns_to_utc(end), table.num_rows, 0, content,
        hash_method, now, now,
    )  # fmt: skip
    return Incoming(table, file_meta, Row(entry, entry_kind, file_meta["meta"]))


def write(
    root: Path,
    incoming: list[Incoming],
    written: Written,
    *,
    compression_level: int,
    pack_max_rows: int,
    created: str,
) -> None:
    """Write every key to a fsynced temporary, collected in ``written`` as it goes (so a failure half-way
    leaves the caller the temporaries to discard)."""
    packed: set[str] = set()
    for group in _pack_groups(root, incoming, pack_max_rows):
        parts = [(item.key, item.table, item.meta) for item in group]
        temp, final, placed = _packs.write_temp(
            root, parts, compression_level=compression_level, created=created
        )
        written.packs.append(PendingPack(temp, final, placed, {item.key: item.row for item in group}))
        packed.update(item.key for item in group)
    singles = [item for item in incoming if item.key not in packed]
    # Parquet encoding and Zstandard release the GIL: a batch's files are written on a few threads, collected in
    # order, each one's temporary kept in ``written`` whatever happens to the others (so none is left behind).
    with ThreadPoolExecutor(max_workers=max(1, min(WRITE_THREADS, len(singles)))) as pool:
        futures = [pool.submit(_write_single, item, compression_level) for item in singles]
        failed: BaseException | None = None
        for item, future in zip(singles, futures, strict=True):
            try:
                written.singles.append((future.result(), item.row))
            except BaseException as exc:  # the first error is raised once every write has ended
                failed = failed or exc
    if failed is not None:
        raise failed
    # All at once, before anything is published (``_files.fsync_paths``).
    _files.fsync_paths([temp for temp, _row in written.singles])


def _write_single(item: Incoming, compression_level: int) -> Path:
    # Dictionaries for strings only, as in packs: a minute segment's prices are nearly all distinct, and 200 of
    # them wrote in 0.34 s and 21.5 MB without price dictionaries, 0.45-0.53 s and 26.2 MB with.
    return _files.write_temp(
        item.row.entry.path,
        item.table,
        item.meta,
        compression_level=compression_level,
        use_dictionary=_packs._dictionary_columns(item.table.schema),
        sync=False,
    )


def _pack_groups(root: Path, incoming: list[Incoming], pack_max_rows: int) -> list[list[Incoming]]:
    """Keys that ride together in packs: small tables of one schema, two or more of them.

    A key that has a file of its own (written before packs, or large) keeps it: its new content replaces that
    file atomically, where a pack could not (readers try the key's own file first).
    """
    own = _files.with_own_files(root, [item.key for item in incoming])
    groups: dict[bytes, list[Incoming]] = {}
    for item in incoming:
        if item.table.num_rows < pack_max_rows and item.key not in own:
            groups.setdefault(_packs.schema_group(item.table), []).append(item)
    return [group for group in groups.values() if len(group) > 1]


def _publish_pack(root: Path, pack: PendingPack) -> list[Row]:
    """Rename a pack into place; its keys' rows, each with its share of the pack's bytes (by rows, summing to
    the pack's size) so that stats and GC add up."""
    size = _files.publish(pack.temp, pack.final)
    rows: list[Row] = []
    for part, share in zip(pack.parts, _packs.shares(size, [p.rows for p in pack.parts]), strict=True):
        row = pack.rows[part.key]
        e = row.entry  # built field by field: dataclasses.replace twice a key was a tenth of a batch's put
        entry = Entry(
            e.key, pack.final, e.symbol, e.start_ts, e.end_ts, e.rows, share, e.content_hash, e.hash_method,
            e.created_ts, e.last_accessed_ts, part.offset, size,
        )  # fmt: skip
        rows.append(Row(entry, row.kind, row.meta))
    # Another process put one of these keys as a file of its own since we looked: that file would shadow the pack
    # for a single key's read. Removed before COMMIT: a crash in between costs a miss, never stale data.
    for key in _files.with_own_files(root, [part.key for part in pack.parts]):
        _files.data_path(root, key).unlink(missing_ok=True)
    return rows


__all__ = ["Incoming", "PendingPack", "Written", "describe", "write"]
