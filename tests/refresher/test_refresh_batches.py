"""A refresh loads segments in batches: the daily refresh appends its new session, a bad row stops the run with
nothing of its batch loaded, and both end exactly where a clean load ends (per-segment checksums)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pyarrow as pa
import pytest

from featurestore import FeatureStore
from refresher.body_keys import Wanted
from refresher.engines.local import LocalEngine
from refresher.jobs import inprocess
from refresher.profile import Profile, load_profile
from refresher.refresh import refresh
from refresher.segments import Segment
from refresher.sources import synthetic
from refresher.sources.validate import BadRowsError
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.test_refresh_e2e import CHECKSUMS

pytestmark = pytest.mark.postgres
THURSDAY, FRIDAY = dt.date(2025, 3, 27), dt.date(2025, 3, 28)
PROFILE = "universe:\n  symbols: [AAPL, KO, MSFT]\nmonths: 2\ntimeframes: [1d, 1m]\nseed: 5\n"
# A deadline for the refill's main run in a child (six bodies: seconds): one that hangs (a lock never released,
# a server that never answers) fails its test, killed, instead of holding the whole run until CI's own limit.
CHILD_TIMEOUT = 300


@pytest.fixture
def root() -> Iterator[Path]:
    path = world_traversable_tmp("refresher-batches-")
    (path / "p.yaml").write_text(PROFILE)
    engine = LocalEngine(path / "state")
    try:
        yield path
    finally:
        for status in engine.status():
            engine.stop(status.profile)


def _profile(root: Path, name: str, as_of: dt.date) -> Profile:
    (root / f"{name}.yaml").write_text(PROFILE)
    return load_profile(str(root / f"{name}.yaml"), [], as_of=as_of)


def _checksums(engine: LocalEngine, profile: Profile) -> dict[tuple[str, str, str], str]:
    with psycopg.connect(engine.start(profile.name).dsn()) as conn:
        return {(kind, sym, month): digest for kind, sym, month, digest in conn.execute(CHECKSUMS)}


def test_a_daily_refresh_appends_one_session_and_equals_a_clean_load(root: Path) -> None:
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    refresh(_profile(root, "daily", THURSDAY), engine, store)
    report = refresh(_profile(root, "daily", FRIDAY), engine, store)
    # The three symbols' March segments of both timeframes, each by one session: 1 daily bar and 390 minutes.
    assert report.segments.loaded == 6
    assert report.rows_loaded == 3 * (1 + 390)
    clean = refresh(_profile(root, "clean", FRIDAY), engine, FeatureStore(root / "store-clean"))
    assert clean.rows_loaded > 10 * report.rows_loaded
    assert _checksums(engine, _profile(root, "daily", FRIDAY)) == _checksums(
        engine, _profile(root, "clean", FRIDAY)
    )


def test_a_bad_row_stops_the_refresh_with_nothing_of_its_batch_loaded(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches of 2 segments: the bad segment (KO's second month) is the 4th of 12, in the second batch.
    monkeypatch.setattr(inprocess, "STORE_BATCH", 2)
    monkeypatch.setattr(inprocess, "DAILY_SHARE", 1)
    bad = Segment("KO", "1d", dt.date(2025, 3, 1))
    fetch_many = synthetic.SyntheticSource.fetch_many  # what the refresh asks, a store batch at a time

    def failing(self: synthetic.SyntheticSource, segments: Sequence[Segment]) -> list[pa.Table]:
        if bad in segments:
            raise BadRowsError.first_of(bad, "upstream line 7", "close", -1.0, "close > 0", 1)
        return fetch_many(self, segments)

    monkeypatch.setattr(synthetic.SyntheticSource, "fetch_many", failing)
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    profile = _profile(root, "bad", FRIDAY)
    with pytest.raises(BadRowsError, match=r"close=-1\.0"):
        refresh(profile, engine, store)
    with psycopg.connect(engine.start(profile.name).dsn()) as conn:
        ledger = {
            (s, tf, str(m))
            for s, tf, m in conn.execute("SELECT symbol, timeframe, month FROM refresher_segments")
        }
        held = conn.execute("SELECT count(*) FROM ohlcv_daily WHERE symbol = 'KO'").fetchone()
    # Jobs run by symbol and month: the first batch (AAPL 1d Feb, Mar) loaded, the bad one's batch did not.
    assert ("AAPL", "1d", "2025-02-01") in ledger and ("KO", "1d", "2025-03-01") not in ledger
    assert ("KO", "1d", "2025-02-01") not in ledger and held == (0,)

    monkeypatch.setattr(
        synthetic.SyntheticSource, "fetch_many", fetch_many
    )  # the source fixed: the re-run completes
    refresh(profile, engine, store)
    clean = refresh(_profile(root, "clean", FRIDAY), engine, FeatureStore(root / "store-clean"))
    assert clean.segments.loaded == 12
    assert _checksums(engine, profile) == _checksums(engine, _profile(root, "clean", FRIDAY))


def test_a_warm_stores_reads_run_ahead_of_the_loader_and_load_what_a_cold_run_loads(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    cold = _profile(root, "cold", FRIDAY)
    refresh(cold, engine, store)
    read = inprocess.stored_loads
    threads: list[str] = []

    def reading(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread().name)
        return read(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inprocess, "stored_loads", reading)
    warm = _profile(root, "warm", FRIDAY)  # another database, the same store
    report = refresh(warm, engine, store)
    assert (report.segments.fetched, report.segments.loaded) == (0, 12)
    assert threads and set(threads) == {"refresher-fetch"}  # not the loading thread
    assert _checksums(engine, warm) == _checksums(engine, cold)


def test_a_cold_refresh_makes_no_body_its_refill_does_and_a_warm_one_sends_them(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold refresh encodes and keeps no COPY body on its load (it cost the cold backtesting refresh 1.7 s,
    8bb6c0c): it notes its minute segments for the pool's detached refill (``refresher.body_keys``), which makes
    them; ``wait_for_pool`` waits for them. A warm refresh into a new database then sends them, reading no minute
    segment's Parquet file and encoding no row, and loads what the cold one did."""
    from featurestore import FeatureStore as Store
    from refresher import bodies, body_keys, load
    from refresher.pool import wait_for_pool

    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    made: list[str] = []
    encode, put_bodies = bodies.encode, Store.put_bodies

    def encoding(table: pa.Table) -> bytes:
        made.append("encode")
        return encode(table)

    def putting(self: Store, *args: object, **kwargs: object) -> int:
        made.append("put")
        return put_bodies(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bodies, "encode", encoding)
    monkeypatch.setattr(Store, "put_bodies", putting)
    cold = _profile(root, "cold", FRIDAY)
    refresh(cold, engine, store, state_dir=root / "state")
    assert made == []  # nothing of a body on the refresh: the refill is another process
    keys = body_keys.keys_path(root / "state", cold.name)
    listed, _inode = body_keys.read(keys)
    assert len(listed) == 6  # 3 symbols x 2 months of minute segments
    wait_for_pool(engine.start(cold.name), timeout=120, bodies=keys)
    assert not keys.exists()  # made, and the list removed by the refill
    assert store.get_cache_stats().bodies.entries == 6
    monkeypatch.undo()
    copied: list[str] = []
    copy_arrow = load.copy_arrow

    def copying(conn: object, table: str, *args: object, **kwargs: object) -> None:
        copied.append(table)
        copy_arrow(conn, table, *args, **kwargs)  # type: ignore[arg-type]

    def refused(table: pa.Table) -> bytes:
        raise AssertionError("a warm load encoded a minute segment")

    monkeypatch.setattr(load, "copy_arrow", copying)
    monkeypatch.setattr(bodies, "encode", refused)
    warm = _profile(root, "warm", FRIDAY)
    report = refresh(warm, engine, store, state_dir=root / "state")
    assert (report.segments.fetched, report.segments.loaded) == (0, 12)
    assert copied and not [table for table in copied if table.startswith("ohlcv_1min")]  # daily bars only
    assert _checksums(engine, warm) == _checksums(engine, cold)
    assert not body_keys.keys_path(
        root / "state", warm.name
    ).exists()  # every body was there: nothing to make


