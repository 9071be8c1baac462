"""Writing a batch of keys: each to a file of its own or, small tables of one schema, to a shared pack.

Everything is written to fsynced temporaries first (``write``); ``Written.publish`` then renames them into place
inside the caller's exclusive manifest transaction, which records their rows (``FeatureStore._store``), and
``Written.discard`` removes whatever was not published, on every path out.

A batch travels field by field (``Batch``: a list per field), not as an object per key: a put of 2,000 daily
segments built a metadata dict, an ``Incoming``, a ``Part``, an ``Entry`` and a ``Row`` per key, and their
construction and the garbage collections they set off were about a third of ``put_many``'s CPU. A pack's index
and the manifest's rows are made from the lists; only a key with a file of its own gets its footer's dict.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from featurestore import _files, _packs
from featurestore.fingerprint import Concatenated, schema_groups

# Threads writing a batch's own files.
WRITE_THREADS = 2


@dataclasses.dataclass(frozen=True)
class Batch:
    """The keys of one put (distinct), one list per field, and what they share.

    ``metas`` are the callers' metadata as stored (``_files.dump_meta``), ``contents`` the content hashes,
    ``bounds`` each table's ``keys.time_range``."""

    keys: list[str]
    tables: list[pa.Table]
    symbols: list[str | None]
    metas: list[str]
    contents: list[str]
    bounds: list[tuple[int, int] | None]
    hash_method: str
    kind: str
    entry_kind: str
    now: dt.datetime

    def footer(self, i: int) -> dict[str, str]:
        """Key ``i``'s own metadata: the footer of its file, the fields a pack's index holds by column."""
        own = {name: values[0] for name, values in self.index_columns([i]).items()}
        return {"key": self.keys[i], **own, "created_ts": _isoformat(self.now)}

    def index_columns(self, members: Sequence[int]) -> dict[str, list[str]]:
        """The per-key fields of a pack's index (``_packs``' fields) for keys ``members``, column by column."""
        n = len(members)
        bounds = [self.bounds[i] for i in members]
        return {
            "symbol": [self.symbols[i] or "" for i in members],
            "start_ns": ["" if b is None else str(b[0]) for b in bounds],
            "end_ns": ["" if b is None else str(b[1]) for b in bounds],
            "content_hash": [self.contents[i] for i in members],
            "hash_method": [self.hash_method] * n,
            "kind": [self.kind] * n,
            "entry_kind": [self.entry_kind] * n,
            "meta": [self.metas[i] for i in members],
        }


@dataclasses.dataclass
class Placed:
    """Where published keys landed, one list per field: the key's position in its ``Batch``, its file, its
    bytes (or its share of a pack's), its first row in a pack and that pack's size (None for a file of its own)."""

    index: list[int] = dataclasses.field(default_factory=list)
    path: list[Path] = dataclasses.field(default_factory=list)
    size: list[int] = dataclasses.field(default_factory=list)
    offset: list[int | None] = dataclasses.field(default_factory=list)
    pack_bytes: list[int | None] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class PendingPack:
    """A pack written and fsynced but not yet published: its temporary, final path, its keys (positions in the
    batch, in the pack's order) and their first rows in it."""

    temp: Path
    final: Path
    members: list[int]
    offsets: list[int]


@dataclasses.dataclass
class Written:
    """The temporaries of a batch: files of their own (temporary, position in the batch) and packs."""

    singles: list[tuple[Path, int]] = dataclasses.field(default_factory=list)
    packs: list[PendingPack] = dataclasses.field(default_factory=list)

    def publish(self, root: Path, batch: Batch, *, unchanged: Set[str] = frozenset()) -> Placed:
        """Rename every temporary into place; where each key landed. Call inside the exclusive manifest
        transaction, so that no deleter can run between a file appearing and its row being recorded (a crash
        before COMMIT leaves only an orphan file).

        ``unchanged``: keys the manifest already records with this content; their files and rows stay as they
        are, so theirs here are not published (left to ``discard``), nor a pack that holds nothing else."""
        placed = Placed()
        keys = batch.keys
        singles = [
            (temp, _files.data_path(root, keys[i]), i) for temp, i in self.singles if keys[i] not in unchanged
        ]
        sizes = _files.publish_many([(temp, final) for temp, final, _i in singles])
        for (_temp, final, i), size in zip(singles, sizes, strict=True):
            _place(placed, [i], [final], [size], [None], [None])
        for pack in self.packs:
            if any(keys[i] not in unchanged for i in pack.members):
                _publish_pack(root, pack, batch, unchanged, placed)
        return placed

    def discard(self) -> None:
        """Remove the temporaries (those published are gone already)."""
        for temp in [temp for temp, _i in self.singles] + [pack.temp for pack in self.packs]:
            temp.unlink(missing_ok=True)


