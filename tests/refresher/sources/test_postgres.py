"""The postgres source against a real upstream server: mapping, ranges, naive timestamps, versions."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import psycopg
import pytest

from featurestore import FeatureStore
from refresher.engines.local import LocalEngine
from refresher.errors import SourceError
from refresher.profile import load_profile
from refresher.refresh import refresh
from refresher.schema import DAILY_SCHEMA, MINUTE_SCHEMA
from refresher.segments import Segment
from refresher.sources import make_source
from refresher.sources._sql_text import statement_body
from refresher.sources.postgres import PostgresSource, _version_query_refused
from tests.fixtures_postgres import world_traversable_tmp

from .conftest import MakeProfile

pytestmark = pytest.mark.postgres
NOV = dt.date(2024, 11, 1)

SETUP = """
CREATE SCHEMA prod;
CREATE TABLE prod."Daily Bars" (ticker text, day date, o numeric, h numeric, l numeric, c numeric, vol numeric);
CREATE TABLE prod.minute_bars (ticker text, "time" timestamp, o numeric, h numeric, l numeric, c numeric, vol bigint);
INSERT INTO prod."Daily Bars" VALUES
  ('AAPL', '2024-10-31', 9, 10, 8, 9.5, 100),
  ('AAPL', '2024-11-26', 10, 11, 9, 10.5, 1000.0),
  ('AAPL', '2024-11-27', 10.5, 12, 10, 11, 2000),
  ('MSFT', '2024-11-27', 400, 410, 390, 405, 300),
  ('AAPL', '2024-12-02', 11, 12, 10, 11.5, 10);
-- naive New York wall-clock minutes
INSERT INTO prod.minute_bars VALUES
  ('AAPL', '2024-11-29 09:30', 1, 2, 0.5, 1.5, 7),
  ('AAPL', '2024-11-29 12:59', 1, 2, 0.5, 1.5, 8),
  ('AAPL', '2024-12-02 09:30', 1, 2, 0.5, 1.5, 9);
"""


@pytest.fixture(scope="module")
def upstream(upstream_dsn: str) -> str:
    with psycopg.connect(upstream_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS prod CASCADE")
        conn.execute(SETUP)
    return upstream_dsn


def body(dsn: str, extra: str = "") -> str:
    return f"""\
