"""Desired segments vs the store's manifest vs the database's own segment table -> a GapPlan.

Pure: it reads state handed to it and decides; fetching, storing and loading belong to ``refresher.refresh``.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from refresher.segments import Segment

# Bump when the meaning of a stored segment changes (schema, labelling): every key changes with it.
SEGMENT_KEY_FORMAT = "refresher-segment-v1"
# Segment's own order as a C-level key: 120,000 dataclass __lt__ calls cost about a second.
_ORDER = operator.attrgetter("symbol", "timeframe", "month")


def digest_parts(*parts: str) -> str:
    """SHA-256 hex of ``parts``, each length-prefixed so no two different lists encode to the same bytes."""
    return str(_digest_onto(hashlib.sha256(), parts).hexdigest())


def _digest_onto(digest: Any, parts: Iterable[str]) -> Any:
    for part in parts:
        raw = part.encode()
        digest.update(len(raw).to_bytes(8, "big") + raw)
    return digest


@functools.lru_cache(maxsize=16)
def _key_prefix(source_kind: str) -> Any:
    # The parts every key of a source kind starts with, hashed once; each key continues from a copy.
    return _digest_onto(hashlib.sha256(), (SEGMENT_KEY_FORMAT, source_kind))


def segment_key(segment: Segment, source_kind: str, source_version: str) -> str:
    """The feature-store key of a segment's bars as one source version produces them.

    Equal to ``digest_parts(SEGMENT_KEY_FORMAT, kind, symbol, timeframe, month, version)``: same bytes hashed.
    """
    parts = (segment.symbol, segment.timeframe, segment.month_label, source_version)
    return f"seg-{_digest_onto(_key_prefix(source_kind).copy(), parts).hexdigest()}"


def segment_keys(segments: Sequence[Segment], source_kind: str, versions: Sequence[str]) -> list[str]:
    """``segment_key`` of each segment with its version, in order: the same digests, computed in bulk.

    The hash state after (format, kind, symbol, timeframe) is made once per symbol and timeframe, and each
    month's label and each distinct version are encoded once; per segment there is one copy, one update and
    one hexdigest (about 1 us, against 15 us for ``segment_key``'s generic path).
    """
    prefix = _key_prefix(source_kind)
    heads: dict[tuple[str, str], Any] = {}
    tails: dict[tuple[dt.date, str], bytes] = {}
    out: list[str] = []
    for segment, version in zip(segments, versions, strict=True):
        head = heads.get((segment.symbol, segment.timeframe))
        if head is None:
            head = _digest_onto(prefix.copy(), (segment.symbol, segment.timeframe))
            heads[segment.symbol, segment.timeframe] = head
        tail = tails.get((segment.month, version))
        if tail is None:
            tail = tails[segment.month, version] = _length_prefixed(segment.month_label, version)
        digest = head.copy()
        digest.update(tail)
        out.append("seg-" + digest.hexdigest())
    return out


def _length_prefixed(*parts: str) -> bytes:
    encoded = [part.encode() for part in parts]
    return b"".join(len(raw).to_bytes(8, "big") + raw for raw in encoded)


@dataclass(frozen=True)
class StoredSegment:
    """What the store's manifest says of one segment's key, without reading the file."""

    key: str
    content_hash: str
    rows: int


@dataclass(frozen=True)
class DatabaseSegment:
    """What the target database's ``refresher_segments`` says of one segment."""

    content_hash: str
    rows: int


# A segment as plain data, (symbol, timeframe, month): hashed and compared in C, unlike Segment's dataclass
# methods, which is what lets 60,000 of them be compared in bulk.
SegmentId = tuple[str, str, dt.date]


class LedgerView(Mapping[Segment, DatabaseSegment]):
    """The database's ledger as read in one query, keyed by ``SegmentId``, seen as segments.

    Made from the query's rows without a Segment or a DatabaseSegment per row: a no-op plan at production
    scale compares 60,000 rows and only the few that differ ever become objects.
    """

    def __init__(self, rows: Mapping[SegmentId, tuple[str, int]]) -> None:
        self.rows = rows

    def __getitem__(self, segment: Segment) -> DatabaseSegment:
        found = self.rows.get((segment.symbol, segment.timeframe, segment.month))
        if found is None:
            raise KeyError(segment)
        return DatabaseSegment(*found)

    def get(self, segment: Segment, default: Any = None) -> Any:
        # ``Mapping.get`` raises and catches a KeyError per miss: 3 us, 60,000 times in a cold production
        # refresh's ``jobs_of_plan``, on the main thread before the first fetch.
        found = self.rows.get((segment.symbol, segment.timeframe, segment.month))
        return default if found is None else DatabaseSegment(*found)

    def __iter__(self) -> Iterator[Segment]:
        return (Segment(*ident) for ident in self.rows)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.rows)


