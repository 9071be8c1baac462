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

Made by the loader when it has the rows anyway (a cold load, or a warm one that found no body): each segment's
rows encoded on their own (the concatenation of the segments' bodies is the month's COPY body), sent, and after
the batch commits handed to a ``BodyWriter`` thread, which compresses and publishes them off the loaders' path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from pgpq import ArrowToPostgresBinaryEncoder

from featurestore.errors import FeatureStoreError
from featurestore.fingerprint import fingerprint_table
from refresher._installed import installed_version
from refresher.schema import SCHEMA_OF

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
# Bodies queued for the writer at most (a month's batch each): a load never holds more than this many behind it.
_QUEUED = 4


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


class BodyWriter(threading.Thread):
    """Publishes bodies handed over by the loaders, one committed batch at a time, on a thread of its own (the
    LZ4 compression and the fsyncs are not a loader's to wait for). ``close`` waits for what was handed over;
    a refresh killed first leaves temporaries that GC removes, never a body half written. A failed write (a
    full disk) drops the bodies: they are a cache, the load has its rows."""

    _DONE = object()

    def __init__(self, store: FeatureStore) -> None:
        super().__init__(name="refresher-bodies", daemon=True)
        self.store = store
        self.todo: queue.Queue[object] = queue.Queue(maxsize=_QUEUED)
        self.written = 0
        self.failed: BaseException | None = None
        self.start()

    def keep(self, items: Sequence[tuple[str, int, bytes]]) -> None:
        """Queue ``items`` (content hash, rows, body) for writing; waits while the queue is full."""
        if items and self.failed is None:
            self.todo.put(list(items))

    def run(self) -> None:
        while True:
            items = self.todo.get()
            if items is self._DONE:
                return
            if self.failed is not None:
                continue
            try:
                assert isinstance(items, list)
                self.written += self.store.put_bodies(items, layout())
            except Exception as exc:  # a cache: the load goes on without it
                self.failed = exc

    def close(self, *, wait: bool = True) -> None:
        """Write what was handed over (``wait``), or drop what is still queued, and end the thread."""
        if not wait:
            self.failed = self.failed or RuntimeError("closed")
            while True:
                try:
                    self.todo.get_nowait()
                except queue.Empty:
                    break
        self.todo.put(self._DONE)
        self.join(timeout=None if wait else 5)


__all__ = [
    "HEADER",
    "TABLE",
    "TRAILER",
    "BodyWriter",
    "StoredBody",
    "decode",
    "encode",
    "layout",
    "stored_bodies",
]