universe: {{symbols: [AAPL, MSFT]}}
start: 2024-10-01
end: 2024-11-30
source:
  kind: postgres
  dsn: "{dsn}"
  daily_table: prod.Daily Bars
  minute_table: prod.minute_bars
  tz: America/New_York
  columns: {{symbol: ticker, date: day, ts: time, open: o, high: h, low: l, close: c, volume: vol}}
{extra}"""


def test_fetch_daily_and_minute(upstream: str, make_profile: MakeProfile) -> None:
    with PostgresSource(make_profile(body(upstream))) as src:
        assert isinstance(make_source(src.profile), PostgresSource)
        daily = src.fetch(Segment("AAPL", "1d", NOV))
        assert daily.schema.equals(DAILY_SCHEMA)
        assert daily.column("date").to_pylist() == [dt.date(2024, 11, 26), dt.date(2024, 11, 27)]
        assert daily.column("volume").to_pylist() == [1000, 2000]
        assert src.fetch(Segment("AAPL", "1d", dt.date(2024, 10, 1))).num_rows == 1
        minute = src.fetch(Segment("AAPL", "1m", NOV))
        assert minute.schema.equals(MINUTE_SCHEMA)
        utc = [t.isoformat() for t in minute.column("ts").to_pylist()]
        assert utc == ["2024-11-29T14:30:00+00:00", "2024-11-29T17:59:00+00:00"]
        assert src.fetch(Segment("MSFT", "1m", NOV)).num_rows == 0


def test_version_changes_with_upstream_rows(upstream: str, make_profile: MakeProfile) -> None:
    with PostgresSource(make_profile(body(upstream))) as src:
        seg, other = Segment("MSFT", "1d", NOV), Segment("AAPL", "1d", NOV)
        v_seg, v_other = src.version(seg), src.version(other)
        with psycopg.connect(upstream, autocommit=True) as conn:
            conn.execute("""INSERT INTO prod."Daily Bars" VALUES ('MSFT', '2024-11-26', 1, 2, 0.5, 1, 5)""")
        assert src.version(seg) != v_seg
        assert src.version(other) == v_other
        assert src.fetch(seg).num_rows == 2
    pinned = make_source(
        make_profile(body(upstream, '  version: "v1"\n  version_query: false\n'), name="pinned")
    )
    bumped = make_source(
        make_profile(body(upstream, '  version: "v2"\n  version_query: false\n'), name="bumped")
    )
    assert pinned.version(seg) != bumped.version(seg)


def test_bad_table_and_unreachable_server_are_source_errors(upstream: str, make_profile: MakeProfile) -> None:
    with PostgresSource(make_profile(body(upstream).replace("prod.minute_bars", "prod.nope"))) as src:
        with pytest.raises(SourceError, match="nope"):
            src.fetch(Segment("AAPL", "1m", NOV))
        # the connection survives a failed query (autocommit): the next segment still loads
        assert src.fetch(Segment("AAPL", "1d", NOV)).num_rows == 2
    dead = PostgresSource(make_profile(body("host=127.0.0.1 port=1 user=x dbname=x")))
    with dead, pytest.raises(SourceError, match="cannot connect"):
        dead.fetch(Segment("AAPL", "1d", NOV))


def test_upstream_failures_are_one_line_and_never_show_the_password(
    upstream: str, make_profile: MakeProfile
) -> None:
    # The server's message came with its LINE and caret lines (three lines); a connection string libpq could
    # not parse was a ProgrammingError traceback quoting the piece after the password's space.
    with PostgresSource(make_profile(body(upstream).replace("prod.minute_bars", "prod.nope"))) as src:
        for ask in (src.fetch, src.version):
            with pytest.raises(SourceError) as info:
                ask(Segment("AAPL", "1m", NOV))
            assert (
                str(info.value)
                == 'postgres:prod.nope: upstream query failed: relation "prod.nope" does not exist'
            )
    port = upstream.split("port=")[1].split()[0]
    unquoted = f"host=127.0.0.1 port={port} user=postgres password=sekrit 123 dbname=postgres"
    with PostgresSource(make_profile(body(unquoted), name="unquoted")) as src:
        with pytest.raises(SourceError) as info:
            src.fetch(Segment("AAPL", "1d", NOV))
        message = str(info.value)
        assert message.startswith("source.dsn: not a PostgreSQL connection string") and "\n" not in message
        assert "sekrit" not in message and "123" not in message
    # A wrong password (the server asks for one from this role) and a connection ended mid-fetch: one line.
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS pw_check")
        conn.execute("CREATE ROLE pw_check LOGIN PASSWORD 'right-one'")
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])  # type: ignore[index]
        rules = hba.read_text()
        hba.write_text(f"host all pw_check 127.0.0.1/32 scram-sha-256\n{rules}")
        conn.execute("SELECT pg_reload_conf()")
    try:
        wrong = f"postgresql://pw_check:wrong-one@127.0.0.1:{port}/postgres"
        with PostgresSource(make_profile(body(wrong), name="wrong")) as src:
            with pytest.raises(SourceError) as info:
                src.fetch(Segment("AAPL", "1d", NOV))
            message = str(info.value)
            assert 'password authentication failed for user "pw_check"' in message and "\n" not in message
            assert "wrong-one" not in message
    finally:
        hba.write_text(rules)
        with psycopg.connect(upstream, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("DROP ROLE pw_check")
    slow = (
        '  queries: {1d: "SELECT *, pg_sleep(30) FROM (SELECT day AS date, o AS open, h AS high, l AS low,'
        ' c AS close, vol AS volume FROM prod.\\"Daily Bars\\" WHERE ticker = %(symbol)s AND day >= %(start)s'
        ' AND day < %(end)s) AS bars"}\n'
    )
    with PostgresSource(make_profile(body(upstream, slow), name="slow")) as src:
        ended = threading.Thread(target=_end_sleepers, args=[upstream])
        ended.start()
        try:
            with pytest.raises(SourceError) as info:
                src.fetch(Segment("AAPL", "1d", NOV))
        finally:
            ended.join()
        assert str(info.value) == (
            "postgres:source.queries.1d: upstream query failed: terminating connection due to administrator command"
        )


def test_a_password_with_an_unescaped_at_is_refused_without_showing_it(make_profile: MakeProfile) -> None:
    # libpq cuts a URL at the password's first '@': the rest became the host, and its 'could not translate host
    # name "s3cr3t@localhost"' was the message.
    for dsn in (
        "postgresql://postgres:pw@s3cr3t@localhost/postgres",
        "postgresql://postgres:pw@s3:cr3t@localhost/x",
    ):
        with PostgresSource(make_profile(body(dsn), name="at")) as src:
            for ask in (src.fetch, src.version):
                with pytest.raises(SourceError) as info:
                    ask(Segment("AAPL", "1d", NOV))
                message = str(info.value)
                assert message.startswith("source.dsn: its ") and "\n" not in message, message
                assert "%-escape special characters in the password" in message, message
                assert "cr3t" not in message and "pw" not in message, message


@pytest.mark.parametrize(("server_version", "shown"), [(130011, "13.11"), (120000, "12.0"), (90624, "9.6")])
def test_an_upstream_server_before_14_is_one_line_naming_its_version(server_version: int, shown: str) -> None:
    # No server before 14 here: the version it reports is what decides (PostgreSQL 15 upstream, above, passes).
    refused = _version_query_refused(server_version)
    assert refused is not None and str(refused).startswith(
        f"source.version_query: the upstream server is PostgreSQL {shown}; the version query needs 14 or later"
    )
    assert "\n" not in str(refused) and "version_query: false" in str(refused)
    assert _version_query_refused(140000) is None and _version_query_refused(150004) is None


def test_an_upstream_value_of_the_wrong_type_names_the_table_and_the_value(
    upstream: str, make_profile: MakeProfile
) -> None:
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute("""
            DROP TABLE IF EXISTS prod.text_bars;
            CREATE TABLE prod.text_bars (ticker text, day date, o text, h text, l text, c text, vol text);
            INSERT INTO prod.text_bars VALUES ('AAPL', '2024-11-26', '10', '11', '9', 'abc', '5');
        """)
    src = PostgresSource(make_profile(body(upstream).replace("prod.Daily Bars", "prod.text_bars")))
    with src, pytest.raises(SourceError) as info:
        src.fetch(Segment("AAPL", "1d", NOV))
    assert str(info.value) == (
        'postgres:prod.text_bars: upstream query failed: invalid input syntax for type double precision: "abc"'
    )


def undated_tables(upstream: str) -> None:
    """prod.undated_daily and prod.undated_minute: the bars and one AAPL row without a day or time."""
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute("""
            DROP TABLE IF EXISTS prod.undated_daily, prod.undated_minute;
            CREATE TABLE prod.undated_daily AS SELECT * FROM prod."Daily Bars";
            INSERT INTO prod.undated_daily VALUES ('AAPL', NULL, 9, 10, 8, 9.5, 100);
            CREATE TABLE prod.undated_minute AS SELECT * FROM prod.minute_bars;
            INSERT INTO prod.undated_minute VALUES ('AAPL', NULL, 1, 2, 0.5, 1.5, 7);
        """)


def test_upstream_rows_without_a_time_are_bad_rows_of_the_first_segment(
    upstream: str, make_profile: MakeProfile
) -> None:
    # A NULL day or time is in no month's range: the row was never selected and never reported, where the
    # files source charges a date that does not parse to the symbol's first segment as a bad row.
    undated_tables(upstream)
    text = body(upstream).replace("prod.Daily Bars", "prod.undated_daily")
    text = text.replace("prod.minute_bars", "prod.undated_minute")
    october = dt.date(2024, 10, 1)
    with PostgresSource(make_profile(text)) as src:
        for timeframe, column in (("1d", "date"), ("1m", "ts")):
            with pytest.raises(SourceError, match=f"{column}=None: breaks the rule {column} parses"):
                src.fetch(Segment("AAPL", timeframe, october))
        assert src.fetch(Segment("AAPL", "1d", NOV)).num_rows == 2  # a later month: its own rows only
    with PostgresSource(make_profile(text + "  on_bad_rows: skip\n", name="skip")) as src:
        assert src.fetch(Segment("AAPL", "1d", october)).column("date").to_pylist() == [dt.date(2024, 10, 31)]
        assert src.fetch(Segment("AAPL", "1m", october)).num_rows == 0
        assert [(r.reason, r.rows) for r in src.reports] == [
            ("date parses as a date", 1),
            ("ts parses as a timestamp", 1),
        ]


def test_rows_without_a_time_go_to_the_first_segment_with_sessions(
    upstream: str, make_profile: MakeProfile
) -> None:
    # A profile starting on November's last day, a Saturday: November's minute segment has no session and is
    # never queried, and it was the one to take the rows without a time: they vanished unreported.
    undated_tables(upstream)
    text = body(upstream).replace("prod.minute_bars", "prod.undated_minute")
    text = text.replace("start: 2024-10-01\nend: 2024-11-30", "start: 2024-11-30\nend: 2024-12-31")
    dec = dt.date(2024, 12, 1)
    with PostgresSource(make_profile(text + "  on_bad_rows: skip\n")) as src:
        assert src.fetch(Segment("AAPL", "1m", NOV)).num_rows == 0  # no session
        assert src.fetch(Segment("AAPL", "1m", dec)).num_rows == 1  # 2024-12-02 09:30
        assert [(r.reason, r.rows) for r in src.reports] == [("ts parses as a timestamp", 1)]


def _end_sleepers(dsn: str) -> None:
    """End the upstream sessions running the slow query, once one runs. Polled: a fixed second raced the fetch's
    start, and a fetch that began its query after it slept 30 s a row and returned (DID NOT RAISE)."""
    deadline = time.monotonic() + 120
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE state = 'active' AND query LIKE '%%pg_sleep(30)%%' AND pid <> pg_backend_pid()"
        ).fetchall():
            if time.monotonic() > deadline:  # the fetch sleeps its 60 s out, and its test fails
                return
            time.sleep(0.01)


BAD_SETUP = """
DROP TABLE IF EXISTS prod.bad_bars;
CREATE TABLE prod.bad_bars (ticker text, day date, o float8, h float8, l float8, c float8, vol float8);
INSERT INTO prod.bad_bars VALUES
  ('AAPL', '2024-11-25', 10, 11, 9, 10.5, 1000),
  ('AAPL', '2024-11-26', 10, 8, 9, 10.5, 1000),
  ('AAPL', '2024-11-27', 10, 11, 9, NULL, 1000),
  ('AAPL', '2024-11-29', 10, 11, 9, 10.5, 1000.4);