class StoreView(Mapping[str, StoredSegment]):
    """The store's answer to the plan's look-up, (content hash, rows) by key, seen as ``StoredSegment``s.

    Like ``LedgerView``: made from the look-up's rows as they are, so a no-op plan at production scale makes
    no object per segment (60,000 of them cost about 0.1 s).
    """

    def __init__(self, rows: Mapping[str, tuple[str, int]]) -> None:
        self.rows = rows

    def __getitem__(self, key: str) -> StoredSegment:
        found = self.rows.get(key)
        if found is None:
            raise KeyError(key)
        return StoredSegment(key, *found)

    def get(self, key: str, default: Any = None) -> Any:
        # as ``LedgerView.get``: a miss without an exception
        found = self.rows.get(key)
        return default if found is None else StoredSegment(key, *found)

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class GapPlan:
    """What a refresh must do. Every desired segment is in exactly one of present, to_load or to_fetch."""

    desired: tuple[Segment, ...]
    keys: Mapping[Segment, str]
    present: tuple[Segment, ...]
    # In the store, and missing or different in the database (or failed --verify).
    to_load: tuple[Segment, ...]
    # Not in the store: the source must produce them; each is then loaded unless the database already
    # holds exactly that content (same hash), which happens after a store GC.
    to_fetch: tuple[Segment, ...]
    # In the database but no longer desired; deleted only with --prune.
    stale: tuple[Segment, ...]
    reasons: Mapping[Segment, str] = field(default_factory=dict)
    # The state the plan was made from, so the refresh need not read it again.
    stored: Mapping[str, StoredSegment] = field(default_factory=dict)
    loaded: Mapping[Segment, DatabaseSegment] = field(default_factory=dict)

    @property
    def is_noop(self) -> bool:
        return not (self.to_load or self.to_fetch)

    def summary(self) -> dict[str, int]:
        return {
            "desired": len(self.desired),
            "present": len(self.present),
            "to_load": len(self.to_load),
            "to_fetch": len(self.to_fetch),
            "stale": len(self.stale),
        }


def plan_gaps(
    desired: Iterable[Segment],
    keys: Mapping[Segment, str],
    stored: Mapping[str, StoredSegment],
    loaded: Mapping[Segment, DatabaseSegment],
    *,
    verified_rows: Mapping[Segment, int] | None = None,
) -> GapPlan:
    """Compare the desired set with the store and the database.

    ``verified_rows`` (from ``--verify``) holds the rows actually present per segment; a segment whose count
    differs from what ``refresher_segments`` recorded is reloaded (a developer deleted rows by hand).

    In bulk: the desired segments become ``SegmentId`` tuples once, the database side is looked up by them
    (a ``LedgerView`` and a ``StoreView`` are used as they are), and Segment objects are made only for what is
    stale.
    """
    wanted, ids = _sorted_unique(desired)
    in_db = loaded.rows if isinstance(loaded, LedgerView) else _rows_by_id(loaded)
    db_rows = list(map(in_db.get, ids))
    by_key = stored.rows if isinstance(stored, StoreView) else _rows_by_key(stored)
    in_store = list(map(by_key.get, map(keys.__getitem__, wanted)))
    verified = None if verified_rows is None else [verified_rows.get(s, 0) for s in wanted]
    present: list[Segment] = []
    to_load: list[Segment] = []
    to_fetch: list[Segment] = []
    reasons: dict[Segment, str] = {}
    if verified is None and None not in in_store and in_store == db_rows:
        # A no-op's plan: every segment in the store and in the ledger with the same (content hash, rows), two
        # lists compared in C. The loop below would put each in present too (it needs only the hashes equal), one
        # Python step per segment.
        present = wanted
    else:
        for i, (segment, entry, row) in enumerate(zip(wanted, in_store, db_rows, strict=True)):
            if entry is None:
                to_fetch.append(segment)
                reasons[segment] = "not in store"
            elif row is None:
                to_load.append(segment)
                reasons[segment] = "not in database"
            elif row[0] != entry[0]:
                to_load.append(segment)
                reasons[segment] = "content changed"
            elif verified is not None and verified[i] != row[1]:
                to_load.append(segment)
                reasons[segment] = f"row count {verified[i]} != recorded {row[1]}"
            else:
                present.append(segment)
    stale_ids: list[SegmentId] = []
    if len(in_db) > len(ids) - db_rows.count(None):
        # Some loaded segment is not desired (every desired one found in the ledger accounts for one of its rows).
        wanted_ids = set(ids)
        stale_ids = sorted(ident for ident in in_db if ident not in wanted_ids)
    stale = [Segment(*ident) for ident in stale_ids]  # type: ignore[arg-type]
    for segment in stale:
        reasons[segment] = "no longer desired"
    return GapPlan(
        desired=tuple(wanted),
        keys=dict(keys),
        present=tuple(present),
        to_load=tuple(to_load),
        to_fetch=tuple(to_fetch),
        stale=tuple(stale),
        reasons=reasons,
        stored=stored if isinstance(stored, StoreView) else dict(stored),
        loaded=loaded if isinstance(loaded, LedgerView) else dict(loaded),
    )


def _sorted_unique(desired: Iterable[Segment]) -> tuple[list[Segment], list[SegmentId]]:
    """``desired`` in Segment order without repeats, and their SegmentIds; a list that already is so
    (``desired_segments``) is checked in one C-level pass over its SegmentIds rather than hashed and sorted again."""
    segments = list(desired)
    ids: list[SegmentId] = list(map(_ORDER, segments))
    if all(map(operator.lt, ids, ids[1:])):
        return segments, ids
    segments = sorted(set(segments), key=_ORDER)
    return segments, list(map(_ORDER, segments))


def _rows_by_key(stored: Mapping[str, StoredSegment]) -> dict[str, tuple[str, int]]:
    return {key: (entry.content_hash, entry.rows) for key, entry in stored.items()}


def _rows_by_id(loaded: Mapping[Segment, DatabaseSegment]) -> dict[SegmentId, tuple[str, int]]:
    return {(s.symbol, s.timeframe, s.month): (row.content_hash, row.rows) for s, row in loaded.items()}
