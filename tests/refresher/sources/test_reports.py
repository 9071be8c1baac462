"""Reports that stick: a segment's notes go into the real store and come back, in segment order."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa

from featurestore import FeatureStore
from refresher.segments import Segment
from refresher.sources.base import SourceReport
from refresher.sources.reports import notes_key, notes_table, rows_by_reason, stored_reports

OCT, NOV = Segment("AAPL", "1d", dt.date(2024, 10, 1)), Segment("AAPL", "1d", dt.date(2024, 11, 1))


def test_notes_round_trip_through_the_store_and_count_per_reason(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    nov = [
        SourceReport(NOV, "bars.csv", "volume >= 0", 2, ("line 5", "line 9"), action="rejected"),
        SourceReport(NOV, "bars.csv", "not a XNYS session", 1, ("2024-11-30",)),
    ]
    octo = [SourceReport(OCT, "bars.csv", "volume >= 0", 1, ("line 3",), action="rejected")]
    store.put_many(
        [(notes_key("seg-nov"), notes_table(nov), "AAPL"), (notes_key("seg-oct"), notes_table(octo), "AAPL")]
    )
    keys = {NOV: "seg-nov", OCT: "seg-oct", Segment("MSFT", "1d", OCT.month): "seg-none"}
    back = stored_reports(store, keys)
    assert back == [*octo, *nov]
    assert rows_by_reason(back) == {"rejected: volume >= 0": 3, "dropped: not a XNYS session": 1}
    assert stored_reports(store, {OCT: "seg-other"}) == []


def test_notes_stored_with_json_examples_still_read(tmp_path: Path) -> None:
    """Notes written when ``examples`` was a JSON string (before nested columns survived the store)."""
    store = FeatureStore(tmp_path)
    report = SourceReport(NOV, "bars.csv", "volume >= 0", 2, ("line 5",), action="rejected")
    old = notes_table([report]).drop_columns(["examples"])
    store.put(notes_key("seg-nov"), old.append_column("examples", pa.array(['["line 5"]'])), symbol="AAPL")
    assert stored_reports(store, {NOV: "seg-nov"}) == [report]