def _place(
    placed: Placed,
    index: list[int],
    path: list[Path],
    size: list[int],
    offset: Sequence[int | None],
    pack_bytes: list[int | None],
) -> None:
    placed.index.extend(index)
    placed.path.extend(path)
    placed.size.extend(size)
    placed.offset.extend(offset)
    placed.pack_bytes.extend(pack_bytes)


@functools.lru_cache(maxsize=4)
def _isoformat(moment: dt.datetime) -> str:
    # A batch shares one ``now``: formatted once, not once per key (60,000 times in a production-scale refresh).
    return moment.isoformat()


def write(
    root: Path,
    batch: Batch,
    written: Written,
    *,
    compression_level: int,
    pack_max_rows: int,
    concatenated: Concatenated | None = None,
) -> None:
    """Write every key to a fsynced temporary, collected in ``written`` as it goes (so a failure half-way
    leaves the caller the temporaries to discard). ``concatenated``: as ``_packs.write_temp``'s."""
    packed: set[int] = set()
    created = _isoformat(batch.now)
    for members in _pack_groups(root, batch, pack_max_rows):
        temp, final, offsets = _packs.write_temp(
            root,
            [batch.keys[i] for i in members],
            [batch.tables[i] for i in members],
            batch.index_columns(members),
            compression_level=compression_level,
            created=created,
            concatenated=concatenated,
        )
        written.packs.append(PendingPack(temp, final, members, offsets))
        packed.update(members)
    singles = [i for i in range(len(batch.keys)) if i not in packed]
    # Parquet encoding and Zstandard release the GIL: a batch's files are written on a few threads, collected in
    # order, each one's temporary kept in ``written`` whatever happens to the others (so none is left behind).
    with ThreadPoolExecutor(max_workers=max(1, min(WRITE_THREADS, len(singles)))) as pool:
        futures = [pool.submit(_write_single, root, batch, i, compression_level) for i in singles]
        failed: BaseException | None = None
        for i, future in zip(singles, futures, strict=True):
            try:
                written.singles.append((future.result(), i))
            except BaseException as exc:  # the first error is raised once every write has ended
                failed = failed or exc
    if failed is not None:
        raise failed
    # All at once, before anything is published (``_files.fsync_paths``).
    _files.fsync_paths([temp for temp, _i in written.singles])


def _write_single(root: Path, batch: Batch, i: int, compression_level: int) -> Path:
    # Dictionaries for strings only, as in packs: a minute segment's prices are nearly all distinct, and 200 of
    # them wrote in 0.34 s and 21.5 MB without price dictionaries, 0.45-0.53 s and 26.2 MB with. Integers and
    # times delta-encoded, as in packs: 50 minute segments 5.26 MB -> 3.87 MB and 104 -> 83 ms (best of 5).
    table = batch.tables[i]
    return _files.write_temp(
        _files.data_path(root, batch.keys[i]),
        table,
        batch.footer(i),
        compression_level=compression_level,
        use_dictionary=_packs._dictionary_columns(table.schema),
        column_encoding=_packs._delta_columns(table.schema),
        sync=False,
    )


def _pack_groups(root: Path, batch: Batch, pack_max_rows: int) -> list[list[int]]:
    """Keys (positions in the batch) that ride together in packs: small tables of one schema, two or more.

    A key that has a file of its own (written before packs, or large) keeps it: its new content replaces that
    file atomically, where a pack could not (readers try the key's own file first).
    """
    own = _files.with_own_files(root, batch.keys)
    tables = batch.tables
    small = [i for i, key in enumerate(batch.keys) if tables[i].num_rows < pack_max_rows and key not in own]
    # Schema metadata included: a pack is one table, and keeps one schema's metadata (pandas' index bookkeeping).
    groups = schema_groups([tables[i] for i in small], check_metadata=True)
    return [[small[j] for j in members] for _schema, members in groups if len(members) > 1]


def _publish_pack(root: Path, pack: PendingPack, batch: Batch, unchanged: Set[str], placed: Placed) -> None:
    """Rename a pack into place; place its keys (but ``unchanged``'s), each with its share of the pack's bytes
    (by rows, summing to the pack's size) so that stats and GC add up."""
    size = _files.publish(pack.temp, pack.final)
    rows = [batch.tables[i].num_rows for i in pack.members]
    shares = _packs.shares(size, rows)
    keep = [j for j, i in enumerate(pack.members) if batch.keys[i] not in unchanged]
    members = [pack.members[j] for j in keep]
    n = len(members)
    _place(placed, members, [pack.final] * n, [shares[j] for j in keep], [pack.offsets[j] for j in keep],
           [size] * n)  # fmt: skip
    # Another process put one of these keys as a file of its own since we looked: that file would shadow the pack
    # for a single key's read. Removed before COMMIT: a crash in between costs a miss, never stale data.
    for key in _files.with_own_files(root, [batch.keys[i] for i in members]):
        _files.data_path(root, key).unlink(missing_ok=True)


__all__ = ["Batch", "PendingPack", "Placed", "Written", "write"]
