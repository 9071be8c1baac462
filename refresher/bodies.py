"""COPY bodies of minute segments: the bytes a new month's COPY FREEZE sent, kept in the store to send again.

A warm load into a new database (backtesting from a filled store, issue 13's warm row) spent most of its client
CPU reading each minute segment's Parquet file, checking its content hash and its rows, and encoding the rows
again with pgpq into the very bytes the previous load sent. The store keeps those bytes beside the segment
(``featurestore._bodies``: named by the segment's content hash, in LZ4, verified on read) and the loader sends
them as they are. Parquet stays the truth: a body is a derived cache, made only from rows that passed the
loader's checks and went into a committed month, and any doubt about it (absent, damaged, another ``layout()``)
means the Parquet path, as before.

Where: only whole minute segments filling a new month partition (``refresher.load``, the batch's one UTC month
made by ``refresher.partitions``): every row of the body goes into that partition, so the month split needs no
rows. Everything else (daily bars, features, a daily refresh's appends, back-fills into months that exist) reads
Arrow tables as before. The loader's checks of those rows come from what the store knows of the segment: the
manifest row's symbol, its first and last instant (inside the segment's exchange month, one UTC month) and its
row count (the ledger's, and checked against the rows the COPY reports).

Made off the refresh (``make_bodies``), by the pool's detached refill after its clones, at idle CPU and I/O
priority: a refresh notes the minute segments it loaded that have none (``refresher.body_keys``). Made on the
cold load itself (03dedba: each segment's rows encoded a second time on their own, compressed and fsynced beside
the Parquet files) they cost the backtesting refresh 1.7 s of wall time and 2.5 s of client CPU (8bb6c0c). Each
body is the segment's verified Parquet rows conformed and encoded as the loader conforms and encodes them (the
concatenation of the segments' bodies is the month's COPY body), named by the content hash of those rows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from pgpq import ArrowToPostgresBinaryEncoder

from featurestore.errors import FeatureStoreError
from featurestore.fingerprint import fingerprint_table
from refresher._installed import installed_version
from refresher.body_keys import Wanted
from refresher.errors import RefresherError
from refresher.schema import SCHEMA_OF
from refresher.segments import Segment

if TYPE_CHECKING:
    from featurestore import CopyBody, Entry, FeatureStore

# Binary COPY's header (signature, flags, header extension length) and trailer around the bodies.
HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
TRAILER = b"\xff\xff"
# The one table bodies are made for, and its time column.
TABLE = "ohlcv_1min"
# Bumped when what a body holds changes without the schema or pgpq's version changing.
_FORMAT = 1
# Microseconds from the Unix epoch to PostgreSQL's (2000-01-01), binary COPY's zero for a timestamptz.
_PG_EPOCH_US = 946_684_800 * 10**6
# Bodies published together (one fsync round): a refill killed midway leaves at most this many temporaries.
_PUBLISHED = 8


@functools.cache
def layout() -> str:
    """What a body's bytes depend on besides its rows: the table's columns and types, the encoder and its version.
    A body of another layout is not used (and removed): the encoder or the schema changed since it was made."""
    schema = SCHEMA_OF["1m"]
    spelled = f"{TABLE}|{schema}|pgpq {installed_version('pgpq')}|{_FORMAT}"
    return hashlib.sha256(spelled.encode()).hexdigest()[:16]


def encode(table: pa.Table) -> bytes:
    """The COPY body (no header, no trailer) of a conformed minute table: what pgpq sends for its rows."""
    encoder = ArrowToPostgresBinaryEncoder(table.schema)
    encoder.write_header()
    parts = [encoder.write_batch(batch) for batch in table.to_batches()]
    tail = encoder.finish()
    parts.append(tail[: len(tail) - len(TRAILER)])
    return parts[0] if len(parts) == 2 and not parts[1] else b"".join(parts)


def decode(raw: bytes | memoryview, rows: int) -> pa.Table | None:
    """The minute table a body of ``rows`` rows encodes (``encode``'s inverse), None if it is not one: every row
    of a segment holds one symbol, so every row has one length, and the fields are read as big-endian columns."""
    data = np.frombuffer(raw, dtype=np.uint8)
    if rows <= 0 or len(data) % rows:
        return None
    width = len(data) // rows
    size = width - 78  # the symbol's bytes: a row is 2 + (4 + size) + 6 x (4 + 8) bytes
    if size <= 0:
        return None
    # ts, open, high, low, close, volume: each a length (8) and its value
    values = (">i8", ">f8", ">f8", ">f8", ">f8", ">i8")
    fields = [("fields", ">i2"), ("len", ">i4"), ("symbol", f"S{size}")]
    for k, value in enumerate(values):
        fields += [(f"n{k}", ">i4"), (f"v{k}", value)]
    table = np.frombuffer(data, dtype=np.dtype(fields))
    lengths = np.stack([table[f"n{k}"] for k in range(6)])
    if (table["fields"] != 7).any() or (table["len"] != size).any() or (lengths != 8).any():
        return None
    symbols = np.unique(table["symbol"])
    if len(symbols) != 1 or not symbols[0].isascii():
        return None
    micros = table["v0"].astype(np.int64) + _PG_EPOCH_US
    columns = [
        pa.array([symbols[0].decode()] * rows, pa.string()),
        pa.array(micros, pa.timestamp("us", tz="UTC")),
        *(pa.array(table[f"v{k}"].astype(np.float64)) for k in range(1, 5)),
        pa.array(table["v5"].astype(np.int64)),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA_OF["1m"])


@dataclass(frozen=True)
class StoredBody:
    """A minute segment the store serves as a COPY body: the body (verified), the manifest's row of it, and its
    key in the store, for reading its table instead (a batch that cannot take the body: a month that exists, a
    segment the ledger holds)."""

    entry: Entry
    body: CopyBody
    store: FeatureStore

    @property
    def num_rows(self) -> int:
        return self.body.rows

    def read_table(self) -> pa.Table | None:
        """The segment's table: its file read (verified) as a store hit would be; if the file is gone or
        damaged (the store evicts it), the body's rows, trusted only if their content hash is the entry's, and
        put in the store again, as a fetch would (the Parquet file is the truth, and is whole again). None if
        neither can be had."""
        key = self.entry.key
        table = self.store.get_many([key], count=False).get(key)
        if table is not None:
            return table
        decoded = decode(self.body.raw, self.body.rows)
        if decoded is None or fingerprint_table(decoded) != self.entry.content_hash:
            return None
        with contextlib.suppress(FeatureStoreError, OSError):  # a store that cannot be written: still loaded
            self.store.put_many_hashes([(key, decoded, self.entry.symbol)])
        return decoded


def stored_bodies(store: FeatureStore, keys: Sequence[str]) -> dict[str, StoredBody]:
    """The minute segments of ``keys`` whose bodies the store holds in this ``layout``, by key."""
    return {
        key: StoredBody(entry, body, store)
        for key, (entry, body) in store.read_bodies(keys, layout()).items()
    }


def has_body(store: FeatureStore, content_hash: str | None) -> bool:
    """Whether the store has a body file of ``content_hash`` in this ``layout`` (by its name: not read, not
    verified; a load verifies it, ``make_bodies`` skips only a sound one)."""
    path = store.body_path(content_hash, layout()) if content_hash is not None else None
    return path is not None and path.exists()


def lacking(store: FeatureStore, wanted: Sequence[Wanted]) -> list[Wanted]:
    """The ``wanted`` segments that have no body in the store now (``has_body``; one gone from the store has
    none): what a refill whose bodies' step failed or was stopped midway did not make (counting every listed one
    instead told "could not make 6" of a step that had published 2 before it failed), and what stays listed."""
    hashes = store.lookup_hashes([each.key for each in wanted])
    return [each for each in wanted if not has_body(store, hashes.get(each.key, (None, 0))[0])]


@dataclass(frozen=True)
class Made:
    """What ``make_listed`` did of a list: the bodies it made, the listed segments still without one, and the
    lines of those it could not make (``make_bodies``' ``say``, in order)."""

    made: int
    left: list[Wanted]
    said: list[str]


def make_listed(
    store: FeatureStore, wanted: Sequence[Wanted], *, say: Callable[[str], object] = print
) -> Made:
    """``make_bodies`` of a list's ``wanted`` segments (the refill's and `refresher warm`'s), and which of them
    are still without a body (``lacking``: asked only when one could not be made), for the caller to leave in the
    list (``body_keys.finished``) after recording them its own way. Its errors are ``make_bodies``'."""
    said: list[str] = []

    def saying(line: str) -> None:
        said.append(line)
        say(line)

    made = make_bodies(store, wanted, say=saying)
    return Made(made, lacking(store, wanted) if said else [], said)


def make_bodies(
    store: FeatureStore, wanted: Sequence[Wanted], *, say: Callable[[str], object] = print
) -> int:
    """Make and publish the bodies of the ``wanted`` minute segments the store holds, in this ``layout``; the
    number made. A segment whose body is there and sound is skipped. Each body is made of the segment's
    Parquet rows as the store verifies them (``get_many``), conformed as the loader conforms them
    (``load.conform``), encoded as it encodes them, and named by the content hash of those rows (a segment
    stored again meanwhile gets the body of what was read, never another content's). A segment that cannot be
    made (gone from the store, its file damaged, rows the loader would refuse) is one line through ``say`` and
    no body; a body is published whole or not at all (``FeatureStore.put_bodies``)."""
    from refresher import load  # load imports this module

    kept = store.read_bodies([each.key for each in wanted], layout())
    made: list[tuple[str, int, bytes]] = []
    count = 0
    for each in wanted:
        if each.key in kept:
            continue
        try:
            year, month = (int(part) for part in each.month.split("-"))
            segment = Segment(each.symbol, "1m", dt.date(year, month, 1))
        except ValueError:
            say(f"refresher: no COPY body for {each.key}: not a minute segment ({each.line()!r})")
            continue
        table = store.get_many([each.key], count=False).get(each.key)
        if table is None:
            say(f"refresher: no COPY body for {segment}: its stored file is gone or damaged ({each.key})")
            continue
        try:
            rows = load.conform(segment, table, each.tz)
        except (RefresherError, pa.ArrowException, ValueError) as exc:
            say(f"refresher: no COPY body for {segment}: {str(exc).strip().splitlines()[0]}")
            continue
        made.append((fingerprint_table(table), rows.num_rows, encode(rows)))
        if len(made) >= _PUBLISHED:
            store.put_bodies(made, layout())
            count, made = count + len(made), []
    if made:
        store.put_bodies(made, layout())
    return count + len(made)


__all__ = [
    "HEADER",
    "TABLE",
    "TRAILER",
    "Made",
    "StoredBody",
    "decode",
    "encode",
    "has_body",
    "lacking",
    "layout",
    "make_bodies",
    "make_listed",
    "stored_bodies",
]