"""
QUERY = (
    "SELECT day AS date, o AS open, h AS high, l AS low, c AS close, vol AS volume FROM prod.bad_bars "
    "WHERE ticker = %(symbol)s AND day >= %(start)s AND day < %(end)s ORDER BY day"
)


def test_upstream_rows_are_validated_under_each_policy(upstream: str, make_profile: MakeProfile) -> None:
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute(BAD_SETUP)
    extra = f'  queries: {{1d: "{QUERY}"}}\n'
    source = make_source(make_profile(body(upstream, extra)))
    with source, pytest.raises(SourceError) as info:
        source.fetch(Segment("AAPL", "1d", NOV))
    message = str(info.value)
    assert "postgres:source.queries.1d: row date=2024-11-26: high=8.0" in message
    assert "high >= max(open, close)" in message and "3 bad rows" in message
    with make_source(make_profile(body(upstream, extra + "  on_bad_rows: quarantine\n"))) as source:
        table = source.fetch(Segment("AAPL", "1d", NOV))
        assert table.column("date").to_pylist() == [dt.date(2024, 11, 25)]
        rules = sorted(r.rule for r in source.rejects[Segment("AAPL", "1d", NOV)])
        # 1000.4 was loaded as 1000 (rounded into the bigint column)
        assert rules == ["close is a finite number", "high >= max(open, close)", "volume is a whole number"]


def test_custom_query_gets_its_values_as_parameters(upstream: str, make_profile: MakeProfile) -> None:
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute(BAD_SETUP)
        conn.execute("DELETE FROM prod.bad_bars WHERE day > '2024-11-25'")
    # a symbol that would break a formatted query is just a value here
    extra = f'  queries: {{1d: "{QUERY}"}}\n'
    with make_source(make_profile(body(upstream, extra))) as source:
        assert source.fetch(Segment("AAPL", "1d", NOV)).num_rows == 1
        assert source.fetch(Segment("MSFT", "1d", NOV)).num_rows == 0
        assert source.version(Segment("AAPL", "1d", NOV)).startswith("postgres/")
    bad = extra.replace("vol AS volume", "vol AS vol")
    source = make_source(make_profile(body(upstream, bad)))
    with source, pytest.raises(SourceError, match=r"source.queries.1d: the query returns no column 'volume'"):
        source.fetch(Segment("AAPL", "1d", NOV))


DAILY_QUERY = (
    'SELECT day AS date, o AS open, h AS high, l AS low, c AS close, vol AS volume FROM prod."Daily Bars" '
    "WHERE ticker = %(symbol)s AND day >= %(start)s AND day < %(end)s"
)


@pytest.mark.parametrize(
    "written",
    [
        # pasted from psql: the version query's subquery said 'syntax error at or near ";"', a fetch ran it
        f"    1d: |\n      {DAILY_QUERY};\n",
        f"    1d: |\n      {DAILY_QUERY} ;\n\n",
        # YAML's >- (the docs' own example) folds a last `-- comment` line onto the query's: it commented out the
        # subquery's ')'
        f"    1d: >-\n      {DAILY_QUERY}\n      -- November's bars\n",
        # the ';' kept when a comment followed it: the subquery's syntax error again
        f"    1d: |\n      {DAILY_QUERY}; -- November's bars\n",
        f"    1d: |\n      {DAILY_QUERY};\n      /* daily /* nested */ bars; */\n      -- November\n\n",
    ],
    ids=["a semicolon", "a semicolon and blank lines", "a folded comment", "a line comment", "comments"],
)
def test_a_custom_query_as_written_in_psql_is_versioned_and_fetched(
    upstream: str, make_profile: MakeProfile, written: str
) -> None:
    with make_source(make_profile(body(upstream, f"  queries:\n{written}"))) as source:
        assert source.version(Segment("AAPL", "1d", NOV)).startswith("postgres/")
        assert source.fetch(Segment("AAPL", "1d", NOV)).num_rows == 2


@pytest.mark.parametrize(
    ("written", "body"),
    [
        ("SELECT 1; -- one\n/* a; */ ;\n", "SELECT 1"),
        ("SELECT ';' -- a literal\n", "SELECT ';'"),
        ("SELECT 'it''s --', \"a;\" ;", "SELECT 'it''s --', \"a;\""),
        ("SELECT E'\\';'; /* */", "SELECT E'\\';'"),
        ("SELECT $q$ ; -- $q$;", "SELECT $q$ ; -- $q$"),
        ("SELECT 1 /* a /* nested */ comment; */", "SELECT 1"),
    ],
)
def test_a_statement_body_ends_at_its_last_sql_not_in_a_literal_or_comment(written: str, body: str) -> None:
    assert statement_body(written) == body


@pytest.mark.parametrize(
    ("query", "said"),
    [
        (
            f"{DAILY_QUERY} AND ticker LIKE 'A%'",
            "only '%s', '%b', '%t' are allowed as placeholders, got '%''",
        ),
        (DAILY_QUERY.replace("%(symbol)s", "%(ticker)s"), "query parameter missing: ticker"),
    ],
)
def test_a_custom_querys_placeholder_error_names_the_values_sent(
    upstream: str, make_profile: MakeProfile, query: str, said: str
) -> None:
    # psycopg's words alone did not say which placeholders refresher fills, nor how to write a literal %
    source = make_source(make_profile(body(upstream, f"  queries:\n    1d: |\n      {query}\n")))
    with source, pytest.raises(SourceError) as info:
        source.fetch(Segment("AAPL", "1d", NOV))
    assert str(info.value) == (
        f"postgres:source.queries.1d: upstream query failed: {said}; its values are %(symbol)s, %(start)s and "
        "%(end)s, and a literal % is written %%"
    )


def test_an_unknown_time_zone_is_refused_before_connecting(make_profile: MakeProfile) -> None:
    body = "universe: {symbols: [AAPL]}\nmonths: 1\nas_of: 2024-11-29\nsource:\n  kind: postgres\n"
    with pytest.raises(SourceError, match=r"^source.tz='Mars/Base': unknown time zone"):
        PostgresSource(make_profile(body + "  dsn: host=nowhere.invalid\n  tz: Mars/Base\n"))


@pytest.mark.parametrize(
    ("volume", "kind"), [("vol > 0", "bool"), ("make_interval(secs => vol)", "timedelta")]
)
def test_a_value_column_that_is_not_numbers_is_one_line(
    upstream: str, make_profile: MakeProfile, volume: str, kind: str
) -> None:
    # pandas turned true into a volume of 1 and an interval into nanoseconds, loaded silently
    query = (
        f'SELECT day AS date, o AS open, h AS high, l AS low, c AS close, {volume} AS volume FROM prod."Daily Bars" '
        "WHERE ticker = %(symbol)s AND day >= %(start)s AND day < %(end)s"
    )
    source = make_source(make_profile(body(upstream, f"  queries: {{1d: '{query}'}}\n")))
    with source, pytest.raises(SourceError) as caught:
        source.fetch(Segment("AAPL", "1d", NOV))
    assert (
        str(caught.value) == f"postgres:source.queries.1d: column 'volume' holds {kind} values, not numbers"
    )


def test_a_corrected_close_upstream_reloads_exactly_its_segment(upstream: str) -> None:
    # Same rows, same latest date, one changed close: count(*) and max(date) alone did not see it, so the
    # old value stayed until the profile's `version:` was bumped.
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS prod.corrected")
        conn.execute('CREATE TABLE prod.corrected (LIKE prod."Daily Bars")')
        conn.execute("""INSERT INTO prod.corrected SELECT * FROM prod."Daily Bars" WHERE ticker = 'AAPL'""")
        conn.execute("INSERT INTO prod.corrected VALUES ('MSFT', '2024-11-27', 400, 410, 390, 405, 300)")
    root = world_traversable_tmp("refresher-pg-source-")
    (root / "corrected.yaml").write_text(
        body(upstream).replace("prod.Daily Bars", "prod.corrected") + "timeframes: [1d]\n"
    )
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    try:
        profile = load_profile(str(root / "corrected.yaml"), [])
        first = refresh(profile, engine, store)
        assert first.segments.loaded == 4  # AAPL and MSFT, October and November
        with psycopg.connect(upstream, autocommit=True) as conn:
            conn.execute("UPDATE prod.corrected SET c = 10.75 WHERE ticker = 'AAPL' AND day = '2024-11-26'")
        again = refresh(profile, engine, store)
        assert (again.segments.loaded, again.rows_loaded) == (1, 2)  # AAPL's November, nothing else
        with psycopg.connect(engine.start(profile.name).dsn()) as conn:
            closes = conn.execute(
                "SELECT date, close FROM ohlcv_daily WHERE symbol = 'AAPL' ORDER BY date"
            ).fetchall()
        assert closes == [
            (dt.date(2024, 10, 31), 9.5),
            (NOV.replace(day=26), 10.75),
            (NOV.replace(day=27), 11.0),
        ]
    finally:
        for status in engine.status():
            engine.stop(status.profile)


TZ_SETUP = """
DROP TABLE IF EXISTS prod.daily_tz;
CREATE TABLE prod.daily_tz (ticker text, day timestamptz, o float8, h float8, l float8, c float8, vol float8);
INSERT INTO prod.daily_tz VALUES
  ('7203', '2024-10-31 00:00 Asia/Tokyo', 1, 2, 0.5, 1.5, 10),
  ('7203', '2024-11-01 00:00 Asia/Tokyo', 1, 2, 0.5, 1.5, 11),
  ('7203', '2024-11-29 00:00 Asia/Tokyo', 1, 2, 0.5, 1.5, 12),
  ('AAPL', '2024-11-01 00:00 America/New_York', 1, 2, 0.5, 1.5, 20),
  ('AAPL', '2024-11-29 20:00 America/New_York', 1, 2, 0.5, 1.5, 21);
