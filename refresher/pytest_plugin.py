"""pytest fixtures that hand each test its own PostgreSQL database loaded with a profile's market data.

``refresher_postgres`` (session) is a server loaded once per run; ``refresher_db`` (function) is a fresh clone
of its pristine snapshot for each test, taken from a warm pool, so a test may write, truncate and drop freely;
``refresher_tx`` (function) is one connection to the shared loaded database inside a transaction that is rolled
back after the test (DDL included), for tests that need nothing but that one connection.
Under pytest-xdist all workers share one loaded server per profile (``refresher._pytest_share``).

Fixture factories build more of them, in the pytest-postgresql style::

    from refresher.pytest_plugin import refresher_database, refresher_proc

    backtest_postgres = refresher_proc("backtesting", as_of="2024-06-28")
    backtest_db = refresher_database("backtest_postgres")
    backtest_tx = refresher_transaction("backtest_postgres")
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from refresher._pytest_options import (
    MARKER,
    PluginOptions,
    add_options,
    check_options,
    in_plugin_terms,
    marker_profile,
    parse_as_of,
)
from refresher._pytest_servers import LoadedServer, build_server, stop_server, sweep
from refresher._pytest_share import (
    PoolRefiller,
    SharedServers,
    clone_note,
    drop_abandoned_clones,
    new_run_dir,
    per_test_clone_prefix,
    pool_size_for_workers,
    server_key,
    sweep_run_dirs,
)
from refresher.engines.base import ServerInfo
from refresher.errors import USER_ERRORS, os_error_message

# psycopg, the pool and the reuse records are imported when a test first asks for a database, not when pytest
# loads the plugin: every run of a project that merely has refresher installed loads this module, and those
# imports (psycopg alone about 0.3 s here) doubled what importing pytest itself costs.
if TYPE_CHECKING:
    import psycopg
    import sqlalchemy
    from psycopg.rows import TupleRow

    from refresher._pytest_reuse import InUse, kept_servers, stop_all_kept
else:

    def __getattr__(name: str) -> Any:
        """``kept_servers`` and ``stop_all_kept``, re-exported on first use (see above)."""
        if name in ("kept_servers", "stop_all_kept"):
            from refresher import _pytest_reuse

            return getattr(_pytest_reuse, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


RUN_DIR_INPUT = "refresher_run_dir"
OWNER_PID_INPUT = "refresher_owner_pid"
_STATE = pytest.StashKey["_PluginState"]()
_T = TypeVar("_T")


class _PluginState:
    """Per-process plugin state: the run's shared servers and the resolved options (both made lazily)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        workerinput = getattr(config, "workerinput", {})
        self.worker: str = workerinput.get("workerid", "master")
        self.workers: int = int(workerinput.get("workercount", 1))
        given = workerinput.get(RUN_DIR_INPUT)
        self._run_dir = Path(given) if given else None
        self._owner = given is None
        # The process that stops the run's servers (the xdist controller): their owner in labels.
        self.owner_pid: int = int(workerinput.get(OWNER_PID_INPUT, os.getpid()))
        self._servers: SharedServers | None = None
        # One connection per loaded server for refresher_tx, kept for the session: connecting costs 10-30 ms
        # here, BEGIN and ROLLBACK well under one.
        self.tx_connections: dict[ServerInfo, psycopg.Connection[TupleRow]] = {}
        self._options: PluginOptions | None = None
        self._swept = False
        # Kept servers (--refresher-reuse) this process uses: no other run stops them until these are closed.
        self.in_use: list[InUse] = []

    @property
    def run_dir(self) -> Path:
        if self._run_dir is None:
            self._run_dir = new_run_dir(self.owner_pid)
        return self._run_dir

    @property
    def options(self) -> PluginOptions:
        if self._options is None:
            self._options = PluginOptions.from_config(self.config)
        return self._options

    @property
    def servers(self) -> SharedServers:
        if self._servers is None:
            self._servers = SharedServers(self.run_dir, owner=self._owner, stop=self._stop)
        return self._servers

    def sweep_once(self) -> None:
        """Before this process builds or reuses its first server, remove what killed runs left behind."""
        if not self._swept:
            self._swept = True
            sweep(self.options.settings)
            sweep_run_dirs()

    def _stop(self, server: LoadedServer) -> None:
        if not server.kept:
            stop_server(server, self.options.settings)

    def close(self) -> None:
        try:
            while self.tx_connections:
                self.tx_connections.popitem()[1].close()
            if self._servers is not None:
                self._servers.close()
            elif self._owner and self._run_dir is not None:
                # The xdist controller made a run directory for its workers but never used it itself.
                SharedServers(self._run_dir, owner=True, stop=self._stop).close()
        finally:
            while self.in_use:
                self.in_use.pop().close()


