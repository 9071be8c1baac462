"""The Source protocol: anything that can produce one segment's bars as an Arrow table."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pyarrow as pa

from refresher.segments import Segment


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