def test_calendars_are_built_while_a_stopped_server_starts_and_not_for_a_running_one(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from refresher import refresh as refresh_module

    started: list[list[str]] = []
    real = refresh_module.load_in_background

    def recording(exchanges: Sequence[str]) -> threading.Thread:
        started.append(list(exchanges))
        return real(exchanges)

    monkeypatch.setattr(refresh_module, "load_in_background", recording)
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    profile = _profile(root, "calendars", FRIDAY)
    first = refresh(profile, engine, store)
    assert started == [["XNYS", "XNYS", "XNYS"]]
    again = refresh(profile, engine, store)  # the server runs: a no-op needs no calendar
    assert started == [["XNYS", "XNYS", "XNYS"]] and again.segments.loaded == 0
    assert first.segments.loaded == 12


def test_a_refill_killed_while_making_bodies_leaves_its_list_and_the_next_one_makes_them(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refill SIGKILLed between writing its bodies' temporaries and renaming them: no body is there (whole or
    half), the list stays, and ``wait_for_pool`` does not wait on a refill that is gone; the next refill, given
    the list, makes every body and removes it."""
    from refresher import bodies, body_keys, pool
    from refresher.pool import wait_for_pool

    spawned: list[object] = []
    monkeypatch.setattr(pool, "spawn_refill", lambda *args, **kwargs: spawned.append(kwargs))
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    profile = _profile(root, "killed", FRIDAY)
    refresh(profile, engine, store, state_dir=root / "state")
    keys = body_keys.keys_path(root / "state", profile.name)
    assert spawned == [{"bodies": (keys, store.root)}]
    server = engine.start(profile.name)
    argv = ["refill", "--dsn", server.dsn("postgres", with_password=False), "--database", server.dbname]
    argv += ["--no-fill", "--bodies", str(keys), "--store", str(store.root)]
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        from featurestore import _files
        from refresher import pool
        if sys.argv[1] == "kill":
            def killed(moves):
                os.kill(os.getpid(), signal.SIGKILL)
            _files.publish_many = killed
        pool.main({argv!r})
        """
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "PGPASSWORD": server.password}
    done = subprocess.run([sys.executable, "-c", code, "kill"], cwd=repo, env=env, timeout=CHILD_TIMEOUT)
    assert done.returncode == -9
    listed, _inode = body_keys.read(keys)
    assert len(listed) == 6 and not body_keys.pending(keys)
    assert store.get_cache_stats().bodies.entries == 0
    assert list((store.root / "bodies").glob("*/*.tmp"))  # written, never renamed: GC's
    wait_for_pool(server, timeout=60, bodies=keys)  # no refill holds the list; the pool may still fill
    # A refresh with nothing to load hands the list left to a refill of its own.
    refresh(profile, engine, store, state_dir=root / "state")
    assert spawned[1:] == [{"fill": False, "bodies": (keys, store.root)}]
    assert body_keys.read(keys)[0] == listed
    ended = subprocess.run(
        [sys.executable, "-c", code, "next"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert ended.returncode == 0, ended.stderr
    assert "bodies: 6 made of 6" in ended.stdout
    assert not keys.exists()
    assert len(store.read_bodies([each.key for each in listed], bodies.layout())) == 6


@dataclass(frozen=True)
class _Damaged:
    """A cold refresh whose refill was held back, then KO's March minute file damaged in the store (its read drops
    it from the store, as `warm` then sees): what a refill making the bodies finds."""

    engine: LocalEngine
    store: FeatureStore
    profile: Profile
    keys: Path  # the list of the 6 bodies to make
    listed: list[Wanted]
    ko: Wanted  # KO's March minute segment, in it
    table: pa.Table  # KO's as it was stored
    spawned: list[dict[str, object]]  # the refills the refresh spawned (held back), their keywords


def _ko_damaged(root: Path, monkeypatch: pytest.MonkeyPatch, name: str, *, gone: bool = False) -> _Damaged:
    from refresher import body_keys, pool

    spawned: list[dict[str, object]] = []
    with monkeypatch.context() as patched:
        patched.setattr(pool, "spawn_refill", lambda *args, **kwargs: spawned.append(kwargs))
        engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
        profile = _profile(root, name, FRIDAY)
        refresh(profile, engine, store, state_dir=root / "state")
    keys = body_keys.keys_path(root / "state", profile.name)
    listed, _inode = body_keys.read(keys)
    [ko] = [each for each in listed if each.symbol == "KO" and each.month == "2025-03"]
    entry = store.lookup([ko.key])[ko.key]
    table = store.get(ko.key)
    if gone:  # deleted by hand: its manifest row stays (a read that misses the file leaves it)
        entry.path.unlink()
        return _Damaged(engine, store, profile, keys, listed, ko, table, spawned)
    data = bytearray(entry.path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    return _Damaged(engine, store, profile, keys, listed, ko, table, spawned)


def test_a_body_the_refill_cannot_make_shows_in_status_until_a_refill_makes_it(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One minute segment's Parquet file damaged after the load, before the refill makes the bodies: the real
    detached refill (its output to /dev/null, as after a CLI refresh) records what it could not make, and
    `refresher status` says so in one line naming the segment (``--json``: ``pool.bodies_not_made``), until a
    refill given it again, its file stored anew, makes it. Before: the line went to /dev/null, status said
    nothing."""
    from refresher import body_keys, render
    from refresher.pool import pool_status, spawn_refill, wait_for_pool

    d = _ko_damaged(root, monkeypatch, "damaged")
    # The refill held back: the file is damaged first.
    assert d.spawned == [{"bodies": (d.keys, d.store.root)}]

    server = d.engine.start(d.profile.name)
    # Bodies alone: no outcome of a fill recorded.
    spawn_refill(server, fill=False, bodies=(d.keys, d.store.root))
    wait_for_pool(server, timeout=120, bodies=d.keys)
    line = pool_status(server).bodies
    assert line.startswith("the refill (") and "could not make 1 COPY body" in line, line
    assert "KO/1m/2025-03" in line and "gone or damaged" in line and "refresher warm" in line, line
    assert "\n" not in line and pool_status(server).to_json()["bodies_not_made"] == line
    render.status_table(
        d.engine.status(d.profile.name), state_dir=root / "state", pools=[pool_status(server)]
    )
    assert f"{d.profile.name}: {line}" in capsys.readouterr().out

    # The file stored again (as `refresher warm` fetches it) and the segment listed again: the next refill,
    # filling the pool too, makes it and clears the line.
    d.store.put_many_hashes([(d.ko.key, d.table, d.ko.symbol)])
    body_keys.add(d.keys, [d.ko])
    spawn_refill(server, bodies=(d.keys, d.store.root))
    wait_for_pool(server, timeout=120, bodies=d.keys)
    assert pool_status(server).bodies == ""
    assert pool_status(server).to_json()["bodies_not_made"] is None
    assert pool_status(server).failed == ""


def test_a_bodies_step_failing_midway_counts_only_the_bodies_it_did_not_make(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refill's bodies' step fails after it published a batch of 2 of its 6 bodies (the disk full at the
    second batch): status says it could not make 4, not 6 (before: every listed one counted, the 2 made too),
    and the list stays for the next refill."""
    from refresher import body_keys, pool
    from refresher.pool import pool_status

    monkeypatch.setattr(pool, "spawn_refill", lambda *args, **kwargs: None)
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    profile = _profile(root, "midway", FRIDAY)
    refresh(profile, engine, store, state_dir=root / "state")
    keys = body_keys.keys_path(root / "state", profile.name)
    listed, _inode = body_keys.read(keys)
    assert len(listed) == 6
    server = engine.start(profile.name)
    argv = ["refill", "--dsn", server.dsn("postgres", with_password=False), "--database", server.dbname]
    argv += ["--no-fill", "--bodies", str(keys), "--store", str(store.root)]
    code = textwrap.dedent(
        f"""
        import errno
        from featurestore import FeatureStore
        from refresher import bodies, pool
        bodies._PUBLISHED = 2
        put_bodies = FeatureStore.put_bodies
        batches = []
        def putting(self, items, layout):
            batches.append(len(items))
            if len(batches) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return put_bodies(self, items, layout)
        FeatureStore.put_bodies = putting
        raise SystemExit(pool.main({argv!r}))
        """
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "PGPASSWORD": server.password}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    assert "COPY bodies not made: OSError: [Errno 28] No space left on device" in done.stdout, done.stdout
    assert store.get_cache_stats().bodies.entries == 2
    line = pool_status(server).bodies
    assert "could not make 4 COPY bodies: COPY bodies not made: OSError" in line, line
    assert body_keys.read(keys)[0] == listed  # kept for the next refill


@pytest.mark.parametrize("then", ["warm", "warm-gone", "refresh"])
def test_a_body_the_refill_could_not_make_stays_listed_until_made_and_status_says_so_only_until_then(
    root: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """KO's March minute file damaged in the store before the real detached refill makes the bodies: it makes the
    other 5, `refresher status` says it could not make 1, and KO stays listed. Then the file is fetched again:
    by `refresher warm` (the line's advice), which makes the body the list names, or by the store's file put
    back and a refresh with nothing to load, whose refill tries the list again. Either way the body is made, the
    list goes, and status no longer says it, nor once a later refresh lists new segments. Before: the refill
    removed the list, so nothing made that body again and the line stayed for good, after warm or a refresh
    alike; and after warm, the old line came back with the next list (until that list's refill ended).
    "warm-gone": KO's file deleted by hand, not damaged: its manifest row stays (no read evicts it), and warm's
    plan, trusting the row, fetched nothing, made no body and left KO listed; now it notices the file gone (a
    stat per stored file) and fetches it again."""
    from refresher import body_keys, commands
    from refresher.bodies import layout as bodies_layout
    from refresher.pool import spawn_refill, wait_for_pool
    from refresher.settings import Settings

    d = _ko_damaged(root, monkeypatch, f"stale_{then.replace('-', '_')}", gone=then == "warm-gone")
    server = d.engine.start(d.profile.name)
    spawn_refill(server, fill=False, bodies=(d.keys, d.store.root))
    wait_for_pool(server, timeout=120, bodies=d.keys)
    assert body_keys.read(d.keys)[0] == [d.ko]  # the one it could not make stays listed
    settings = Settings.from_env({}, state_dir=root / "state", store_root=root / "store", engine="local")

    def said() -> str:
        [status] = commands.pools(settings, d.engine.status(d.profile.name))
        assert status is not None
        return status.bodies

    assert "could not make 1 COPY body: no COPY body for KO/1m/2025-03" in said(), said()
    if then.startswith("warm"):
        warmed = commands.warm(settings, str(root / f"{d.profile.name}.yaml"), as_of=FRIDAY)
        assert warmed.fetched == 1  # KO's file, and only it
    else:
        d.store.put_many_hashes([(d.ko.key, d.table, d.ko.symbol)])
        assert refresh(d.profile, d.engine, d.store, state_dir=root / "state").segments.loaded == 0
        wait_for_pool(server, timeout=120, bodies=d.keys)
    assert not d.keys.exists()
    assert len(d.store.read_bodies([each.key for each in d.listed], bodies_layout())) == 6
    assert said() == ""
    # A later refresh lists a new segment (``refresh._note_bodies``), its refill not done yet: the line about the
    # list that went stays unsaid.
    body_keys.add(d.keys, [Wanted("a-later-segment", "AAPL", "2025-04", d.ko.tz)])
    assert said() == ""


@pytest.mark.parametrize("then", ["stopped", "failing"])
def test_a_refill_stopped_or_failing_as_it_leaves_its_list_keeps_the_line_of_what_it_could_not_make(
    root: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """The refill's bodies' step records what it could not make (KO's damaged file), then leaves its list with KO
    (``body_keys.finished``). A SIGTERM there ("stopped"; held, raised once the list is left) ends the refill, 143,
    KO's line kept; a list that cannot be written ("failing": a full disk) is one line of its log, the list left
    as it was, exit 0. Before: the stop replaced KO's line by "stopped by SIGTERM before it made them all" (the
    list it had left taken for bodies not made), and the full disk ended the refill in a traceback, exit 1, after
    its work was done and recorded."""
    import signal

    from refresher import body_keys
    from refresher.pool import pool_status

    d = _ko_damaged(root, monkeypatch, f"leaving_{then}")
    keys, store = d.keys, d.store
    server = d.engine.start(d.profile.name)
    argv = ["refill", "--dsn", server.dsn("postgres", with_password=False), "--database", server.dbname]
    argv += ["--no-fill", "--bodies", str(keys), "--store", str(store.root)]
    code = textwrap.dedent(
        f"""
        import errno, os, signal, sys
        from refresher import body_keys, pool
        finished = body_keys.finished
        def leaving(*args, **kwargs):
            if sys.argv[1] == "failing":
                raise OSError(errno.ENOSPC, "No space left on device")
            os.kill(os.getpid(), signal.SIGTERM)
            return finished(*args, **kwargs)
        body_keys.finished = leaving
        raise SystemExit(pool.main({argv!r}))
        """
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "PGPASSWORD": server.password}
    done = subprocess.run(
        [sys.executable, "-c", code, then],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    line = pool_status(server, bodies=keys).bodies
    assert "could not make 1 COPY body: no COPY body for KO/1m/2025-03" in line, line
    assert store.get_cache_stats().bodies.entries == 5
    if then == "stopped":
        assert done.returncode == 128 + signal.SIGTERM, done.stderr
        assert body_keys.read(keys)[0] == [d.ko]
    else:
        assert done.returncode == 0, done.stderr
        left = "the list of COPY bodies to make left as it was: OSError: [Errno 28] No space left on device"
        assert left in done.stdout, done.stdout
        assert body_keys.read(keys)[0] == d.listed


def _refilled_then_lost(
    root: Path, monkeypatch: pytest.MonkeyPatch, name: str, symbols: Sequence[str]
) -> tuple[_Damaged, list[Wanted]]:
    """KO's March minute file deleted by hand before the real detached refill made the bodies: it made the other
    5, recorded that it could not make KO's, and left KO listed. Then the March files of ``symbols`` damaged,
    their bodies gone and the segments listed again (as a later refresh notes them): what `refresher warm` finds."""
    from refresher import body_keys
    from refresher.bodies import layout
    from refresher.pool import spawn_refill

    d = _ko_damaged(root, monkeypatch, name, gone=True)
    server = d.engine.start(d.profile.name)
    spawn_refill(server, fill=False, bodies=(d.keys, d.store.root))
    deadline = time.monotonic() + CHILD_TIMEOUT  # its bodies only: not the pool's clones (``wait_for_pool``)
    while body_keys.pending(d.keys):
        assert time.monotonic() < deadline, "the refill never made the bodies"
        time.sleep(0.1)
    assert body_keys.read(d.keys)[0] == [d.ko]
    lost = [each for each in d.listed if each.symbol in symbols and each.month == "2025-03"]
    for each in lost:
        entry = d.store.lookup([each.key])[each.key]
        body = d.store.body_path(entry.content_hash, layout())
        assert body is not None
        body.unlink()
        data = bytearray(entry.path.read_bytes())
        data[len(data) // 3] ^= 0xFF
        entry.path.write_bytes(bytes(data))
    body_keys.add(d.keys, lost)
    return d, lost


def _status_of_bodies(root: Path, d: _Damaged) -> str:
    """What `refresher status` says of the profile's COPY bodies (``commands.pools``, the CLI's way)."""
    from refresher import commands
    from refresher.settings import Settings

    settings = Settings.from_env({}, state_dir=root / "state", store_root=root / "store", engine="local")
    [status] = commands.pools(settings, d.engine.status(d.profile.name))
    assert status is not None
    return status.bodies


def _warm(root: Path, d: _Damaged) -> int:
    """`refresher warm` of the profile, in this process; how many segments it fetched."""
    from refresher import commands
    from refresher.settings import Settings

    settings = Settings.from_env({}, state_dir=root / "state", store_root=root / "store", engine="local")
    return commands.warm(settings, str(root / f"{d.profile.name}.yaml"), as_of=FRIDAY).fetched


def test_a_warm_that_makes_only_some_of_the_listed_bodies_is_what_status_says(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refill could not make KO's body (its file deleted by hand); `refresher warm` fetches KO's file again and
    makes it, but AAPL's and MSFT's files, listed since, turn out damaged when it reads them (the read drops them
    from the store): it makes 1 of the 3. Status then says warm could not make 2, naming AAPL's, not the refill's
    line about KO, which warm made. Before: status kept saying "the refill ... could not make 1 COPY body: no
    COPY body for KO/1m/2025-03" (warm asks no server, whose record holds that line). The next warm fetches the
    two again and makes them: the list goes, and the line with it."""
    from refresher import body_keys

    d, lost = _refilled_then_lost(root, monkeypatch, "partial", ["AAPL", "MSFT"])
    before = _status_of_bodies(root, d)
    assert (
        before.startswith("the refill (")
        and "could not make 1 COPY body: no COPY body for KO/1m/2025-03" in before
    )

    assert _warm(root, d) == 1  # KO's file, gone by hand
    assert body_keys.read(d.keys)[0] == lost
    line = _status_of_bodies(root, d)
    assert (
        line.startswith("`refresher warm` (")
        and "could not make 2 COPY bodies: no COPY body for AAPL/1m/2025-03" in line
    ), line
    assert "KO/" not in line and "gone or damaged" in line

    assert _warm(root, d) == 2  # their rows dropped by its read: fetched again
    assert not d.keys.exists() and _status_of_bodies(root, d) == ""
    assert d.store.get_cache_stats().bodies.entries == 6


@pytest.mark.parametrize("step", ["fetched", "making", "noting"])
def test_a_warm_killed_between_its_steps_leaves_the_list_whole_and_the_next_warm_makes_them(
    root: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """`refresher warm` SIGKILLed after it fetched KO's file again ("fetched"), as it publishes a body
    ("making": its temporaries written, not renamed) or as it leaves the list ("noting": MSFT it could not make,
    the list's temporary whole, not renamed): the list is the one it read, whole, no temporary of it left once a
    writer comes next, no body half there; then warm again (until the list goes, at most twice: MSFT's damaged
    file is dropped by the first read of it and fetched by the warm after) makes every body, and status says
    nothing of them."""
    from refresher import body_keys

    d, lost = _refilled_then_lost(root, monkeypatch, f"killed_{step}", ["MSFT"])
    listed = body_keys.read(d.keys)[0]
    assert listed == [d.ko, *lost]
    said = _status_of_bodies(root, d)
    code = textwrap.dedent(
        f"""
        import datetime as dt, os, signal, sys
        from pathlib import Path
        from featurestore import FeatureStore, _files
        from refresher import body_keys, commands, warm
        from refresher.settings import Settings

        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        step = sys.argv[1]
        if step == "fetched":
            fetch = warm.fetch_tables
            def fetching(*args, **kwargs):
                fetch(*args, **kwargs)
                killed()
            warm.fetch_tables = fetching
        elif step == "making":
            put_bodies = FeatureStore.put_bodies
            def putting(*args, **kwargs):
                _files.publish_many = killed
                return put_bodies(*args, **kwargs)
            FeatureStore.put_bodies = putting
        else:
            body_keys._inode_of = killed  # in finished's write of the list left, its temporary whole
        settings = Settings.from_env(
            {{}}, state_dir=Path({str(root / "state")!r}), store_root=Path({str(root / "store")!r}), engine="local"
        )
        commands.warm(settings, {str(root / f"{d.profile.name}.yaml")!r}, as_of=dt.date(2025, 3, 28))
        """
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", code, step], cwd=repo, env=env, timeout=CHILD_TIMEOUT)
    assert done.returncode == -9
    assert body_keys.read(d.keys)[0] == listed and _status_of_bodies(root, d) == said
    parts = list(d.keys.parent.glob(f".{d.keys.name}.*.part"))
    assert bool(parts) == (step == "noting")  # the killed writer's temporary: the next writer removes it
    assert d.store.get(d.ko.key) is not None  # fetched again before any of these steps
    assert d.store.get_cache_stats().bodies.entries == (5 if step == "noting" else 4)  # whole ones only
    for _ in range(2):
        _warm(root, d)
        if not d.keys.exists():
            break
    assert not d.keys.exists() and _status_of_bodies(root, d) == ""
    assert not list(d.keys.parent.glob(f".{d.keys.name}.*.part"))
    assert d.store.get_cache_stats().bodies.entries == 6
