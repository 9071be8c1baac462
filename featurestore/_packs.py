"""Packs: many small tables of one schema in ONE Zstandard Parquet file, written and fsynced once.

A month of daily bars is about 21 rows. Stored one file per key, each file carried ~1.5 kB of Parquet footer and
page headers for ~400 bytes of data, and one fsync: 60,000 files and 485 MB for 1,000 symbols x 60 months. A pack
concatenates a batch's small tables (same schema, schema metadata included) into one table, cut into row groups
of ``ROW_GROUP_ROWS``; measured on 200 daily segments: 61 kB and 35 ms as one pack against 578 kB and 1.2 s as
single files, and 428 kB as one row group per segment (the per-row-group footer entries dominate), so keys share
row groups. Reading a key reads the row groups that hold its rows and slices them.

The pack's footer carries its index (``featurestore.pack``: each key's row count, content hash, symbol, range,
kind, meta; JSON, Zstandard-compressed, base64), so the manifest can be rebuilt from the files alone and every read
verifies a key's slice against the hash the pack itself recorded. Pack files are named by a random id, never
replaced: a put of a key already in a pack writes a new pack and moves the key's row.

Layout ``pack-2`` writes the index once, as Parquet footer key-value metadata only. ``pack-1`` put it in the Arrow
schema metadata, which pyarrow stores twice (as its own entry and again inside the base64 ``ARROW:schema``): 340 of
the 1,150 kB of a pack of 2,000 daily segments was footer. Both keep the index in the footer's key-value metadata,
so both are read the same way; ``pack-1`` also records each key's offset, which ``pack-2`` derives from the counts
(the keys' rows are contiguous, in index order). Only string-like columns are dictionary-encoded: prices and
volumes are mostly distinct across a pack's symbols and months, and their dictionary cost more than it saved
(2,000 daily segments: 811 kB of data pages with dictionaries, 643 kB without, and faster to write and read).
Integer, date and timestamp columns are delta-encoded (volumes drift, dates step): 631 kB -> 614 kB, at no cost.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from featurestore import _files
from featurestore.fingerprint import Concatenated, HashMethod, fingerprint_table

PACK_DIR = "packs"
PACK_FORMAT = "pack-2"
_INDEX_KEY = "pack"
_INDEX_SIZE_KEY = "pack_index_bytes"
_FORMAT_KEY = "format"
# Tables of fewer rows than this ride in packs; larger ones (a month of minute bars is ~8,200 rows) stay single
# files: packing 50 of them halved their size but a single key's read grew from ~3 ms to ~60 ms (a whole shared
# row group decoded for one key), and their files were never the problem (one fsync per ~150 kB).
PACK_MAX_ROWS = 4096
ROW_GROUP_ROWS = 64 * 1024
# The index is mostly hex digests (key, content hash: ~48 bytes of entropy a key), which Zstandard codes near that
# floor at any level; level 1 came out smaller than 3 (2,000 daily segments: 102 against 109 kB) and faster.
_INDEX_CODEC = pa.Codec("zstd", compression_level=1)
# Per-key fields of the index, besides ``key`` and ``rows``.
_FIELDS = ("content_hash", "hash_method", "symbol", "start_ns", "end_ns", "kind", "entry_kind", "meta")


@dataclass(frozen=True)
class Part:
    """One key's place in a pack and its own metadata (the same fields a single file's footer carries)."""

    key: str
    offset: int
    rows: int
    meta: dict[str, str]


def pack_dir(root: Path) -> Path:
    return root / _files.DATA_DIR / PACK_DIR


def is_pack(path: Path) -> bool:
    return path.parent.name == PACK_DIR


def write_temp(
    root: Path,
    keys: list[str],
    tables: list[pa.Table],
    fields: Mapping[str, list[str]],
    *,
    compression_level: int,
    created: str,
    concatenated: Concatenated | None = None,
) -> tuple[Path, Path, list[int]]:
    """Write ``tables`` (of one schema) as a fsynced temporary pack, ``keys[i]`` holding ``tables[i]``, with the
    index ``fields`` (each of ``_FIELDS``, one value per key: ``_writes.Batch.index_columns``).

    Returns (temporary, final path, each key's first row); the caller publishes it with ``_files.publish``
    inside its manifest transaction, as for a single file. ``concatenated``: the batch's (``fingerprint_many``
    made it when the pack's tables are the batch's).
    """
    rows = [table.num_rows for table in tables]
    offsets = [*accumulate(rows, initial=0)][:-1]
    contents = fields["content_hash"]
    final = pack_dir(root) / f"{uuid.uuid4().hex}.parquet"
    # One chunk per column: the row groups' checksums then hash each column in one call.
    table = (concatenated or Concatenated())(tables)
    # Parquet cuts the table into row groups of exactly ROW_GROUP_ROWS (the last one shorter).
    starts = [*range(0, table.num_rows, ROW_GROUP_ROWS), table.num_rows]
    groups = [
        _group_digest(
            table.slice(starts[g], starts[g + 1] - starts[g]),
            keys,
            offsets,
            rows,
            contents,
            starts[g],
            starts[g + 1],
        )
        for g in range(len(starts) - 1)
    ]
    temp = _files.write_temp(
        final,
        table,
        {},
        compression_level=compression_level,
        row_group_size=ROW_GROUP_ROWS,
        footer_only=_encode_index(keys, rows, fields, created, groups),
        use_dictionary=_dictionary_columns(table.schema),
        column_encoding=_delta_columns(table.schema),
    )
    return temp, final, offsets


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth a Parquet dictionary: strings and binaries (a symbol per row), and Arrow dictionaries; the
    others are plain or delta-encoded (see the module docstring)."""
    kinds = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    return [f.name for f in schema if pa.types.is_dictionary(f.type) or any(k(f.type) for k in kinds)]


