"""A refresh into a server the engine makes from nothing plans and fetches while the server starts: the fetches
really begin first, a wrong guess (a server made by someone else meanwhile) falls back to the plan against the
real database, and a kill -9 or a bad row during the overlapped start leaves nothing a later run trusts."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg
import pyarrow as pa
import pytest

from featurestore import FeatureStore
from refresher.engines.base import ServerInfo
from refresher.engines.local import LocalEngine, Postmaster
from refresher.errors import EngineUnavailable
from refresher.jobs import inprocess
from refresher.profile import Profile, load_profile
from refresher.refresh import refresh
from refresher.segments import Segment
from refresher.sources import synthetic
from refresher.sources.validate import BadRowsError
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.test_refresh_e2e import CHECKSUMS

pytestmark = pytest.mark.postgres
AS_OF = dt.date(2025, 3, 28)
PROFILE = "universe:\n  symbols: [AAPL, KO, MSFT]\nmonths: {months}\ntimeframes: [1d, 1m]\nseed: 5\n"
# Far above what a start takes; reached only when the fetches do not begin before the server answers.
WAIT = 60.0


@pytest.fixture
def root() -> Iterator[Path]:
    path = world_traversable_tmp("refresher-overlap-")
    try:
        yield path
    finally:
        for state in sorted(path.glob("state*")):  # "state", and any other a test made ("state-clean")
            engine = LocalEngine(state)
            for status in engine.status():
                engine.stop(status.profile)


def _profile(root: Path, name: str, months: int = 2, where: str = "profiles") -> Profile:
    (root / where).mkdir(exist_ok=True)
    (root / where / f"{name}.yaml").write_text(PROFILE.format(months=months))
    return load_profile(str(root / where / f"{name}.yaml"), [], as_of=AS_OF)


def _checksums(server: ServerInfo) -> dict[tuple[str, str, str], str]:
    with psycopg.connect(server.dsn()) as conn:
        return {(kind, sym, month): digest for kind, sym, month, digest in conn.execute(CHECKSUMS)}


def _ledger(server: ServerInfo) -> set[tuple[str, str, str]]:
    with psycopg.connect(server.dsn()) as conn:
        rows = conn.execute("SELECT symbol, timeframe, month::text FROM refresher_segments").fetchall()
    return {(s, tf, m) for s, tf, m in rows}


def _clean_load(root: Path) -> dict[tuple[str, str, str], str]:
    """What the profile's database holds after a refresh into a running server (no overlap) from a new store."""
    engine, profile = LocalEngine(root / "state"), _profile(root, "clean")
    engine.start(profile.name)
    report = refresh(profile, engine, FeatureStore(root / "store-clean"))
    assert report.segments.loaded == report.segments.desired == 12
    return _checksums(engine.start(profile.name))


