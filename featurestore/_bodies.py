"""COPY bodies: a derived, optional cache artifact beside a stored table, never its truth.

A caller that loads a stored table into a database by binary COPY (``refresher``: a minute segment into a new
month partition) may keep the bytes it sent, the COPY body, so that the next load of the same content sends
them again instead of reading the Parquet file and encoding its rows: for backtesting's 12 months of minute
bars, 1.5 s less of the client's CPU a warm load (docs/architecture.md, "Where the load's CPU goes").

A body is named by the content hash of the table it encodes and by its ``layout``
(``bodies/<2>/<hash>.<layout>.body``), not by a key: one content, one body of each layout, whatever keys hold it.
The layout is in the name so that two checkouts sharing a store whose encoders differ (another pgpq version) each
keep their own body beside the other's instead of removing it as one of another layout. Its file is a header and the body compressed with LZ4 (a frame)::

    magic (8) | header length (4) | header JSON | xxh3-64 of the compressed payload (8) | payload

the header naming the content hash, the caller's ``layout`` (its target columns and types and its encoder's
version: a body of another layout is of no use to it), the rows and the raw length. A read checks all of it
before a byte is handed out: a body that is truncated, damaged (its checksum), of another content or layout, or
that does not decompress to its length, is treated as absent and removed (``remove_if_same``: a good one renamed
over it meanwhile stays), and the caller loads from the Parquet file as it would without it.

Written as the store's files are (a temporary beside it named as ``write_temp`` names one, fsynced, renamed over):
a reader sees no body or a whole one, a writer killed midway leaves a temporary GC removes, and two writers of
the same body at once both rename identical content. A body goes with the last entry of its content: the store's
deletions (``clear_cache``, an eviction, GC's) remove the bodies no entry holds any more, and GC collects any
other (``find_strays``: a body whose content no entry holds, past the grace period, as an orphan file).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from errno import ELOOP
from pathlib import Path

import pyarrow as pa
import xxhash

from featurestore import _files
from featurestore._duckdb import duckdb

BODIES_DIR = "bodies"
SUFFIX = ".body"
_MAGIC = b"FSBODY1\n"
_CODEC = (
    "lz4"  # an LZ4 frame: 0.045 s to decompress 131 MB of minute bars against 0.17 s for Zstandard level 1
)
_NAME = re.compile(r"[A-Za-z0-9]+:[0-9a-f]{8,64}")
_LAYOUT = re.compile(r"[A-Za-z0-9_-]{1,64}")


class CorruptBody(Exception):
    """A body that cannot be used: damaged, truncated, or of another content or layout (internal)."""


@dataclass(frozen=True)
class CopyBody:
    """A verified body: its rows and its raw (decompressed) bytes."""

    rows: int
    raw: memoryview


def body_path(root: Path, content_hash: str, layout: str) -> Path | None:
    """Where the body of ``content_hash`` in ``layout`` lives; None for a hash that names no body (not
    ``method:hex``) or a layout that cannot be part of a file name."""
    if not _NAME.fullmatch(content_hash) or not _LAYOUT.fullmatch(layout):
        return None
    name = content_hash.replace(":", "-")
    return Path(f"{root}{os.sep}{BODIES_DIR}{os.sep}{name[-2:]}{os.sep}{name}.{layout}{SUFFIX}")


def _of_every_layout(root: Path, content_hash: str) -> list[Path]:
    """The body files of ``content_hash``, whatever their layout."""
    if not _NAME.fullmatch(content_hash):
        return []
    name = content_hash.replace(":", "-")
    return [path for path in (root / BODIES_DIR / name[-2:]).glob(f"{name}.*{SUFFIX}") if hash_of(path)]


def hash_of(path: Path) -> str | None:
    """The content hash a body file is named by (of any layout), None for anything else (temporaries, strays)."""
    if path.name.startswith(".") or path.suffix != SUFFIX:
        return None
    stem, _, layout = path.name[: -len(SUFFIX)].rpartition(".")
    method, _, digest = stem.partition("-")
    content_hash = f"{method}:{digest}"
    return content_hash if _NAME.fullmatch(content_hash) and _LAYOUT.fullmatch(layout) else None


def encode(content_hash: str, layout: str, rows: int, raw: bytes | memoryview) -> bytes:
    """The file of a body: header, checksum and the LZ4 payload."""
    payload = pa.Codec(_CODEC).compress(raw, asbytes=True)
    header = json.dumps(
        {"content_hash": content_hash, "layout": layout, "rows": rows, "raw": len(raw)}
    ).encode()
    return b"".join(
        (_MAGIC, len(header).to_bytes(4, "little"), header, xxhash.xxh3_64_digest(payload), payload)
    )


def decode(data: bytes, content_hash: str, layout: str) -> CopyBody:
    """The body in ``data`` (a file's bytes), checked to be whole and of ``content_hash`` and ``layout``."""
    view = memoryview(data)
    if view[: len(_MAGIC)] != _MAGIC:
        raise CorruptBody("not a body (no magic)")
    at = len(_MAGIC) + 4
    size = int.from_bytes(view[len(_MAGIC) : at], "little")
    if at + size + 8 > len(view):
        raise CorruptBody("truncated header")
    try:
        header = json.loads(bytes(view[at : at + size]))
        rows, raw = int(header["rows"]), int(header["raw"])
        own, of = header["content_hash"], header["layout"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptBody(f"unreadable header: {exc}") from None
    if own != content_hash:
        raise CorruptBody(f"of content {own}, not {content_hash}")
    if of != layout:
        raise CorruptBody(f"layout {of!r}, not {layout!r}")
    at += size
    digest, payload = bytes(view[at : at + 8]), view[at + 8 :]
    if xxhash.xxh3_64_digest(payload) != digest:
        raise CorruptBody("checksum mismatch (damaged or truncated)")
    try:
        out = pa.Codec(_CODEC).decompress(payload, decompressed_size=raw)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptBody(f"does not decompress: {exc}") from None
    if out.size != raw:
        raise CorruptBody(f"decompressed to {out.size} bytes, not {raw}")
    return CopyBody(rows, memoryview(out))


def read(root: Path, hashes: Iterable[str], layout: str) -> dict[str, CopyBody]:
    """The sound bodies of ``hashes`` in ``layout``; an absent one is left out, an unusable one removed too.
    A body of another layout is another file, neither read nor removed."""
    found: dict[str, CopyBody] = {}
    for content_hash in dict.fromkeys(hashes):
        path = body_path(root, content_hash, layout)
        if path is None:
            continue
        try:
            with open(path, "rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                data = handle.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue  # optional: the caller reads the key's table (a body it may not read is not corrupt)
        except OSError as exc:  # nor is a link looping in its place (was an OSError traceback at every load)
            if exc.errno != ELOOP:
                raise
            continue
        try:
            found[content_hash] = decode(data, content_hash, layout)
        except CorruptBody:
            for each in _files.in_store([path]):
                _files.remove_if_same(each, inode)
    return found


def write(root: Path, items: Sequence[tuple[str, int, bytes | memoryview]], layout: str) -> int:
    """Publish the bodies of ``items`` (content hash, rows, raw bytes) in ``layout``: each written to a
    temporary beside its place, fsynced (many at once), renamed over; returns the bytes published. A content
    hash that names no body (or a layout no file name can hold) is skipped."""
    moves: list[tuple[Path, Path]] = []
    try:
        for content_hash, rows, raw in items:
            final = body_path(root, content_hash, layout)
            if final is None:
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            # Named as ``_files.write_temp`` names its temporaries, so GC knows a live writer's (``writer_alive``).
            temp = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_files.TEMP_SUFFIX}"
            moves.append((temp, final))
            temp.write_bytes(encode(content_hash, layout, rows, raw))
        _files.fsync_paths(temp for temp, _final in moves)
        written = sum(temp.stat().st_size for temp, _final in moves)
        # Its sizes are read after every rename: a body removed meanwhile (a clear, GC, another checkout's
        # refill) was published all the same.
        with contextlib.suppress(FileNotFoundError):
            _files.publish_many(moves)
        return written
    finally:
        for temp, _final in moves:
            temp.unlink(missing_ok=True)


def files(root: Path) -> list[Path]:
    """Every file under the bodies' directory (bodies, temporaries, strays)."""
    return list((root / BODIES_DIR).glob("*/*"))


def sizes(root: Path) -> tuple[int, int]:
    """The bodies stored (not counting temporaries) and their bytes."""
    count = total = 0
    for path in files(root):
        if hash_of(path) is not None:
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
            except OSError as exc:  # a link looping in its place: no body (`store stats` was a traceback)
                if exc.errno != ELOOP:
                    raise
                continue
            count += 1
    return count, total


def released(root: Path, con: duckdb.DuckDBPyConnection, hashes: Iterable[str]) -> list[Path]:
    """Inside a manifest write, after its deletions: the bodies (of every layout) of ``hashes`` that no entry
    holds any more, for the caller to remove after the commit."""
    wanted = sorted(set(hashes))
    if not wanted:
        return []
    kept = held(con, wanted)
    out: list[Path] = []
    for content_hash in wanted:
        if content_hash not in kept:
            out.extend(_of_every_layout(root, content_hash))
    return out


def held(con: duckdb.DuckDBPyConnection, hashes: Iterable[str]) -> set[str]:
    """Those of the content ``hashes`` some manifest entry holds (inside the caller's transaction)."""
    rows = con.execute(
        "SELECT DISTINCT content_hash FROM entries JOIN (SELECT unnest(?::VARCHAR[]) AS content_hash) w "
        "USING (content_hash)",
        [sorted(set(hashes))],
    ).fetchall()
    return {row[0] for row in rows}


__all__ = [
    "BODIES_DIR",
    "CopyBody",
    "CorruptBody",
    "body_path",
    "decode",
    "encode",
    "files",
    "hash_of",
    "held",
    "read",
    "released",
    "sizes",
    "write",
]
