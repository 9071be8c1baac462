"""Reports that stick: what a source left out of a segment is stored with the segment, not only printed.

When a source produces a segment it may drop rows (outside sessions), reject or quarantine them (validation)
or find no file. Those ``SourceReport`` rows go into the feature store next to the segment's table, under the
segment's key plus ``.notes``, in the same manifest transaction. A run served from the cache reads them back,
so it reports exactly what the run that fetched the data reported, and ``refresher plan`` and ``refresher
status --profile P`` can show them without fetching anything. A segment re-fetched under a new version has a
new key, so stale notes never outlive the data they describe.

Quarantined rows themselves (``on_bad_rows: quarantine``) go under the key plus ``.rejects``: a segment loaded
from the store into a new database writes the same ``refresher_rejects`` rows as the run that fetched it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence

import pyarrow as pa

from featurestore import FeatureStore
from refresher.segments import Segment
from refresher.sources.base import SourceReport
from refresher.sources.validate import Reject

NOTES_SCHEMA = pa.schema(
    [
        pa.field("symbol", pa.string()),
        pa.field("timeframe", pa.string()),
        pa.field("month", pa.date32()),
        pa.field("file", pa.string()),
        pa.field("action", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("examples", pa.list_(pa.string())),
    ]
)


NOTES_SUFFIX = ".notes"


def notes_key(segment_key: str) -> str:
    """The store key of a segment's notes (a valid store key whenever the segment's is)."""
    return f"{segment_key}{NOTES_SUFFIX}"


def notes_table(reports: Sequence[SourceReport]) -> pa.Table:
    """Reports as an Arrow table of ``NOTES_SCHEMA``."""
    return pa.Table.from_pylist(
        [
            {
                "symbol": r.segment.symbol,
                "timeframe": r.segment.timeframe,
                "month": r.segment.month,
                "file": r.file,
                "action": r.action,
                "reason": r.reason,
                "rows": r.rows,
                "examples": list(r.examples),
            }
            for r in reports
        ],
        schema=NOTES_SCHEMA,
    )


def reports_of(table: pa.Table) -> list[SourceReport]:
    """The reports a notes table holds."""
    return [
        SourceReport(
            Segment(row["symbol"], row["timeframe"], row["month"]),
            row["file"],
            row["reason"],
            int(row["rows"]),
            _examples(row["examples"]),
            action=row["action"],
        )
        for row in table.to_pylist()
    ]


def _examples(value: list[str] | str | None) -> tuple[str, ...]:
    # Notes stored before nested columns hashed alike after a Parquet round trip hold a JSON list string.
    if isinstance(value, str):
        return tuple(json.loads(value))
    return tuple(value or ())


REJECTS_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("rule", pa.string()),
        pa.field("column", pa.string()),
        pa.field("raw", pa.string()),  # the JSON object ``refresher_rejects.raw`` holds
    ]
)


def rejects_key(segment_key: str) -> str:
    """The store key of a segment's quarantined rows."""
    return f"{segment_key}.rejects"


def rejects_table(rejects: Sequence[Reject]) -> pa.Table:
    """Quarantined rows of one segment as an Arrow table of ``REJECTS_SCHEMA``."""
    return pa.Table.from_pylist(
        [
            {"source": r.source, "row": r.row, "rule": r.rule, "column": r.column, "raw": r.raw}
            for r in rejects
        ],
        schema=REJECTS_SCHEMA,
    )


def rejects_of(segment: Segment, table: pa.Table) -> list[Reject]:
    """The quarantined rows a rejects table holds for ``segment``."""
    return [
        Reject(segment, row["source"], row["row"], row["rule"], row["column"], row["raw"])
        for row in table.to_pylist()
    ]


def stored_reports(store: FeatureStore, keys: Mapping[Segment, str]) -> list[SourceReport]:
    """Every report stored for the segments of ``keys`` (segment -> its store key), in segment order."""
    # Notes are few (a source that left nothing out stores none): scan for them rather than ask for each key, and
    # name the notes key of only the segments that have one (every segment's: 30 ms of a 60,000-segment no-op).
    noted = {key.removesuffix(NOTES_SUFFIX) for key in store.lookup_hashes_ending(NOTES_SUFFIX)}
    wanted = {notes_key(key): segment for segment, key in keys.items() if key in noted}
    if not wanted:
        return []
    tables = store.get_many(sorted(wanted))
    ordered = sorted(tables, key=lambda k: wanted[k])
    return [report for key in ordered for report in reports_of(tables[key])]


def rows_by_reason(reports: Sequence[SourceReport]) -> dict[str, int]:
    """Rows left out, per ``action: reason`` (e.g. ``rejected: volume >= 0``), most first."""
    counts: Counter[str] = Counter()
    for r in reports:
        counts[f"{r.action}: {r.reason}"] += r.rows
    return dict(counts.most_common())


__all__ = [
    "NOTES_SCHEMA",
    "NOTES_SUFFIX",
    "REJECTS_SCHEMA",
    "notes_key",
    "notes_table",
    "rejects_key",
    "rejects_of",
    "rejects_table",
    "reports_of",
    "rows_by_reason",
    "stored_reports",
]
