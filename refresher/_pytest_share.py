"""One loaded server per profile for a whole test run, shared by every xdist worker.

The run directory holds, per server key, a lock file and the ``LoadedServer`` JSON. The first process to need a
server builds it while holding the lock; the others wait on the lock, then read the JSON. The process that owns
the run directory (the xdist controller, or the only process without xdist) stops every recorded server when
the run ends: it outlives all workers, so a server is never stopped while a slower worker still needs it, and a
crashed worker cannot leak one.

Each process keeps its clone pools full from one background thread per server (``PoolRefiller``) instead of
spawning a refill process per checkout. The workers' refillers fill different pool slots at once (a lock per
slot in ``refresher.pool``), and the pool is sized for the number of workers (``pool_size_for_workers``) unless
the user chose its size.

Every test's clone is marked with the process that took it (``clone_note``): a ``--refresher-reuse`` run killed
with -9 leaves its clones on the kept server, and the next run drops those whose owner is provably gone
(``drop_abandoned_clones``), never a live concurrent run's.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from filelock import FileLock

from refresher._pytest_servers import LoadedServer, sweep_abandoned_dirs
from refresher.engines import owner_gone, owner_labels, write_private_json
from refresher.engines.base import ServerInfo
from refresher.errors import USER_ERRORS, SnapshotError
from refresher.settings import DEFAULT_POOL_SIZE, PoolSize

if TYPE_CHECKING:
    from refresher import pool
# Otherwise the pool (and psycopg with it) is imported where a server is used: the plugin imports this module in
# every pytest run, refresher's fixtures used or not (``refresher.pytest_plugin``).

_T = TypeVar("_T")


def server_key(profile: str, engine: str, as_of: str) -> str:
    """A file-name-safe key for one (profile spec, requested engine, as_of) combination."""
    readable = re.sub(r"[^a-z0-9_]+", "_", Path(profile).stem.lower())[:40]
    digest = hashlib.sha256(f"{profile}\0{engine}\0{as_of}".encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


RUN_DIR_PREFIX = "refresher-pytest-"
# Not *.json: the owner stops every *.json of its run directory as a server record.
RUN_OWNER_FILE = "owner.labels"


def new_run_dir(owner_pid: int) -> Path:
    """A new run directory under the temporary directory, naming ``owner_pid`` (the process that removes it)."""
    path = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    write_private_json(path / RUN_OWNER_FILE, owner_labels(owner_pid))
    return path


def sweep_run_dirs() -> list[str]:
    """Remove the run directories whose owner is gone (a run killed with -9): nothing else ever would."""
    return sweep_abandoned_dirs(
        Path(tempfile.gettempdir()),
        RUN_DIR_PREFIX,
        RUN_OWNER_FILE,
        lambda path: shutil.rmtree(path, ignore_errors=True),
    )


TEST_INFIX = "__test_"
_NOTE_PREFIX = "refresher test_clone owner="


def per_test_clone_prefix(server: ServerInfo) -> str:
    """How the names of the per-test clones of ``server``'s database begin."""
    return f"{server.dbname}{TEST_INFIX}"


def clone_note(pid: int) -> str:
    """The database comment of a test's clone taken by process ``pid``."""
    return _NOTE_PREFIX + json.dumps(owner_labels(pid), sort_keys=True)


def drop_abandoned_clones(server: ServerInfo) -> list[str]:
    """Drop the per-test clones whose owner process is gone (a run killed with -9); returns their names."""
    from refresher import pool

    dropped = []
    for name, note in pool.clone_notes(server, per_test_clone_prefix(server)).items():
        if not note.startswith(_NOTE_PREFIX):
            continue  # not ours to judge
        try:
            labels = json.loads(note.removeprefix(_NOTE_PREFIX))
        except ValueError:
            continue
        if isinstance(labels, dict) and owner_gone(labels):
            pool.drop_clone(server, name)
            dropped.append(name)
    return dropped


def pool_size_for_workers(chosen: PoolSize | None, workers: int) -> int:
    """The clones a run keeps per server: ``chosen`` ($REFRESHER_POOL_SIZE, --refresher-pool-size), else (None,
    ``auto``) one ready for each worker's next test and one more for whichever comes back first.

    The pool's depth helps only bursts (steady state is bounded by how fast clones are copied), and each clone
    is a full copy of the database on disk without reflinks: a user short of disk chooses fewer, or 0.
    """
    return chosen if isinstance(chosen, int) else max(DEFAULT_POOL_SIZE, workers + 1)


def _lock(path: Path) -> FileLock:
    """An exclusive lock that the kernel releases if the holder dies (a killed worker never wedges the run)."""
    return FileLock(path, thread_local=False)