def _delta_columns(schema: pa.Schema) -> dict[str, str]:
    """Integers, dates and timestamps, delta-encoded: volumes drift, dates and times step."""
    kinds = (pa.types.is_integer, pa.types.is_date, pa.types.is_timestamp)
    return {f.name: "DELTA_BINARY_PACKED" for f in schema if any(k(f.type) for k in kinds)}


def shares(size: int, rows: list[int]) -> list[int]:
    """Each part's share of a pack's ``size`` bytes, by rows, summing exactly to ``size`` (stats and GC add up)."""
    total = sum(rows)
    out: list[int] = []
    before = covered = 0
    for n, count in enumerate(rows, start=1):
        covered += count
        upto = size * covered // total if total else size * n // len(rows)
        out.append(upto - before)
        before = upto
    return out


def _group_digest(
    table: pa.Table,
    keys: Sequence[str],
    offsets: Sequence[int],
    rows: Sequence[int],
    contents: Sequence[str],
    start: int,
    end: int,
) -> str:
    """The checksum of one row group: its whole content and the index entries of the keys it holds (key, rows,
    offset, content hash), so that one hash of the group vouches for every slice the index cuts from it.

    The entries are fed as one string (the same bytes, so the same digest, as an update per entry)."""
    digest = xxhash.xxh3_128(fingerprint_table(table).encode())
    entries = "".join(
        f"\n{key}\t{offset}\t{count}\t{content}"
        for key, offset, count, content in zip(keys, offsets, rows, contents, strict=True)
        if count and offset < end and offset + count > start
    )
    digest.update(entries.encode())
    return "xxh3:" + digest.hexdigest()


def _encode_index(
    keys: list[str], rows: list[int], fields: Mapping[str, list[str]], created: str, groups: list[str]
) -> dict[str, str]:
    """The footer entries of a pack (``_files.write_temp`` prefixes them with ``featurestore.``)."""
    index: dict[str, Any] = {
        "format": PACK_FORMAT,
        "created_ts": created,
        "key": keys,
        "rows": rows,
        "group_hash": groups,
    }
    for name in _FIELDS:
        index[name] = fields[name]
    raw = json.dumps(index, separators=(",", ":")).encode()
    packed = _INDEX_CODEC.compress(raw, asbytes=True)
    return {
        _INDEX_KEY: base64.b64encode(packed).decode(),
        _INDEX_SIZE_KEY: str(len(raw)),
        _FORMAT_KEY: PACK_FORMAT,
    }


def read_index(footer: Mapping[bytes, bytes] | None) -> dict[str, Part]:
    """The parts a pack's footer key-value metadata records, by key; ValueError if it holds no sound index.

    ``footer`` is ``FileMetaData.metadata``, which holds the index in both layouts (``pack-1`` put it in the Arrow
    schema, which pyarrow also writes there), never the Arrow schema's metadata (without it in ``pack-2``).
    """
    return _parse_index(footer)[0]


def _parse_index(footer: Mapping[bytes, bytes] | None) -> tuple[dict[str, Part], list[str]]:
    """``read_index``, and the checksum of each row group (none in packs written before them)."""
    metadata = _files.own_meta(footer)
    try:
        packed = base64.b64decode(metadata[_INDEX_KEY], validate=True)
        size = int(metadata[_INDEX_SIZE_KEY])
        index = json.loads(bytes(pa.decompress(packed, size, codec="zstd", asbytes=True)))
        created = str(index["created_ts"])
        rows = [int(n) for n in index["rows"]]
        # pack-1 recorded the offsets; they are the running sum of the counts (rows contiguous, in index order)
        offsets = [int(n) for n in index["offset"]] if "offset" in index else [*accumulate(rows, initial=0)]
        parts: dict[str, Part] = {}
        for i, key in enumerate(index["key"]):
            meta = {name: str(index[name][i]) for name in _FIELDS}
            meta["created_ts"] = created
            meta["key"] = key
            parts[key] = Part(key, offsets[i], rows[i], meta)
        groups = [str(digest) for digest in index.get("group_hash", [])]
    except (KeyError, IndexError, TypeError, ValueError, pa.ArrowException) as exc:
        raise ValueError(f"no sound pack index ({type(exc).__name__}: {exc})") from None
    return parts, groups


