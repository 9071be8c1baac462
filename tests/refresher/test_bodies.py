"""Minute segments loaded from the COPY bodies the store keeps (``refresher.bodies``), on a real server: the same
rows as the Parquet path, and any body that cannot be trusted falls back to it."""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from featurestore import FeatureStore
from refresher import bodies, load
from refresher.body_keys import Wanted
from refresher.database import ensure_schema
from refresher.engines.base import ServerInfo
from refresher.errors import LoadError
from refresher.load import SegmentLoad, load_segments
from refresher.partitions import existing_months
from refresher.segments import Segment
from tests.child_processes import outputs
from tests.fixtures_postgres import minute_bars

pytestmark = pytest.mark.postgres
REPO = Path(__file__).resolve().parents[2]
NY = "America/New_York"
JAN = dt.date(2024, 1, 1)
OPEN_JAN_2 = dt.datetime(2024, 1, 2, 14, 30, tzinfo=dt.UTC)
SYMBOLS = ["AAPL", "KO", "MSFT"]


@pytest.fixture
def databases(pg_server: ServerInfo) -> Iterator[Any]:
    """Fresh databases on the session server, made on demand (``make()``), each with the schema; dropped after."""
    made: list[str] = []
    conns: list[psycopg.Connection[Any]] = []

    def make() -> psycopg.Connection[Any]:
        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        conn = psycopg.connect(replace(pg_server, dbname=name).dsn(), autocommit=True)
        conns.append(conn)
        ensure_schema(conn)
        return conn

    yield make
    for conn in conns:
        conn.close()
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        for name in made:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path / "store", pack_max_rows=0)  # minute segments have files of their own


def _key(symbol: str) -> str:
    return f"{symbol}-1m-2024-01"


def _stored(store: FeatureStore, n: int = 2_000) -> list[SegmentLoad]:
    """The three symbols' January minute segments, put in the store: the loads a fetch makes of them."""
    tables = [minute_bars(symbol, OPEN_JAN_2, n, seed=k) for k, symbol in enumerate(SYMBOLS)]
    hashes = store.put_many_hashes([(_key(s), t, s) for s, t in zip(SYMBOLS, tables, strict=True)])
    return [
        SegmentLoad(Segment(s, "1m", JAN), t, h, NY) for s, t, h in zip(SYMBOLS, tables, hashes, strict=True)
    ]


def _from_store(store: FeatureStore, items: list[SegmentLoad]) -> list[SegmentLoad]:
    """The same segments as a warm load reads them: a body where the store keeps one, else the table."""
    kept = bodies.stored_bodies(store, [_key(item.segment.symbol) for item in items])
    return [replace(item, table=kept.get(_key(item.segment.symbol), item.table)) for item in items]


def _wanted(symbols: list[str] = SYMBOLS) -> list[Wanted]:
    """The refill's list of the January minute segments of ``symbols`` (``refresher.body_keys``)."""
    return [Wanted(_key(symbol), symbol, "2024-01", NY) for symbol in symbols]


def _kept(store: FeatureStore, items: list[SegmentLoad], conn: psycopg.Connection[Any]) -> None:
    """Load ``items`` as a cold refresh does (no body made), then make their bodies as its refill does."""
    before = store.get_cache_stats().bodies.entries
    load_segments(conn, items)
    assert store.get_cache_stats().bodies.entries == before  # a load makes none
    bodies.make_bodies(store, _wanted([item.segment.symbol for item in items]))


def _rows(conn: psycopg.Connection[Any]) -> tuple[list[Any], list[Any]]:
    return (
        conn.execute("SELECT * FROM ohlcv_1min ORDER BY symbol, ts").fetchall(),
        conn.execute(
            "SELECT symbol, timeframe, month, content_hash, rows FROM refresher_segments ORDER BY 1"
        ).fetchall(),
    )


def _damage(path: Path, how: str) -> None:
    """A stored Parquet file "gone", or with one byte "flipped" inside: the store's read evicts either."""
    if how == "gone":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))