class PoolRefiller:
    """Drops used clones and keeps one server's warm pool full, from a background thread of this process.

    Both are off the test's critical path: a checkout is a rename (about 10 ms), while dropping a clone (about
    25 ms) and cloning the template again (about 120 ms for ui_testing on ext4) run while the next test does.
    """

    def __init__(self, server: ServerInfo, *, pool_size: int | None = None) -> None:
        """``pool_size``: clones to keep ready (default: what the snapshot recorded)."""
        self.server = server
        self.pool_size = pool_size
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._to_drop: list[str] = []
        self._to_analyze: list[pool.HandedOut] = []
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def poke(self) -> None:
        """Refill the pool soon (after a checkout)."""
        if self.error is not None:
            raise SnapshotError(f"refilling the clone pool of {self.server.dbname} failed: {self.error}")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="refresher-pool-refill", daemon=True)
            self._thread.start()
        self._wake.set()

    def analyze(self, handed: pool.HandedOut) -> None:
        """Analyze ``handed`` soon, before refilling: a clone checked out while the pristine copy had no
        statistics yet (``pool.checkout_clone``)."""
        with self._lock:
            self._to_analyze.append(handed)
        self.poke()

    def discard(self, name: str) -> None:
        """Drop the clone ``name`` soon; ``close`` waits until it is gone."""
        with self._lock:
            self._to_drop.append(name)
        self.poke()

    def _drop_pending(self) -> None:
        from refresher import pool

        while (name := self._next(self._to_drop)) is not None:
            pool.drop_clone(self.server, name)

    def _analyze_pending(self) -> None:
        from refresher import pool

        while (handed := self._next(self._to_analyze)) is not None:
            pool.analyze_handed_out(self.server, handed)

    def _next(self, queue: list[_T]) -> _T | None:
        with self._lock:
            return queue.pop(0) if queue else None

    def _run(self) -> None:
        from refresher import pool

        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self._drop_pending()
                if self._closing.is_set():
                    return
                self._analyze_pending()
                pool.refill_pool(self.server, size=self.pool_size)
            except Exception as exc:  # reported by the next poke, in the test thread
                self.error = exc
                return

    def close(self) -> None:
        """Finish pending drops and stop the thread; raises what the thread failed with."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        if self.error is not None:
            raise SnapshotError(f"dropping clones of {self.server.dbname} failed: {self.error}")


class SharedServers:
    """The loaded servers of one test run, as seen from one process (a worker, or the only process)."""

    def __init__(self, run_dir: Path, *, owner: bool, stop: Callable[[LoadedServer], None]) -> None:
        """``stop`` stops one recorded server; the owner calls it for each when the run ends."""
        self.run_dir = run_dir
        self.owner = owner
        self._stop = stop
        self._seen: dict[str, LoadedServer] = {}
        # Why a server could not be built, by key: every later test fails with it at once, not after a new try
        # (a missing image or a broken profile cost each of 500 tests a second or more). With the traceback it
        # was first raised with: each raise of the one exception object adds the raising frames to its own.
        self._failed: dict[str, tuple[Exception, TracebackType | None]] = {}
        self._refillers: dict[ServerInfo, PoolRefiller] = {}

    def get(self, key: str, build: Callable[[], LoadedServer]) -> LoadedServer:
        """The server recorded under ``key``, built by this process if no process has built it yet. A build
        that failed with bad input or an OSError is not tried again: each later call raises its error."""
        if key in self._seen:
            return self._seen[key]
        if key in self._failed:
            failure, traceback = self._failed[key]
            raise failure.with_traceback(traceback)
        record_path = self.run_dir / f"{key}.json"
        try:
            with _lock(self.run_dir / f"{key}.lock"):
                if record_path.exists():
                    server = LoadedServer.from_json(record_path.read_text(encoding="utf-8"))
                else:
                    server = build()
                    write_private_json(record_path, json.loads(server.to_json()))  # it holds a password
        except (*USER_ERRORS, OSError) as exc:
            # Less this call's own frame, which each later raise adds back: the same traceback every time.
            self._failed[key] = (exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
            raise
        self._seen[key] = server
        return server

    def refiller(self, server: LoadedServer, *, pool_size: int) -> PoolRefiller:
        """This process's refill thread for ``server``'s clone pool of ``pool_size`` clones."""
        if server.info not in self._refillers:
            self._refillers[server.info] = PoolRefiller(server.info, pool_size=pool_size)
        return self._refillers[server.info]

    def close(self) -> None:
        """Stop this process's refill threads; the owner also stops every server of the run."""
        errors: list[BaseException] = []
        for refiller in self._refillers.values():
            try:
                refiller.close()
            except Exception as exc:
                errors.append(exc)
        self._refillers.clear()
        if not self.owner:
            if errors:
                raise errors[0]
            return
        for record_path in sorted(self.run_dir.glob("*.json")):
            with _lock(record_path.with_suffix(".lock")):
                try:
                    self._stop(LoadedServer.from_json(record_path.read_text(encoding="utf-8")))
                except Exception as exc:  # stop the others anyway, then report
                    errors.append(exc)
                record_path.unlink(missing_ok=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if errors:
            raise errors[0]


__all__ = [
    "RUN_DIR_PREFIX",
    "PoolRefiller",
    "SharedServers",
    "clone_note",
    "drop_abandoned_clones",
    "new_run_dir",
    "per_test_clone_prefix",
    "pool_size_for_workers",
    "server_key",
    "sweep_run_dirs",
]