@pytest.fixture
def first_batch_stored(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once the fetcher has produced and stored its first batch."""
    stored = threading.Event()
    fetch_tables = inprocess.fetch_tables

    def recording(*args: object, **kwargs: object) -> object:
        produced = fetch_tables(*args, **kwargs)  # type: ignore[arg-type]
        stored.set()
        return produced

    monkeypatch.setattr(inprocess, "fetch_tables", recording)
    return stored


class _WaitingEngine(LocalEngine):
    """Starts the server only once ``before`` is set (or ``WAIT`` passed), and says whether it was."""

    def __init__(self, state_dir: Path, before: threading.Event) -> None:
        super().__init__(state_dir)
        self.before = before
        self.was_set: bool | None = None

    def start(
        self, profile: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
    ) -> ServerInfo:
        if self.was_set is None:
            self.was_set = self.before.wait(WAIT)
        return super().start(profile, wait=wait, on_wait=on_wait)


def test_a_new_servers_fetches_begin_before_it_starts_and_load_what_a_clean_load_loads(
    root: Path, first_batch_stored: threading.Event
) -> None:
    engine = _WaitingEngine(root / "state", first_batch_stored)
    profile = _profile(root, "overlap")
    assert engine.is_new(profile.name)
    report = refresh(profile, engine, FeatureStore(root / "store"))
    assert engine.was_set, "no batch was fetched before the server was asked to start"
    assert (report.segments.fetched, report.segments.loaded) == (12, 12)
    assert {"plan", "engine", "segments"} <= report.phases.keys()
    assert not engine.is_new(profile.name)
    assert _checksums(engine.start(profile.name)) == _clean_load(root)


class _RacedEngine(LocalEngine):
    """Finds no server, then another process makes one and loads a month into it before ours starts."""

    def __init__(self, state_dir: Path, other: Profile, other_store: FeatureStore) -> None:
        super().__init__(state_dir)
        self.other, self.other_store = other, other_store
        self.raced_loaded = 0

    def is_new(self, profile: str) -> bool:
        new = super().is_new(profile)
        if new and not self.raced_loaded:
            self.raced_loaded = refresh(
                self.other, LocalEngine(self.base.parent), self.other_store
            ).rows_loaded
        return new


def test_a_server_made_by_someone_else_between_the_look_and_the_start_is_planned_against(
    root: Path, first_batch_stored: threading.Event
) -> None:
    profile = _profile(root, "raced")
    other = _profile(root, "raced", months=1, where="other")  # the same database, March only
    engine = _RacedEngine(root / "state", other, FeatureStore(root / "store-other"))
    report = refresh(profile, engine, FeatureStore(root / "store"))
    assert engine.raced_loaded and first_batch_stored.is_set()
    # The six March segments the other refresh loaded are kept, not loaded again as the guess planned.
    assert (report.segments.present, report.segments.loaded) == (6, 6)
    server = engine.start(profile.name)
    assert len(_ledger(server)) == 12
    assert _checksums(server) == _clean_load(root)


def test_a_stopped_server_with_data_is_not_new_and_keeps_its_data(root: Path) -> None:
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    profile = _profile(root, "stopped")
    refresh(profile, engine, store)
    postmaster = Postmaster.read(root / "state" / "local" / profile.name / "pgdata")
    assert postmaster is not None
    os.kill(postmaster.pid, signal.SIGINT)  # a fast shutdown; the cluster and its data stay
    deadline = time.monotonic() + 60
    while postmaster.alive():
        assert time.monotonic() < deadline, "the postmaster did not shut down in 60 s"
        threading.Event().wait(0.05)
    assert engine.info(profile.name) is None and not engine.is_new(profile.name)
    again = refresh(profile, engine, store)
    assert (again.segments.present, again.segments.loaded) == (12, 0)


KILLED_DURING_START = textwrap.dedent(
    """
    import os, signal, sys, threading
    from pathlib import Path
    from featurestore import FeatureStore
    from refresher.engines import local
    from refresher.jobs import inprocess
    from refresher.profile import load_profile
    from refresher.refresh import refresh
    import datetime as dt

    root = Path(sys.argv[1])
    stored = threading.Event()
    fetch_tables = inprocess.fetch_tables

    def recording(*args, **kwargs):
        produced = fetch_tables(*args, **kwargs)
        stored.set()
        return produced

    def killed(info):  # the server runs, its database is not made yet: kill -9 once a batch is stored
        stored.wait(60)
        os.kill(os.getpid(), signal.SIGKILL)

    inprocess.fetch_tables = recording
    local._ensure_database = killed
    profile = load_profile(str(root / "profiles" / "killed.yaml"), [], as_of=dt.date.fromisoformat(sys.argv[2]))
    refresh(profile, local.LocalEngine(root / "state"), FeatureStore(root / "store"))
    """
)


@pytest.mark.slow
def test_kill_9_during_the_overlapped_start_then_a_rerun_equals_a_clean_load(root: Path) -> None:
    profile = _profile(root, "killed")
    done = subprocess.run(
        [sys.executable, "-c", KILLED_DURING_START, str(root), AS_OF.isoformat()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    engine = LocalEngine(root / "state")
    assert engine.info(profile.name) is not None  # the server outlived its CLI, without its database
    report = refresh(profile, engine, FeatureStore(root / "store"))
    assert report.segments.loaded == 12
    assert report.segments.fetched < 12  # what the killed run stored is served from the store
    assert _checksums(engine.start(profile.name)) == _clean_load(root)


def test_a_bad_row_fetched_while_the_server_starts_stops_the_refresh_with_nothing_loaded(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = threading.Event()
    bad = Segment("AAPL", "1d", dt.date(2025, 2, 1))  # in the first batch
    fetch_many = synthetic.SyntheticSource.fetch_many

    def failing(self: synthetic.SyntheticSource, segments: Sequence[Segment]) -> list[pa.Table]:
        if bad in segments:
            asked.set()
            raise BadRowsError.first_of(bad, "upstream line 7", "close", -1.0, "close > 0", 1)
        return fetch_many(self, segments)

    monkeypatch.setattr(synthetic.SyntheticSource, "fetch_many", failing)
    engine = _WaitingEngine(root / "state", asked)
    profile = _profile(root, "bad")
    store = FeatureStore(root / "store")
    with pytest.raises(BadRowsError, match=r"close=-1\.0"):
        refresh(profile, engine, store)
    assert engine.was_set  # the source failed before the server started
    assert _ledger(engine.start(profile.name)) == set()
    with psycopg.connect(engine.start(profile.name).dsn()) as conn:
        assert conn.execute("SELECT count(*) FROM ohlcv_daily").fetchone() == (0,)
    assert store.get_cache_stats().entries == 0  # the failed batch stored nothing
    monkeypatch.setattr(synthetic.SyntheticSource, "fetch_many", fetch_many)
    again = refresh(profile, engine, store)
    assert again.segments.loaded == 12
    assert _checksums(engine.start(profile.name)) == _clean_load(root)


class _FailingEngine(LocalEngine):
    """Fails to start once ``before`` is set: a pinned port taken, a full disk, a Docker daemon gone."""

    def __init__(self, state_dir: Path, before: threading.Event) -> None:
        super().__init__(state_dir)
        self.before = before

    def start(
        self, profile: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
    ) -> ServerInfo:
        self.before.wait(WAIT)
        raise EngineUnavailable("the server did not start")


def test_a_start_that_fails_while_fetching_leaves_no_fetch_running_behind_the_error(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller gets the error and goes on (a test's teardown removes the store, the plugin tries again): the
    # fetcher must not still be producing into the store, from a source the refresh has closed.
    fetching, raised = threading.Event(), threading.Event()
    after_the_error: list[int] = []
    fetch_many = synthetic.SyntheticSource.fetch_many

    def slow(self: synthetic.SyntheticSource, segments: Sequence[Segment]) -> list[pa.Table]:
        fetching.set()
        time.sleep(0.5)  # the batch in hand when the start fails
        if raised.is_set():
            after_the_error.append(len(segments))
        return fetch_many(self, segments)

    monkeypatch.setattr(synthetic.SyntheticSource, "fetch_many", slow)
    with pytest.raises(EngineUnavailable, match="did not start"):
        refresh(
            _profile(root, "nostart"), _FailingEngine(root / "state", fetching), FeatureStore(root / "store")
        )
    raised.set()
    assert not [t for t in threading.enumerate() if t.name == "refresher-fetch" and t.is_alive()]
    time.sleep(0.6)
    assert after_the_error == []
