"""Writing a batch of keys: each to a file of its own or, small tables of one schema, to a shared pack.

Everything is written to fsynced temporaries first (``write``); ``Written.publish`` then renames them into place
inside the caller's exclusive manifest transaction, which records their rows (``FeatureStore._store``), and
``Written.discard`` removes whatever was not published, on every path out.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Callable, Set
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa

from featurestore import _files, _packs
from featurestore.fingerprint import schema_groups
from featurestore.manifest import Entry, Row, ns_to_utc

# Threads writing a batch's own files.
WRITE_THREADS = 2


@dataclasses.dataclass(frozen=True)
class Incoming:
    """One key to write: its stored table, its own metadata (footer or pack index) and what its manifest row
    holds but where it lands (a file of its own or a pack, known once the batch is cut: ``row``)."""

    key: str
    table: pa.Table
    meta: dict[str, str]
    symbol: str | None
    start_ts: dt.datetime | None
    end_ts: dt.datetime | None
    content_hash: str
    hash_method: str
    created_ts: dt.datetime
    entry_kind: str

    def row(self, path: Path, size: int, offset: int | None = None, pack_bytes: int | None = None) -> Row:
        """The manifest row of this key at ``path`` (``size``: its bytes, or its share of a pack's)."""
        entry = Entry(
            self.key, path, self.symbol, self.start_ts, self.end_ts, self.table.num_rows, size,
            self.content_hash, self.hash_method, self.created_ts, self.created_ts, offset, pack_bytes,
        )  # fmt: skip
        return Row(entry, self.entry_kind, self.meta["meta"])


@dataclasses.dataclass(frozen=True)
class PendingPack:
    """A pack written and fsynced but not yet published: its temporary, final path, parts and their keys."""

    temp: Path
    final: Path
    parts: list[_packs.Part]
    items: dict[str, Incoming]


@dataclasses.dataclass
class Written:
    """The temporaries of a batch: files of their own and packs."""

    singles: list[tuple[Path, Incoming]] = dataclasses.field(default_factory=list)
    packs: list[PendingPack] = dataclasses.field(default_factory=list)

    def publish(self, root: Path, *, unchanged: Set[str] = frozenset()) -> list[Row]:
        """Rename every temporary into place; the rows to record. Call inside the exclusive manifest transaction,
        so that no deleter can run between a file appearing and its row being recorded (a crash before COMMIT
        leaves only an orphan file).

        ``unchanged``: keys the manifest already records with this content; their files and rows stay as they
        are, so theirs here are not published (left to ``discard``), nor a pack that holds nothing else."""
        rows: list[Row] = []
        singles = [(temp, _files.data_path(root, item.key), item) for temp, item in self.singles]
        singles = [single for single in singles if single[2].key not in unchanged]
        sizes = _files.publish_many([(temp, final) for temp, final, _item in singles])
        for (_temp, final, item), size in zip(singles, sizes, strict=True):
            rows.append(item.row(final, size))
        for pack in self.packs:
            if any(part.key not in unchanged for part in pack.parts):
                rows.extend(_publish_pack(root, pack, unchanged))
        return rows

    def discard(self) -> None:
        """Remove the temporaries (those published are gone already)."""
        for temp in [temp for temp, _item in self.singles] + [pack.temp for pack in self.packs]:
            temp.unlink(missing_ok=True)


def describe(
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
    times: Callable[[int | None], dt.datetime | None] = ns_to_utc,
) -> Incoming:
    """A key's own metadata (the footer of its file, or its part of a pack's index) and its row's content;
    ``bounds`` is the table's ``keys.time_range`` (taken for a whole batch by ``keys.time_ranges``), ``times``
    turns its nanoseconds into datetimes (a batch passes a memo: its months repeat across symbols)."""
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
        "created_ts": _isoformat(now),
        "meta": _files.dump_meta(meta),
    }
    return Incoming(
        key, table, file_meta, symbol, times(start), times(end), content, hash_method, now, entry_kind
    )


@functools.lru_cache(maxsize=4)
def _isoformat(moment: dt.datetime) -> str:
    # A batch shares one ``now``: formatted once, not once per key (60,000 times in a production-scale refresh).
    return moment.isoformat()


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
        written.packs.append(PendingPack(temp, final, placed, {item.key: item for item in group}))
        packed.update(item.key for item in group)
    singles = [item for item in incoming if item.key not in packed]
    # Parquet encoding and Zstandard release the GIL: a batch's files are written on a few threads, collected in
    # order, each one's temporary kept in ``written`` whatever happens to the others (so none is left behind).
    with ThreadPoolExecutor(max_workers=max(1, min(WRITE_THREADS, len(singles)))) as pool:
        futures = [pool.submit(_write_single, root, item, compression_level) for item in singles]
        failed: BaseException | None = None
        for item, future in zip(singles, futures, strict=True):
            try:
                written.singles.append((future.result(), item))
            except BaseException as exc:  # the first error is raised once every write has ended
                failed = failed or exc
    if failed is not None:
        raise failed
    # All at once, before anything is published (``_files.fsync_paths``).
    _files.fsync_paths([temp for temp, _item in written.singles])


def _write_single(root: Path, item: Incoming, compression_level: int) -> Path:
    # Dictionaries for strings only, as in packs: a minute segment's prices are nearly all distinct, and 200 of
    # them wrote in 0.34 s and 21.5 MB without price dictionaries, 0.45-0.53 s and 26.2 MB with. Integers and
    # times delta-encoded, as in packs: 50 minute segments 5.26 MB -> 3.87 MB and 104 -> 83 ms (best of 5).
    return _files.write_temp(
        _files.data_path(root, item.key),
        item.table,
        item.meta,
        compression_level=compression_level,
        use_dictionary=_packs._dictionary_columns(item.table.schema),
        column_encoding=_packs._delta_columns(item.table.schema),
        sync=False,
    )


def _pack_groups(root: Path, incoming: list[Incoming], pack_max_rows: int) -> list[list[Incoming]]:
    """Keys that ride together in packs: small tables of one schema, two or more of them.

    A key that has a file of its own (written before packs, or large) keeps it: its new content replaces that
    file atomically, where a pack could not (readers try the key's own file first).
    """
    own = _files.with_own_files(root, [item.key for item in incoming])
    small = [item for item in incoming if item.table.num_rows < pack_max_rows and item.key not in own]
    # Schema metadata included: a pack is one table, and keeps one schema's metadata (pandas' index bookkeeping).
    groups = schema_groups([item.table for item in small], check_metadata=True)
    return [[small[i] for i in members] for _schema, members in groups if len(members) > 1]


def _publish_pack(root: Path, pack: PendingPack, unchanged: Set[str]) -> list[Row]:
    """Rename a pack into place; its keys' rows (but ``unchanged``'s), each with its share of the pack's bytes
    (by rows, summing to the pack's size) so that stats and GC add up."""
    size = _files.publish(pack.temp, pack.final)
    rows: list[Row] = []
    for part, share in zip(pack.parts, _packs.shares(size, [p.rows for p in pack.parts]), strict=True):
        if part.key not in unchanged:
            rows.append(pack.items[part.key].row(pack.final, share, part.offset, size))
    # Another process put one of these keys as a file of its own since we looked: that file would shadow the pack
    # for a single key's read. Removed before COMMIT: a crash in between costs a miss, never stale data.
    for key in _files.with_own_files(root, [row.entry.key for row in rows]):
        _files.data_path(root, key).unlink(missing_ok=True)
    return rows


__all__ = ["Incoming", "PendingPack", "Written", "describe", "write"]