# -- hooks ------------------------------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(name): load this profile (name or YAML path) for refresher_db instead of the default",
    )
    state = config.stash[_STATE] = _PluginState(config)
    check_options(config, lambda: state.options)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistController(config.stash[_STATE]), "refresher-xdist")


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.close()


class _XdistController:
    """Hands every xdist worker the controller's run directory, so they share servers the controller stops."""

    def __init__(self, state: _PluginState) -> None:
        self.state = state

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[RUN_DIR_INPUT] = str(self.state.run_dir)
        node.workerinput[OWNER_PID_INPUT] = self.state.owner_pid


# -- public objects ---------------------------------------------------------------------------------------------
class RefresherServers:
    """The session's loaded servers, one per (profile, engine, as_of), built on first request."""

    def __init__(self, state: _PluginState) -> None:
        self._state = state

    @property
    def options(self) -> PluginOptions:
        return self._state.options

    def get(
        self, profile: str | None = None, *, engine: str | None = None, as_of: dt.date | str | None = None
    ) -> LoadedServer:
        return _or_fail(lambda: self._get(profile, engine=engine, as_of=as_of))

    def _get(self, profile: str | None, *, engine: str | None, as_of: dt.date | str | None) -> LoadedServer:
        options = self._state.options
        profile = profile or options.profile
        engine = engine or options.engine
        day = parse_as_of(as_of) if isinstance(as_of, str) else as_of or options.as_of
        key = server_key(profile, engine, day.isoformat() if day else "")

        def build(*, kept: bool = False) -> LoadedServer:
            self._state.sweep_once()
            return build_server(
                profile,
                engine,
                options.settings,
                as_of=day,
                run=self._state.run_dir.name,
                owner_pid=self._state.owner_pid,
                kept=kept,
                pool_size=self.pool_size,
            )

        def reuse_or_build() -> LoadedServer:
            from refresher import pool
            from refresher._pytest_reuse import drop_kept, fingerprint, kept_or_built, record_path

            kept_at = record_path(options.settings, self._state.config.rootpath, key)
            if not options.reuse:
                drop_kept(kept_at, options.settings)
                return build()
            self._state.sweep_once()  # a reuse run builds nothing, and would never sweep
            mark = fingerprint(
                profile, options.settings.profiles_dirs, engine=engine, as_of=day, today=dt.date.today()
            )
            server, in_use = kept_or_built(kept_at, options.settings, mark, lambda: build(kept=True), build)
            if in_use is not None:
                self._state.in_use.append(in_use)
            drop_abandoned_clones(server.info)  # what a run killed with -9 left on the kept server
            pool.resize_pool(server.info, self.pool_size)  # an earlier run may have kept another size
            return server

        # A marker's server is no session fixture (pytest caches only a session fixture's error): a build that
        # failed fails every later test at once (``SharedServers.get``).
        return self._state.servers.get(key, reuse_or_build)

    @property
    def pool_size(self) -> int:
        """The warm clones kept per loaded server in this run (``pool_size_for_workers``)."""
        return pool_size_for_workers(self._state.options.settings.pool_size, self._state.workers)

    def refiller(self, server: LoadedServer) -> PoolRefiller:
        return self._state.servers.refiller(server, pool_size=self.pool_size)

    def tx_connection(self, server: LoadedServer) -> psycopg.Connection[TupleRow]:
        """This process's connection to ``server``'s loaded database for ``refresher_tx``, idle between tests."""
        conn = self._state.tx_connections.get(server.info)
        if conn is None or conn.closed:
            import psycopg

            conn = psycopg.connect(server.dsn, connect_timeout=10)
            self._state.tx_connections[server.info] = conn
        return conn


