"""A store an older refresher filled from files or an upstream database is read again, never served.

The files and postgres sources' readers were fixed in ways that change the rows they hand over for the same input
(850f700, d9960be, 82861e8; ec1e023, b855d4c), but their versions, hence the segments' store keys, stayed as they
were: an upgraded refresher found the older reader's segments in the store and loaded them, wrong. The tests
build that older state by hand, with the version formula of refresher 0da224e (unchanged from then until the
readers got a version of their own).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest

from featurestore import FeatureStore
from refresher.plan import segment_key
from refresher.schema import empty_table
from refresher.segments import Segment
from refresher.sources import base
from refresher.sources.base import effective_range
from refresher.sources.files import FilesSource
from refresher.sources.postgres import PostgresSource
from refresher.warm import warm

from .conftest import MakeProfile

NOV = dt.date(2024, 11, 1)
# The dates as the CSV reader types them, numbers: 0da224e read them as nanoseconds after 1970, every row fell
# outside November, and the segment was stored and loaded empty without a report.
YYYYMMDD_CSV = """\
date,open,high,low,close,volume
20241125,10,11,9,10.5,1000
20241126,10.5,12,10,11,2000
20241127,11,12,10,11.5,1500
"""


def _files_version_0da224e(source: FilesSource, segment: Segment) -> str:
    """``FilesSource.version`` as refresher 0da224e computed it (profile with on_bad_rows: fail)."""
    path = source.file_for(segment)
    st = path.stat()
    spec = source.spec
    blob = json.dumps(
        [
            [str(path), st.st_size, st.st_mtime_ns],
            sorted(source.columns.items()),
            spec.format,
            spec.tz,
            spec.label,
            source.profile.listing(segment.symbol).exchange,
            str(effective_range(source.profile, segment)),
        ]
    )
    return "files/" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def test_a_segment_an_older_files_reader_stored_is_read_again(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    data = tmp_path / "data"
    (data / "daily").mkdir(parents=True)
    (data / "daily" / "AAPL.csv").write_text(YYYYMMDD_CSV)
    profile = make_profile(
        f"universe: {{symbols: [AAPL]}}\nstart: 2024-11-01\nend: 2024-11-30\ntimeframes: [1d]\n"
        f"source: {{kind: files, path: {data}}}\n"
    )
    segment = Segment("AAPL", "1d", NOV)
    source = FilesSource(profile)
    store = FeatureStore(tmp_path / "store")
    # what 0da224e left in the store: the empty segment under its version
    store.put(segment_key(segment, "files", _files_version_0da224e(source, segment)), empty_table("1d"))

    report = warm(profile, store)

    assert report.fetched == 1  # 0 before: the older reader's empty segment was a hit
    stored = store.get(segment_key(segment, "files", source.version(segment)))
    assert stored is not None
    assert stored.column("date").to_pylist() == [dt.date(2024, 11, d) for d in (25, 26, 27)]


def test_a_postgres_segment_an_older_reader_stored_has_another_version(make_profile: MakeProfile) -> None:
    # 0da224e dated a timestamptz daily column in UTC (a Tokyo bar a day early) and never selected rows with a
    # NULL day: its segments must not be what today's reader finds. No server: version_query is off.
    profile = make_profile(
        "universe: {symbols: [AAPL]}\nstart: 2024-11-01\nend: 2024-11-30\n"
        "source:\n  kind: postgres\n  dsn: host=127.0.0.1 port=1 dbname=market user=reader\n"
        "  daily_table: daily_bars\n  minute_table: minute_bars\n  version_query: false\n"
    )
    segment = Segment("AAPL", "1d", NOV)
    source = PostgresSource(profile)
    spec = source.spec
    config = [source.dsn, source.tables, sorted(source.columns.items()), source.tz, spec.version]
    config += [sorted(spec.queries.items()), spec.on_bad_rows]
    parts = [config, "XNYS", str(effective_range(profile, segment))]
    older = "postgres/" + hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]

    assert source.version(segment) != older
    # r2 rounded a fractional volume (1000.4) into the bigint column
    assert source.version(segment).startswith("postgres/r") and not source.version(segment).startswith(
        "postgres/r2/"
    )


@pytest.mark.parametrize("kind", ["files", "postgres"])
def test_a_calendar_library_upgrade_changes_the_version(
    kind: str, tmp_path: Path, make_profile: MakeProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The calendar decides which rows are sessions, so which rows a segment holds (as for synthetic segments).
    (tmp_path / "daily").mkdir()
    (tmp_path / "daily" / "AAPL.csv").write_text(YYYYMMDD_CSV)
    spec = (
        f"{{kind: files, path: {tmp_path}}}"
        if kind == "files"
        else "{kind: postgres, dsn: host=127.0.0.1 port=1, daily_table: d, minute_table: m, version_query: false}"
    )
    profile = make_profile(
        f"universe: {{symbols: [AAPL]}}\nstart: 2024-11-01\nend: 2024-11-30\nsource: {spec}\n"
    )
    segment = Segment("AAPL", "1d", NOV)
    source = FilesSource(profile) if kind == "files" else PostgresSource(profile)
    before = source.version(segment)
    monkeypatch.setattr(base, "calendar_library_version", lambda: "9999.1")
    assert source.version(segment) != before


def test_the_files_readers_that_named_rows_by_record_or_rounded_volumes_have_another_version(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # r2 stored a quarantined CSV row's line (rejects, reports) too early after an empty line; r4 rounded 100.5 to
    # 100 and left a shared file's aapl rows out unsaid (when the universe has AAPL): not served again
    (tmp_path / "AAPL.csv").write_text(YYYYMMDD_CSV)
    profile = make_profile(
        "universe: {symbols: [AAPL]}\nstart: 2024-11-01\nend: 2024-11-30\n"
        f"source: {{kind: files, path: {tmp_path}, daily: '{{symbol}}.csv', on_bad_rows: quarantine}}\n"
    )
    version = FilesSource(profile).version(Segment("AAPL", "1d", NOV))
    assert version.startswith("files/r") and not version.startswith(("files/r2/", "files/r4/"))