"""
TZ_QUERY = QUERY.replace("prod.bad_bars", "prod.daily_tz")


@pytest.mark.parametrize("custom", [False, True], ids=["table", "query"])
@pytest.mark.parametrize(
    ("exchange", "symbol", "dates"),
    [("XTKS", "7203", [NOV, NOV.replace(day=29)]), ("XNYS", "AAPL", [NOV, NOV.replace(day=29)])],
)
def test_a_timestamptz_daily_column_is_dated_in_the_exchanges_zone(
    upstream: str, make_profile: MakeProfile, exchange: str, symbol: str, dates: list[dt.date], custom: bool
) -> None:
    # A bar at Tokyo's midnight is the previous day in UTC: it was dated a day early, or fell out of its month.
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute(TZ_SETUP)
    source = (
        f'source:\n  kind: postgres\n  dsn: "{upstream}"\n  daily_table: prod.daily_tz\n'
        "  minute_table: prod.minute_bars\n"
        "  columns: {symbol: ticker, date: day, ts: time, open: o, high: h, low: l, close: c, volume: vol}\n"
    )
    if custom:
        source += f'  queries: {{1d: "{TZ_QUERY}"}}\n'
    profile = make_profile(
        f"universe: {{symbols: ['{symbol}']}}\nexchange: {exchange}\nstart: 2024-10-01\nend: 2024-11-30\n"
        f"timeframes: [1d]\n{source}"
    )
    with PostgresSource(profile) as src:
        november = Segment(symbol, "1d", NOV)
        assert src.fetch(november).column("date").to_pylist() == dates
        version = src.version(november)
        assert src.fetch(Segment(symbol, "1m", NOV)).num_rows == 0  # a minute query between the two
        assert src.version(november) == version


def test_an_upstream_null_price_is_shown_as_none_not_nan(upstream: str, make_profile: MakeProfile) -> None:
    # a double precision column: pandas made the NULL beside numbers NaN, and the line said open=nan, a value no
    # upstream row holds (a NULL time already said None)
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute("""
            DROP TABLE IF EXISTS prod.null_price;
            CREATE TABLE prod.null_price (ticker text, day date, o float8, h float8, l float8, c float8, vol float8);
            INSERT INTO prod.null_price VALUES
              ('AAPL', '2024-11-26', 10, 11, 9, 10.5, 1000), ('AAPL', '2024-11-27', NULL, 12, 10, 11, 2000);
        """)
    text = body(upstream).replace("prod.Daily Bars", "prod.null_price")
    with PostgresSource(make_profile(text)) as src, pytest.raises(SourceError) as info:
        src.fetch(Segment("AAPL", "1d", NOV))
    assert str(info.value).startswith(
        "postgres:prod.null_price: row date=2024-11-27: open=None: breaks the rule open is a finite number"
    ), info.value