class RefresherDatabase:
    """One test's own database: a fresh clone of the loaded profile, dropped after the test."""

    def __init__(self, server: LoadedServer, dbname: str, dsn: str) -> None:
        self.server = server
        self.dbname = dbname
        self.dsn = dsn
        self._cleanups: list[Callable[[], None]] = []

    @property
    def profile(self) -> str:
        return self.server.profile

    def connect(self, **kwargs: Any) -> psycopg.Connection[TupleRow]:
        """A psycopg connection to this database (closed at teardown if the test did not close it)."""
        import psycopg

        conn = psycopg.connect(self.dsn, **kwargs)
        self._cleanups.append(conn.close)
        return conn

    def sqlalchemy_engine(self, **kwargs: Any) -> sqlalchemy.Engine:
        """A SQLAlchemy engine (``postgresql+psycopg``) on this database, disposed at teardown."""
        import sqlalchemy

        info = self.server.info
        url = sqlalchemy.URL.create(
            "postgresql+psycopg", info.user, info.password, info.host, info.port, self.dbname
        )
        engine = sqlalchemy.create_engine(url, **kwargs)
        self._cleanups.append(engine.dispose)
        return engine

    def close(self) -> None:
        while self._cleanups:
            self._cleanups.pop()()

    def __repr__(self) -> str:
        return f"<RefresherDatabase {self.dbname} of {self.server.profile} on {self.server.engine}>"


# -- fixture factories --------------------------------------------------------------------------------------------
def refresher_proc(
    profile: str | None = None, *, engine: str | None = None, as_of: dt.date | str | None = None
) -> Any:
    """A session fixture: the server loaded with ``profile`` (default: the options'), shared across workers."""

    @pytest.fixture(scope="session")
    def proc_fixture(refresher_servers: RefresherServers) -> LoadedServer:
        return refresher_servers.get(profile, engine=engine, as_of=as_of)

    return proc_fixture


def refresher_database(proc_fixture_name: str) -> Any:
    """A function fixture: a fresh clone of ``proc_fixture_name``'s database for each test.

    A ``@pytest.mark.refresher_profile("name")`` on the test (or its class/module) picks that profile instead.
    """

    @pytest.fixture
    def database_fixture(
        request: pytest.FixtureRequest, refresher_servers: RefresherServers
    ) -> Iterator[RefresherDatabase]:
        from refresher import pool

        server = _server_for(request, refresher_servers, proc_fixture_name)
        worker = request.config.stash[_STATE].worker
        # 63 bytes at most: profile names are <= 41, "__test_" 7, the worker id <= 6, the random part 8.
        name = f"{per_test_clone_prefix(server.info)}{worker[:6]}_{secrets.token_hex(4)}"
        refiller = refresher_servers.refiller(server)
        dsn = pool.checkout_clone(
            server.info, name, refill=False, note=clone_note(os.getpid()), analyze=refiller.analyze
        )
        refiller.poke()
        database = RefresherDatabase(server, name, dsn)
        try:
            yield database
        finally:
            try:
                database.close()
            finally:
                refiller.discard(name)  # dropped by the refill thread, before the session ends

    return database_fixture


def refresher_transaction(proc_fixture_name: str) -> Any:
    """A function fixture: a psycopg connection to ``proc_fixture_name``'s loaded database, inside a transaction
    that is rolled back after the test.

    About a millisecond a test instead of a clone, for tests that use this one connection: every change,
    DDL included (PostgreSQL's DDL is transactional), is undone. ``conn.commit()`` and ``conn.autocommit``
    raise inside it; a raw ``COMMIT`` statement fails the test at teardown (and ends the session's use of
    this connection). A ``@pytest.mark.refresher_profile`` marker picks the profile as for ``refresher_db``.
    """

    @pytest.fixture
    def transaction_fixture(
        request: pytest.FixtureRequest, refresher_servers: RefresherServers
    ) -> Iterator[psycopg.Connection[TupleRow]]:
        import psycopg

        server = _server_for(request, refresher_servers, proc_fixture_name)
        conn, transaction = _begin(refresher_servers, server)
        try:
            yield conn
            ended = _end_transaction(conn, transaction)
        except psycopg.OperationalError:
            if not conn.closed:
                raise  # closing the connection rolled the transaction back: nothing to undo
            return
        if ended:
            conn.close()  # the next test gets a new connection
            pytest.fail(
                "refresher_tx: the test ended its transaction (a COMMIT or ROLLBACK statement?), so what it "
                f"committed stays in {server.info.dbname} for the rest of the run; use refresher_db for tests "
                "that commit",
                pytrace=False,
            )

    return transaction_fixture


