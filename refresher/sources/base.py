"""The Source protocol: anything that can produce one segment's bars as an Arrow table."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import pyarrow as pa

from refresher.segments import Segment

if TYPE_CHECKING:
    from refresher.profile import Profile


@runtime_checkable
class Source(Protocol):
    """Produces segments. Implementations: synthetic (default), files, postgres."""

    kind: str

    def version(self, segment: Segment) -> str:
        """A cheap token that changes whenever the data this source would return for ``segment`` changes.

        It is part of the segment's store key, so a changed token means "fetch again". It must not require
        producing the data (the no-op refresh computes it for every desired segment).
        """
        ...

    def fetch(self, segment: Segment) -> pa.Table:
        """The segment's bars with exactly ``refresher.schema.SCHEMA_OF[segment.timeframe]``, sorted by time.

        Zero rows when the source has no data for it (before a listing, a closed month...).
        """
        ...

    def close(self) -> None:
        """Release connections and files; the refresher calls it when the refresh ends."""
        ...


@dataclass(frozen=True)
class SourceReport:
    """Something a source noticed and did not load (rows outside sessions, a missing file...)."""

    segment: Segment
    file: str
    reason: str
    rows: int = 0
    examples: tuple[str, ...] = ()

    def __str__(self) -> str:
        shown = f" (e.g. {', '.join(self.examples)})" if self.examples else ""
        return f"{self.segment}: {self.file}: {self.rows} rows {self.reason}{shown}"


def effective_range(profile: Profile, segment: Segment) -> tuple[dt.date, dt.date] | None:
    """The segment's month clipped to the profile's inclusive range, or None when they do not overlap.

    The last month is partial when ``as_of`` falls mid-month; sources produce (and version) only this range.
    """
    first, nxt = segment.month_bounds()
    start, end = max(first, profile.start), min(nxt - dt.timedelta(days=1), profile.end)
    return (start, end) if start <= end else None
