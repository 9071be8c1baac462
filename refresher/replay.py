"""What one refresh wrote to its database, kept so that the pristine copy can be brought up to date by writing
the same again into one of its warm clones (``snapshot.advance_pristine``) instead of copying the database.

A daily refresh appends a session's rows to a gigabyte database; copying that database for the snapshot cost
1.3 s quiet and 3 s on a busy machine, writing the same rows again into a clone of the old copy about 0.3 s.
The writes are replayed through the very functions that made them (``load.load_segments``,
``tables.replace_feature_rows``), against a clone whose ledger is the one the live database had before the
refresh: so they decide the same appends and reloads. Only what is cheap to hold is kept: past ``limit_rows``
rows (a cold refresh, a back-fill) the writes are dropped and the snapshot is a copy, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from refresher import database, load
from refresher.features.tables import FeaturePart, rebuild_feature_rows, replace_feature_rows
from refresher.profile import Profile

# Rows held for a replay: about 50 MB of minute bars. A daily refresh of backtesting holds 0.7 M (the current
# month of 100 symbols, of which it appends 39 k); writing more again would cost about what a copy costs.
REPLAY_ROWS = 1_000_000


@dataclass
class RefreshWrites:
    """The segment batches and feature loads of one refresh, in the order they were committed."""

    profile: Profile
    # The ledger version of the database (and of its pristine copy) before these writes.
    base: str
    limit_rows: int = REPLAY_ROWS
    segments: list[tuple[Sequence[load.SegmentLoad], bool]] = field(default_factory=list)
    features: list[tuple[str, Sequence[FeaturePart], bool]] = field(default_factory=list)
    rows: int = 0
    complete: bool = True

    def loaded_segments(self, items: Sequence[load.SegmentLoad], allow_shrink: bool) -> None:
        """Note a committed ``load.load_segments(conn, items, allow_shrink=...)``."""
        self._hold(sum(item.table.num_rows for item in items))
        if self.complete:
            self.segments.append((list(items), allow_shrink))

    def loaded_features(self, name: str, parts: Sequence[FeaturePart], rebuild: bool = False) -> None:
        """Note a committed ``replace_feature_rows(conn, name, parts)`` (``rebuild_feature_rows`` if ``rebuild``)."""
        self._hold(sum(part.rows.num_rows for part in parts))
        if self.complete:
            self.features.append((name, list(parts), rebuild))

    def give_up(self) -> None:
        """Something was written that is not kept here (a prune): the snapshot must be a copy."""
        self.complete = False
        self.segments, self.features = [], []

    def _hold(self, rows: int) -> None:
        self.rows += rows
        if self.rows > self.limit_rows:
            self.give_up()

    def apply(self, conn: psycopg.Connection[Any]) -> None:
        """Write the same into ``conn``'s database (autocommit), in the same transactions and order."""
        database.ensure_schema(conn)
        database.upsert_symbols(conn, self.profile.listings)
        for items, allow_shrink in self.segments:
            load.load_segments(conn, items, allow_shrink=allow_shrink)
        for name, parts, rebuild in self.features:
            (rebuild_feature_rows if rebuild else replace_feature_rows)(conn, name, parts)


__all__ = ["REPLAY_ROWS", "RefreshWrites"]