def _begin(
    servers: RefresherServers, server: LoadedServer
) -> tuple[psycopg.Connection[TupleRow], contextlib.AbstractContextManager[psycopg.Transaction]]:
    """This process's ``refresher_tx`` connection to ``server``, in a new transaction, and that transaction.

    A kept connection the server ended while it sat idle between tests (a test on another worker ending the
    database's sessions, a restart, ``idle_session_timeout``) is replaced by a new one; no round trip is spent
    checking it first.
    """
    import psycopg

    conn = servers.tx_connection(server)
    try:
        return conn, _savepoint(conn)
    except psycopg.OperationalError:
        if not conn.closed:
            raise
    conn = servers.tx_connection(server)  # a new connection: the old one is closed
    return conn, _savepoint(conn)


def _savepoint(conn: psycopg.Connection[TupleRow]) -> contextlib.AbstractContextManager[psycopg.Transaction]:
    """A transaction begun on ``conn`` (left by ``_end_transaction``), at the savepoint ``refresher_tx``."""
    transaction = conn.transaction(force_rollback=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(transaction)  # left here only if the savepoint fails
        # Gone at teardown only if the transaction ended in the test: a raw COMMIT, even one followed by more
        # statements (they run in a new transaction, which alone the rollback would undo).
        conn.execute("SAVEPOINT refresher_tx")
        stack.pop_all()
    return transaction


def _end_transaction(
    conn: psycopg.Connection[TupleRow], transaction: contextlib.AbstractContextManager[psycopg.Transaction]
) -> bool:
    """Roll ``refresher_tx``'s ``transaction`` back and clean the session, in one round trip (a pipeline); whether
    the test had ended the transaction itself (its savepoint gone: the connection is then left aborted).

    Back to the savepoint (which also leaves the aborted state of a statement that failed), ROLLBACK, then
    DISCARD ALL for what a rollback leaves: session advisory locks (another worker's test would wait for them
    forever), prepared statements, settings. DISCARD ALL cannot run in a transaction block, nor after another
    statement of the pipeline's implicit transaction: it follows our ROLLBACK, before psycopg leaves its
    transaction (a second ROLLBACK, a no-op by then, and a DEALLOCATE ALL of its prepared statements).
    """
    import psycopg

    try:
        with conn.pipeline():
            try:
                conn.execute("ROLLBACK TO SAVEPOINT refresher_tx")
                conn.execute("ROLLBACK")
                conn.execute("DISCARD ALL")
            finally:
                transaction.__exit__(None, None, None)
    except (psycopg.errors.InvalidSavepointSpecification, psycopg.errors.PipelineAborted):
        # PipelineAborted: the statements after a failed one were skipped, and the failure itself (the savepoint's,
        # the only statement here that fails on a live connection) was met by psycopg leaving its transaction,
        # which logs and ignores it. Either way the connection is left aborted, to be closed.
        return True
    return False


def _or_fail(get: Callable[[], _T]) -> _T:
    """``get()``; bad input (a profile, an option) is the user's to fix: the test fails with one line, not a
    45-line traceback (and not the chained one ``pytest.fail`` inside the ``except`` would print)."""
    try:
        return get()
    except USER_ERRORS as exc:
        message = f"refresher: {in_plugin_terms(str(exc))}"
    except OSError as exc:  # a read-only or full store or state dir
        if (reason := os_error_message(exc)) is None:
            raise
        message = f"refresher: {reason}"
    pytest.fail(message, pytrace=False)


def _server_for(
    request: pytest.FixtureRequest, servers: RefresherServers, proc_fixture_name: str
) -> LoadedServer:
    """The marker's profile if the test has one, else the server of ``proc_fixture_name``."""
    marked = _or_fail(lambda: marker_profile(request.node))
    server: LoadedServer = servers.get(marked) if marked else request.getfixturevalue(proc_fixture_name)
    return server


# -- the named fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def refresher_servers(request: pytest.FixtureRequest) -> RefresherServers:
    """Loaded servers by profile: ``refresher_servers.get("backtesting")``."""
    return RefresherServers(request.config.stash[_STATE])


refresher_postgres = refresher_proc()
refresher_db = refresher_database("refresher_postgres")
refresher_tx = refresher_transaction("refresher_postgres")

__all__ = [
    "LoadedServer",
    "RefresherDatabase",
    "RefresherServers",
    "kept_servers",
    "refresher_database",
    "refresher_db",
    "refresher_postgres",
    "refresher_proc",
    "refresher_servers",
    "refresher_transaction",
    "refresher_tx",
    "stop_all_kept",
]