def _no_arrow(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every Arrow COPY and every read of a stored table: a load by bodies makes neither."""
    used: list[str] = []
    copy_arrow, get_many = load.copy_arrow, FeatureStore.get_many

    def copying(conn: Any, table: str, *args: Any, **kwargs: Any) -> None:
        used.append(f"copy {table}")
        copy_arrow(conn, table, *args, **kwargs)

    def reading(self: FeatureStore, keys: Any, **kwargs: Any) -> Any:
        keys = list(keys)
        used.extend(f"read {key}" for key in keys)
        return get_many(self, keys, **kwargs)

    monkeypatch.setattr(load, "copy_arrow", copying)
    monkeypatch.setattr(FeatureStore, "get_many", reading)
    return used


def test_a_warm_load_sends_the_kept_bodies_and_loads_the_rows_of_the_parquet_path(
    store: FeatureStore, databases: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = _stored(store)
    first = databases()
    _kept(store, items, first)  # the cold load: its rows through pgpq, each segment's body kept
    assert all(
        (p := store.body_path(item.content_hash, bodies.layout())) is not None and p.exists()
        for item in items
    )
    assert store.get_cache_stats().bodies.entries == 3
    warm = _from_store(store, items)
    assert all(isinstance(item.table, bodies.StoredBody) for item in warm)
    used = _no_arrow(monkeypatch)
    second = databases()
    outcome = load_segments(second, warm)
    assert used == []  # no Parquet read, no encoding: the bodies as they are
    assert outcome.rows == (2_000, 2_000, 2_000)
    assert existing_months(second, "ohlcv_1min") == {JAN}  # a partition of its own, filled with COPY FREEZE
    assert _rows(second) == _rows(first)  # value for value, and the ledger's hashes and counts
    monkeypatch.undo()
    # Through the parent too, when the default partition holds a row of the month (inserted by hand).
    third = databases()
    third.execute(
        "INSERT INTO ohlcv_1min VALUES ('ZZZ', '2024-01-30 15:00+00', 1, 1, 1, 1, 1)"  # symbol, ts, ohlcv
    )
    load_segments(third, _from_store(store, items))
    assert existing_months(third, "ohlcv_1min") == set()
    rows, ledger = _rows(third)
    assert [r for r in rows if r[0] != "ZZZ"] == _rows(first)[0] and ledger == _rows(first)[1]


@pytest.mark.parametrize("damage", ["flip", "truncate", "version"])
def test_a_damaged_body_is_removed_and_the_segment_loads_from_its_parquet_file(
    store: FeatureStore, databases: Any, damage: str
) -> None:
    items = _stored(store)
    first = databases()
    _kept(store, items, first)
    path = store.body_path(items[1].content_hash, bodies.layout())
    assert path is not None
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-1]))
    else:  # a body another encoder made, under this layout's name: its header says its layout is not ours
        store.put_bodies([(items[1].content_hash, 2_000, b"\x00" * 64)], "an-older-layout")
        other = store.body_path(items[1].content_hash, "an-older-layout")
        assert other is not None
        other.replace(path)
    warm = _from_store(store, items)
    assert [isinstance(item.table, bodies.StoredBody) for item in warm] == [True, False, True]
    assert not path.exists()
    second = databases()
    load_segments(second, warm)
    assert _rows(second) == _rows(first)
    # the refill makes its body again
    third = databases()
    _kept(store, _from_store(store, items), third)
    assert path.exists() and _rows(third) == _rows(first)


def test_a_body_of_other_rows_than_its_entry_says_loads_nothing(store: FeatureStore, databases: Any) -> None:
    """The last guard: the COPY's row count against the manifest's. A body whose checksum holds but whose bytes
    are not its entry's rows (a writer's bug) fails the batch, nothing loaded."""
    items = _stored(store)
    _kept(store, items, databases())
    warm = _from_store(store, items)
    short = warm[0].table
    assert isinstance(short, bodies.StoredBody)
    one_row = len(bytes(short.body.raw)) // 2_000  # every row of these bars encodes to the same length
    cut = replace(short, body=replace(short.body, raw=short.body.raw[:-one_row]))
    conn = databases()
    with pytest.raises(LoadError, match="the COPY read 5999 rows where the store's segments hold 6000"):
        load_segments(conn, [replace(warm[0], table=cut), *warm[1:]])
    assert _rows(conn) == ([], []) and existing_months(conn, "ohlcv_1min") == set()


def test_a_body_is_read_as_its_table_where_the_batch_cannot_send_it(
    store: FeatureStore, databases: Any
) -> None:
    """A month that exists already, a segment the ledger holds, a body whose entry is not the segment's: the
    stored table is read and loaded as before."""
    items = _stored(store)
    first = databases()
    _kept(store, items, first)
    conn = databases()
    load_segments(conn, items[:1])  # January exists now
    load_segments(conn, _from_store(store, items))
    assert _rows(conn) == _rows(first)
    # a body offered for another symbol's segment (its entry's symbol is not the segment's): not sent
    conn = databases()
    warm = _from_store(store, items)
    swapped = replace(warm[0], segment=Segment("KO", "1m", JAN), content_hash=items[1].content_hash)
    # a body of January's rows offered for February's segment: outside it, read as its table and refused so
    february = replace(warm[0], segment=Segment("AAPL", "1m", dt.date(2024, 2, 1)))
    with pytest.raises(LoadError, match="fall outside the segment"):
        load_segments(conn, [february])
    with pytest.raises(LoadError, match="rows of other symbols"):  # read as its table: AAPL's rows, refused
        load_segments(conn, [swapped])


def test_bodies_concatenated_are_the_months_copy_stream(store: FeatureStore) -> None:
    """What makes a month's COPY of segment bodies pgpq's own: the header and trailer it writes, and each
    segment's rows encoded alone are the same bytes as in the month's table encoded whole."""
    from pgpq import ArrowToPostgresBinaryEncoder

    tables = [item.table for item in _stored(store)]
    assert all(isinstance(t, pa.Table) for t in tables)
    whole = pa.concat_tables(tables)  # type: ignore[arg-type]
    encoder = ArrowToPostgresBinaryEncoder(whole.schema)
    stream = (
        encoder.write_header()
        + b"".join(encoder.write_batch(b) for b in whole.to_batches())
        + encoder.finish()
    )
    mine = bodies.HEADER + b"".join(bodies.encode(t) for t in tables) + bodies.TRAILER  # type: ignore[arg-type]
    assert mine == stream


def test_a_body_decodes_to_its_rows(store: FeatureStore) -> None:
    for item in _stored(store, n=500):
        assert isinstance(item.table, pa.Table)
        raw = bodies.encode(item.table)
        assert bodies.decode(raw, 500) == item.table
        assert bodies.decode(raw, 499) is None and bodies.decode(raw[:-1], 500) is None
    # Two symbols' rows in one body are not a segment's.
    two = bodies.encode(minute_bars("AB", OPEN_JAN_2, 10)) + bodies.encode(minute_bars("CD", OPEN_JAN_2, 10))
    assert bodies.decode(two, 20) is None


@pytest.mark.parametrize("damage", ["gone", "flipped"])
def test_a_segment_whose_parquet_file_is_lost_loads_from_its_body_and_is_stored_again(
    store: FeatureStore, databases: Any, damage: str
) -> None:
    """A batch that cannot send the body (its month exists) reads the table; the file gone or damaged since the
    body was read (the store evicts it), the body's rows are the table, their content hash the entry's, and the
    store gets its file back."""
    items = _stored(store)
    first = databases()
    _kept(store, items, first)
    warm = _from_store(store, items)
    entry = store.lookup([_key("KO")])[_key("KO")]
    _damage(entry.path, damage)
    conn = databases()
    load_segments(conn, items[:1])  # January exists: the others are read as tables
    load_segments(conn, warm[1:])
    assert _rows(conn) == _rows(first)
    assert store.get(_key("KO")) == items[1].table
    assert store.validate_cache_integrity().ok


@pytest.mark.parametrize("damage", ["gone", "flipped"])
def test_make_bodies_skips_a_segment_it_cannot_read_in_one_line_and_makes_the_others(
    store: FeatureStore, damage: str
) -> None:
    """The refill's bodies are made from the verified Parquet files: one gone or damaged (evicted by the read)
    is one line of its log and no body, never a half-written one; the others are made and sound."""
    items = _stored(store)
    entry = store.lookup([_key("KO")])[_key("KO")]
    _damage(entry.path, damage)
    said: list[str] = []
    assert bodies.make_bodies(store, _wanted(), say=said.append) == 2
    assert len(said) == 1 and "KO/1m/2024-01" in said[0] and "gone or damaged" in said[0]
    found = store.read_bodies([_key(symbol) for symbol in SYMBOLS], bodies.layout())
    assert sorted(found) == [_key("AAPL"), _key("MSFT")]
    for item in (items[0], items[2]):
        _entry, body = found[_key(item.segment.symbol)]
        assert isinstance(item.table, pa.Table) and bodies.decode(body.raw, body.rows) == item.table
    ko = store.body_path(items[1].content_hash, bodies.layout())
    assert ko is not None and not ko.exists() and list(ko.parent.glob("*.tmp")) == []


def test_make_bodies_skips_a_sound_body_and_makes_a_damaged_one_again(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = _stored(store)
    assert bodies.make_bodies(store, _wanted()) == 3
    path = store.body_path(items[0].content_hash, bodies.layout())
    assert path is not None
    path.write_bytes(path.read_bytes()[:-1])
    used = _no_arrow(monkeypatch)
    assert bodies.make_bodies(store, _wanted()) == 1
    assert used == [f"read {_key('AAPL')}"]  # the sound ones' files are not read
    assert len(store.read_bodies([_key(symbol) for symbol in SYMBOLS], bodies.layout())) == 3


def test_two_refills_making_the_same_bodies_at_once_leave_them_sound(store: FeatureStore) -> None:
    """Two refills (two refreshes' of one store) make the same bodies at once, again and again: each body read
    back, during and after, is whole and the segment's rows."""
    import os
    import subprocess
    import sys
    import textwrap

    repo = Path(__file__).resolve().parents[2]
    items = _stored(store, n=5_000)
    code = textwrap.dedent(
        f"""
        import shutil
        from pathlib import Path
        from featurestore import FeatureStore
        from refresher import bodies
        from refresher.body_keys import Wanted
        store = FeatureStore({str(store.root)!r}, pack_max_rows=0)
        wanted = [Wanted(f"{{s}}-1m-2024-01", s, "2024-01", {NY!r}) for s in {SYMBOLS!r}]
        for _ in range(15):
            for path in (Path({str(store.root)!r}) / "bodies").glob("*/*.body"):
                path.unlink(missing_ok=True)
            bodies.make_bodies(store, wanted)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(repo)}
    makers = [subprocess.Popen([sys.executable, "-c", code], cwd=repo, env=env) for _ in range(2)]
    tables = {_key(item.segment.symbol): item.table for item in items}
    reads = 0
    while any(maker.poll() is None for maker in makers):
        for key, (_entry, body) in store.read_bodies(list(tables), bodies.layout()).items():
            assert bodies.decode(body.raw, body.rows) == tables[key]
            reads += 1
    assert [maker.wait() for maker in makers] == [0, 0]
    bodies.make_bodies(store, _wanted())
    found = store.read_bodies(list(tables), bodies.layout())
    assert len(found) == 3
    assert all(bodies.decode(body.raw, body.rows) == tables[key] for key, (_e, body) in found.items())


def test_a_list_noted_while_a_refill_leaves_its_own_keeps_what_it_noted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh notes a segment (``body_keys.add``) while a refill leaves its list (``finished``: the one it
    could not make), between the refill's check that the list is still the one it read and its rename. Before:
    the rename went over the refresh's list, and the segment only that one listed was lost until a load listed it
    again. Now the writers take turns: the refresh's waits, then merges with what the refill left."""
    import contextlib
    import threading
    import time

    from refresher import body_keys

    keys = body_keys.keys_path(tmp_path, "p")
    made, failed, noted = (Wanted(f"{s}-1m-2024-01", s, "2024-01", NY) for s in SYMBOLS)
    body_keys.add(keys, [made, failed])
    _listed, inode = body_keys.read(keys)
    asking = threading.Event()  # the refresh's add asks for its turn (there are turns)
    refresh = threading.Thread(target=body_keys.add, args=(keys, [noted]))
    inode_of, writing = body_keys._inode_of, getattr(body_keys, "_writing", None)

    def checking(path: Path) -> int | None:  # the refill's check, its list's temporary whole; then its rename
        found = inode_of(path)
        if not refresh.is_alive() and not asking.is_set():
            refresh.start()
            deadline = time.monotonic() + 60
            while refresh.is_alive() and not asking.is_set():
                assert time.monotonic() < deadline, "the refresh's add neither ended nor asked for its turn"
                time.sleep(0.01)
        return found

    @contextlib.contextmanager
    def turn(path: Path) -> Iterator[None]:
        assert writing is not None
        if threading.current_thread() is refresh:
            asking.set()
        with writing(path):
            yield

    monkeypatch.setattr(body_keys, "_inode_of", checking)
    monkeypatch.setattr(body_keys, "_writing", turn, raising=False)
    assert body_keys.finished(keys, inode, [failed])
    refresh.join(60)
    assert not refresh.is_alive()
    assert body_keys.read(keys)[0] == [failed, noted]
    assert body_keys.started(keys)  # begun by the first add, kept


def test_a_noop_refresh_spawns_no_refill_for_a_list_a_maker_left_until_a_load_notes_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refill (or `refresher warm`) leaves in the list the segments it could not make (their stored files gone
    or damaged). Before: every refresh the stamp answers found that list unheld and spawned a refill for it, which
    imported psycopg and pyarrow, asked the server and failed on the same segments, at every no-op. Now such a
    list gets none until a refresh notes its segments again (a load: their files may be back), or a new one."""
    from refresher import _refill_spawn, body_keys, commands
    from refresher.settings import Settings

    spawned: list[tuple[Path, Path] | None] = []
    monkeypatch.setattr(_refill_spawn, "spawn_refill", lambda server, **kw: spawned.append(kw.get("bodies")))
    settings = Settings(state_dir=tmp_path / "state", store_root=tmp_path / "store", profiles_dirs=())
    server = ServerInfo("local", "p", "localhost", 5432, "u", "pw", "db")
    keys = body_keys.keys_path(settings.state_dir, "p")
    made, failed, added = (Wanted(f"{s}-1m-2024-01", s, "2024-01", NY) for s in SYMBOLS)
    body_keys.add(keys, [made, failed])
    commands._refill_left_bodies(settings, "p", server)  # a list a killed refill left: handed to a refill
    assert spawned == [(keys, settings.store_root)]
    _listed, inode = body_keys.read(keys)
    assert body_keys.finished(keys, inode, [failed])  # the refill could not make one
    commands._refill_left_bodies(settings, "p", server)
    commands._refill_left_bodies(settings, "p", server)
    assert len(spawned) == 1 and body_keys.read(keys)[0] == [failed]
    body_keys.add(keys, [failed])  # a load noted it again: worth another try
    commands._refill_left_bodies(settings, "p", server)
    assert len(spawned) == 2 and body_keys.read(keys)[0] == [failed]
    _listed, inode = body_keys.read(keys)
    assert body_keys.finished(keys, inode, [failed])
    body_keys.add(keys, [added])  # a new segment noted: tried with the rest
    commands._refill_left_bodies(settings, "p", server)
    assert len(spawned) == 3 and body_keys.read(keys)[0] == [failed, added]


def test_a_refill_whose_bodies_step_fails_leaves_the_list_to_no_noop_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refill's bodies step that fails as a whole (here the store cannot be opened: a newer featurestore's)
    left the list as it was, unmarked: every refresh the stamp answers found it unheld and untried and spawned a
    refill failing the same way. Now the list stays whole, left by its maker, until a load notes it again."""
    import duckdb

    from refresher import _refill_spawn, body_keys, commands, pool
    from refresher.settings import Settings

    spawned: list[tuple[Path, Path] | None] = []
    monkeypatch.setattr(_refill_spawn, "spawn_refill", lambda server, **kw: spawned.append(kw.get("bodies")))
    monkeypatch.setattr(pool, "_lower_own_priority", lambda: None)  # not this test process's priority
    settings = Settings(state_dir=tmp_path / "state", store_root=tmp_path / "store", profiles_dirs=())
    server = ServerInfo("local", "p", "localhost", 5432, "u", "pw", "db")
    store = FeatureStore(settings.store_root)
    store.put("AAPL-1m-2024-01", pa.table({"x": [1]}))
    with duckdb.connect(str(store.manifest.path)) as con:
        con.execute("UPDATE counters SET value = 3 WHERE name = 'store_format'")
    keys = body_keys.keys_path(settings.state_dir, "p")
    wanted = [Wanted(f"{s}-1m-2024-01", s, "2024-01", NY) for s in SYMBOLS]
    body_keys.add(keys, wanted)
    recorded: list[tuple[int, str]] = []
    pool._make_bodies(keys, settings.store_root, lambda count, line: recorded.append((count, line)))
    ((count, line),) = recorded
    assert count == 3 and line.startswith("COPY bodies not made: ") and "store format 3" in line
    assert body_keys.read(keys)[0] == wanted and body_keys.tried(keys)  # fails before: not tried
    commands._refill_left_bodies(settings, "p", server)
    assert spawned == []  # before: a refill spawned at every no-op refresh
    body_keys.add(keys, wanted[:1])  # a load noted one again: worth another try
    commands._refill_left_bodies(settings, "p", server)
    assert spawned == [(keys, settings.store_root)]


def test_a_refill_whose_bodies_step_fails_for_a_while_leaves_the_list_to_the_next_refill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that passes (the manifest held open by a DuckDB shell for a while) is no reason to leave the
    list to a load: marked left by its maker, no refresh the stamp answers tried it again."""
    from featurestore.errors import ManifestBusy
    from refresher import _refill_spawn, bodies, body_keys, commands, pool
    from refresher.settings import Settings

    spawned: list[tuple[Path, Path] | None] = []
    monkeypatch.setattr(_refill_spawn, "spawn_refill", lambda server, **kw: spawned.append(kw.get("bodies")))
    monkeypatch.setattr(pool, "_lower_own_priority", lambda: None)

    def busy(*args: object, **kwargs: object) -> None:
        raise ManifestBusy("manifest.duckdb", "a DuckDB shell")

    monkeypatch.setattr(bodies, "make_listed", busy)
    settings = Settings(state_dir=tmp_path / "state", store_root=tmp_path / "store", profiles_dirs=())
    server = ServerInfo("local", "p", "localhost", 5432, "u", "pw", "db")
    FeatureStore(settings.store_root).put("AAPL-1m-2024-01", pa.table({"x": [1]}))
    keys = body_keys.keys_path(settings.state_dir, "p")
    wanted = [Wanted(f"{s}-1m-2024-01", s, "2024-01", NY) for s in SYMBOLS]
    body_keys.add(keys, wanted)
    recorded: list[tuple[int, str]] = []
    pool._make_bodies(keys, settings.store_root, lambda count, line: recorded.append((count, line)))
    assert len(recorded) == 1 and "held open by another program" in recorded[0][1]
    assert body_keys.read(keys)[0] == wanted and not body_keys.tried(keys)
    commands._refill_left_bodies(settings, "p", server)
    assert spawned == [(keys, settings.store_root)]


_PROBES = """
import sys, time
from pathlib import Path
from refresher import body_keys
path, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    pass
print(sum(1 for _ in range(int(sys.argv[3])) if not body_keys.unheld(path)))
"""


def test_probes_of_a_list_from_processes_at_once_never_take_each_other_for_a_refill(tmp_path: Path) -> None:
    """``unheld``/``pending`` probe the list with an exclusive lock tried and let go; two probes at once each
    found the other's and said the list held by a refill (three processes, 20,000 probes each: thousands so
    before), so a refresh the stamp answers spawned no refill for a list no one held."""
    from refresher import body_keys

    keys = body_keys.keys_path(tmp_path / "state", "p")
    body_keys.add(keys, [Wanted("AAPL-1m-2024-01", "AAPL", "2024-01", NY)])
    start = time.time() + 3  # every process past its imports, then all probe together
    probes = [
        subprocess.Popen(
            [sys.executable, "-c", _PROBES, str(keys), str(start), "20000"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    said_held = [int(out) for out, _ in outputs(probes, timeout=300)]
    assert said_held == [0, 0, 0]  # fails before: thousands
    assert body_keys.unheld(keys)
