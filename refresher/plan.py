"""Desired segments vs the store's manifest vs the database's own segment table -> a GapPlan.

Pure: it reads state handed to it and decides; fetching, storing and loading belong to ``refresher.refresh``.
"""

from __future__ import annotations

import functools
import hashlib
import operator
from collections.abc import Iterable, Mapping
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
    """
    wanted = sorted(set(desired), key=_ORDER)
    present: list[Segment] = []
    to_load: list[Segment] = []
    to_fetch: list[Segment] = []
    reasons: dict[Segment, str] = {}
    for segment in wanted:
        in_store = stored.get(keys[segment])
        in_db = loaded.get(segment)
        if in_store is None:
            to_fetch.append(segment)
            reasons[segment] = "not in store"
        elif in_db is None:
            to_load.append(segment)
            reasons[segment] = "not in database"
        elif in_db.content_hash != in_store.content_hash:
            to_load.append(segment)
            reasons[segment] = "content changed"
        elif verified_rows is not None and verified_rows.get(segment, 0) != in_db.rows:
            to_load.append(segment)
            reasons[segment] = f"row count {verified_rows.get(segment, 0)} != recorded {in_db.rows}"
        else:
            present.append(segment)
    wanted_set = set(wanted)
    stale = sorted((s for s in loaded if s not in wanted_set), key=_ORDER)
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
        stored=dict(stored),
        loaded=dict(loaded),
    )
