"""What every source is: a ``Source`` produces one segment's bars as an Arrow table, and says what it left out."""

from __future__ import annotations

import datetime as dt
import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Self

import pyarrow as pa

from refresher._installed import installed_version
from refresher.segments import Segment

if TYPE_CHECKING:
    from refresher.profile import Profile
    from refresher.sources.validate import Reject


@functools.cache
def calendar_library_version() -> str:
    """exchange_calendars' version: it decides which days and minutes are sessions, hence which rows a source
    hands over. From the installed package's name: importing exchange_calendars costs 60 ms (importlib.metadata
    20-50) a no-op refresh need not pay."""
    return installed_version("exchange_calendars")


def reader_tag(kind: str, reader: int) -> str:
    """The head of a files or postgres segment's version: its reader's version and the calendar library's.

    A source bumps its ``READER_VERSION`` whenever the rows it hands over for the same input can change (a parse
    fixed, a row now refused or reported): the version is part of the segment's store key, so a store an older
    refresher filled is read again, never served to the upgraded one (nor loaded into a new database from it)."""
    return f"{kind}/r{reader}/xc{calendar_library_version()}/"


@dataclass(frozen=True)
class SourceReport:
    """Rows a source did not load, by reason: ``dropped`` (outside sessions, missing file), ``rejected`` or
    ``quarantined`` (failed validation under ``on_bad_rows: skip`` / ``quarantine``)."""

    segment: Segment
    file: str
    reason: str
    rows: int = 0
    examples: tuple[str, ...] = ()
    action: str = "dropped"

    def __str__(self) -> str:
        shown = f" (e.g. {', '.join(self.examples)})" if self.examples else ""
        return f"{self.segment}: {self.file}: {self.rows} rows {self.action}: {self.reason}{shown}"


class Source(ABC):
    """Produces segments. Implementations: synthetic (default), files, postgres.

    A source is a context manager (``with make_source(profile) as source:``) and releases what it holds in
    ``close``, on every path. ``reports`` and ``rejects`` collect, per fetched segment, what was left out.
    """

    kind: ClassVar[str]

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.reports: list[SourceReport] = []
        # quarantined rows per segment, for the loader to write into ``refresher_rejects``
        self.rejects: dict[Segment, list[Reject]] = {}

    @abstractmethod
    def version(self, segment: Segment) -> str:
        """A cheap token that changes whenever the data this source would return for ``segment`` changes.

        It is part of the segment's store key, so a changed token means "fetch again". It must not require
        producing the data (the no-op refresh computes it for every desired segment).
        """

    def versions(self, segments: Sequence[Segment]) -> list[str]:
        """``version`` of each segment, in order; a source overrides it when a batch is cheaper than a loop."""
        return [self.version(segment) for segment in segments]

    @abstractmethod
    def fetch(self, segment: Segment) -> pa.Table:
        """The segment's validated bars with exactly ``refresher.schema.SCHEMA_OF[segment.timeframe]``.

        Zero rows when the source has no data for it (before a listing, a closed month...). Rows that break
        a rule of ``refresher.sources.validate`` raise ``BadRowsError`` or are left out, by the profile's
        ``source.on_bad_rows``.
        """

    def fetch_many(self, segments: Sequence[Segment]) -> list[pa.Table]:
        """``fetch`` of each segment, in order; a source overrides it when producing a batch costs less than a
        loop (the synthetic source computes a batch of months at once). Reports name their segment."""
        return [self.fetch(segment) for segment in segments]

    def preflight(self) -> None:  # noqa: B027 -- optional: most sources have nothing to check up front
        """Refuse what would fail every fetch (a files source's missing directory) before a refresh starts a
        server beside its first fetch: the one-line error then leaves no empty server behind."""

    def close(self) -> None:  # noqa: B027 -- optional: most sources hold nothing to release
        """Release connections and files; the refresher calls it when the refresh ends."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def effective_range(profile: Profile, segment: Segment) -> tuple[dt.date, dt.date] | None:
    """The segment's month clipped to the profile's inclusive range, or None when they do not overlap.

    The last month is partial when ``as_of`` falls mid-month; sources produce (and version) only this range.
    """
    first, nxt = segment.month_bounds()
    start, end = max(first, profile.start), min(nxt - dt.timedelta(days=1), profile.end)
    return (start, end) if start <= end else None