def read_footer_index(path: Path) -> tuple[dict[str, Part], int]:
    """The index and total rows of a pack from its footer alone; CorruptFile when it cannot be read."""
    with _files.open_stored(path) as handle:
        try:
            metadata = pq.read_metadata(handle)
            return read_index(metadata.metadata), metadata.num_rows
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _files.CorruptFile(path, f"unreadable pack footer: {exc}", None) from None


@dataclass(frozen=True)
class PackRead:
    """What reading some keys of one pack gave: verified tables, keys found corrupt, the pack's inode."""

    found: dict[str, _files.Stored]
    corrupt: dict[str, str]
    inode: int


def read_parts(path: Path, keys: list[str]) -> PackRead:
    """Read and verify ``keys`` from the pack at ``path``, decoding only the row groups that hold them.

    FileNotFoundError if the pack is gone. A row group whose content and index entries match its recorded
    checksum vouches for every key it holds: one hash per group, not one per key (2,000 daily segments: one
    fingerprint of 42,000 rows instead of 2,000 of 21). A group without a checksum (an older pack) or one that
    does not match has each of its keys verified against its own content hash, so damage still costs only the
    keys it touches. A key the pack does not index, whose row groups do not decode, or whose slice does not
    match its recorded hash is reported in ``corrupt`` (with the reason); the others of the same pack are served.
    """
    with _files.open_stored(path) as handle:
        status = os.fstat(handle.fileno())
        try:
            reader = pq.ParquetFile(handle)
            parts, checksums = _parse_index(reader.metadata.metadata)
        except (pa.ArrowException, OSError, ValueError) as exc:
            return PackRead({}, dict.fromkeys(keys, f"unreadable pack: {exc}"), status.st_ino)
        indexed = list(parts.values())
        entries = (
            [p.key for p in indexed],
            [p.offset for p in indexed],
            [p.rows for p in indexed],
            [p.meta.get("content_hash", "") for p in indexed],
        )
        starts = [0]
        for i in range(reader.metadata.num_row_groups):
            starts.append(starts[-1] + reader.metadata.row_group(i).num_rows)
        groups: dict[int, pa.Table | None] = {}
        sound: dict[int, bool] = {}
        found: dict[str, _files.Stored] = {}
        corrupt: dict[str, str] = {}
        for key in keys:
            part = parts.get(key)
            if part is None:
                corrupt[key] = "not in the pack's index"
                continue
            wanted = _groups_of(starts, part)
            for group in wanted:
                if group not in groups:
                    table = groups[group] = _read_group(reader, group)
                    sound[group] = (
                        table is not None
                        and group < len(checksums)
                        and checksums[group]
                        == _group_digest(table, *entries, starts[group], starts[group + 1])
                    )
            tables = [table for g in wanted if (table := groups[g]) is not None]
            if len(tables) < len(wanted):
                corrupt[key] = "a row group does not decode"
                continue
            table = _slice(reader, tables, starts[wanted[0]] if wanted else 0, part)
            if not (wanted and all(sound[g] for g in wanted)):
                method: HashMethod = "footer" if part.meta.get("hash_method") == "footer" else "xxh3"
                actual = fingerprint_table(table, method)
                if actual != part.meta.get("content_hash"):
                    corrupt[key] = f"content hash {actual} != recorded {part.meta.get('content_hash')}"
                    continue
            found[key] = _files.Stored(table, part.meta, status.st_ino, status.st_size)
    return PackRead(found, corrupt, status.st_ino)


def _groups_of(starts: list[int], part: Part) -> list[int]:
    end = part.offset + part.rows
    return [g for g in range(len(starts) - 1) if starts[g] < end and starts[g + 1] > part.offset]


def _read_group(reader: pq.ParquetFile, group: int) -> pa.Table | None:
    """A row group without the store's metadata (stripped once here, not from each key's slice)."""
    try:
        return _files.strip_meta(reader.read_row_group(group))
    except (pa.ArrowException, OSError, ValueError):
        return None


def _slice(reader: pq.ParquetFile, tables: list[pa.Table], first_row: int, part: Part) -> pa.Table:
    if not tables:  # a key of no rows has no row group
        return _files.strip_meta(reader.schema_arrow.empty_table())
    whole = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    return whole.slice(part.offset - first_row, part.rows)


__all__ = [
    "PACK_DIR",
    "PACK_FORMAT",
    "PACK_MAX_ROWS",
    "ROW_GROUP_ROWS",
    "PackRead",
    "Part",
    "is_pack",
    "pack_dir",
    "read_footer_index",
    "read_index",
    "read_parts",
    "shares",
    "write_temp",
]
