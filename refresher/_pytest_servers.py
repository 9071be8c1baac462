"""Servers the pytest plugin owns: start one, load a profile into it, describe it as JSON, stop it.

Every server comes from the engines' one door (``select_engine``/``make_engine``) over a throwaway state dir of
its own, ``<state dir>/pytest-XXXX``: never the CLI's server for the profile, never another run's (Docker names
and labels are scoped by the state dir). Stopping is ``engine.stop`` and removing that directory.

A ``LoadedServer`` says everything another process needs to use the server and, later, to stop it, so xdist
workers can share one server built by whichever worker came first (``refresher._pytest_share``).

A run killed before it could stop its servers leaves them behind; the next run removes them (``sweep``), but
only those whose owning process is provably gone, so another checkout's live run is never touched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from refresher.engines.base import ServerInfo
from refresher.errors import EngineUnavailable
from refresher.settings import Settings

# The loading pipeline (pandas, pyarrow, duckdb) and the engines are imported when a server is built, not when
# pytest loads the plugin: every test run of a project that merely has refresher installed loads this module.

# The label on plugin-made containers and volumes (its value names the run), so leftovers can be found.
PYTEST_LABEL = "io.refresher.pytest"
THROWAWAY_PREFIX = "pytest-"
OWNER_FILE = "owner.json"


@dataclass(frozen=True)
class LoadedServer:
    """A loaded server for one profile, and the throwaway state dir whose engine stops it."""

    profile: str
    info: ServerInfo
    # The profile's resolved date range, so tests can compute what the database must hold.
    start: dt.date
    end: dt.date
    state_dir: str
    rows_loaded: int = 0
    load_seconds: float = 0.0
    # Kept running after the run for the next one (--refresher-reuse): the run's end does not stop it.
    kept: bool = False
    # [path, sha256 or None] of every file the profile was read from (``Profile.inputs``): its YAML, its
    # universe file. A kept server is reused only while they are unchanged.
    inputs: tuple[tuple[str, str | None], ...] = ()
    # Without a fixed as_of: the next session close after the load (ISO, UTC), when the data's default end moves.
    valid_until: str | None = None

    @property
    def engine(self) -> str:
        return self.info.engine

    @property
    def dsn(self) -> str:
        """The loaded working database (tests should use a ``refresher_db`` clone rather than write here)."""
        return self.info.dsn()

    def to_json(self) -> str:
        data = asdict(self)
        # Not kept: an older plugin's ServerInfo has no such field, and a server reloaded asks its cluster.
        data["info"].pop("cluster", None)
        data["start"], data["end"] = self.start.isoformat(), self.end.isoformat()
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> LoadedServer:
        data: dict[str, Any] = json.loads(text)
        data["info"] = ServerInfo(**data["info"])
        data["start"], data["end"] = dt.date.fromisoformat(data["start"]), dt.date.fromisoformat(data["end"])
        data["inputs"] = tuple((str(path), digest) for path, digest in data.get("inputs", ()))
        return cls(**data)


def build_server(
    name_or_path: str,
    engine: str,
    settings: Settings,
    *,
    as_of: dt.date | None,
    run: str,
    owner_pid: int,
    kept: bool = False,
    pool_size: int,
) -> LoadedServer:
    """Start a new server for the profile with ``engine`` (auto, local or docker) and load the profile into it.

    ``run`` names the test run and ``owner_pid`` the process that will stop the server (the xdist controller).
    A server to keep between runs (``kept``) carries no owner labels, and its directory names ``owner_pid`` only
    until ``mark_kept`` (once it is recorded for reuse): a run killed while building it leaves a server the
    sweep removes, where nothing would ever stop it. ``pool_size``: the warm clones its snapshot records. Its
    refresh notes the minute segments whose COPY bodies the store lacks under ``settings.state_dir`` and its
    detached refill makes them, off the run (``refresher.body_keys``), as after `refresher refresh`.
    """
    from featurestore import FeatureStore
    from refresher.engines import owner_labels, select_engine
    from refresher.profile import load_profile
    from refresher.refresh import refresh
    from refresher.stamp import valid_until

    started = dt.datetime.now(dt.UTC)  # the profile resolves its default end from the time now
    profile = load_profile(name_or_path, settings.profiles_dirs, as_of=as_of)
    store = FeatureStore(settings.store_root)
    owner = owner_labels(owner_pid)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix=THROWAWAY_PREFIX, dir=settings.state_dir))
    # The embedded server runs as another OS user when we are root; it must be able to traverse the directory.
    os.chmod(state, 0o755)
    (state / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    throwaway = replace(settings, state_dir=state)
    try:
        labels = {PYTEST_LABEL: run} if kept else {PYTEST_LABEL: run, **owner}
        server = select_engine(engine, throwaway, labels=labels)
        # The run's own state dir, not the throwaway one: the COPY bodies to make are listed there for the
        # server's detached refill, which reads the list after its clones, by when a short run may have removed
        # the throwaway dir (a killed refill's list is then picked up by the next run). Without it, every run's
        # load into its new server read the Parquet files, and its refill never made a body for the next one.
        report = refresh(profile, server, store, pool_size=pool_size, state_dir=settings.state_dir)
        info = server.info(profile.name)
        if info is None:
            raise EngineUnavailable(
                f"the {server.name} server for {profile.name} in {state} stopped after loading"
            )
    except BaseException:
        with contextlib.suppress(Exception):
            stop_everything(throwaway)
        raise
    return LoadedServer(
        profile.name,
        info,
        profile.start,
        profile.end,
        state_dir=str(state),
        rows_loaded=report.rows_loaded,
        load_seconds=report.seconds,
        kept=kept,
        inputs=tuple((str(path), digest) for path, digest in profile.inputs),
        valid_until=None if as_of is not None else valid_until(profile, started).isoformat(),
    )


def mark_kept(server: LoadedServer) -> None:
    """``server`` is recorded for reuse now: it has no owner process any more, and no sweep removes it."""
    from refresher.engines import write_private_json

    write_private_json(Path(server.state_dir) / OWNER_FILE, {})


def stop_server(record: LoadedServer, settings: Settings) -> None:
    """Stop the server and remove its state dir; tolerant of a server already gone (a crash, a second call)."""
    from refresher.engines import make_engine

    state = Path(record.state_dir)
    if state.exists():
        make_engine(record.engine, replace(settings, state_dir=state)).stop(record.profile)
        shutil.rmtree(state, ignore_errors=True)


def sweep(settings: Settings) -> list[str]:
    """Remove what killed runs left: throwaway state dirs and containers whose owner process is gone."""
    from refresher.engines import sweep_abandoned

    removed = sweep_abandoned(PYTEST_LABEL)
    removed += sweep_abandoned_dirs(
        settings.state_dir,
        THROWAWAY_PREFIX,
        OWNER_FILE,
        lambda state: stop_everything(replace(settings, state_dir=state)),
    )
    return removed


def sweep_abandoned_dirs(
    parent: Path, prefix: str, owner_file: str, remove: Callable[[Path], None]
) -> list[str]:
    """``remove`` every ``parent/prefix*`` directory whose ``owner_file`` (``owner_labels``) names a process of
    this host that is gone; returns their paths. One without a readable owner is left alone."""
    from refresher.engines import owner_gone

    removed = []
    for path in sorted(parent.glob(f"{prefix}*")):
        try:
            owner = json.loads((path / owner_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being made right now, or not ours to judge
        if isinstance(owner, dict) and owner_gone(owner):
            remove(path)
            removed.append(str(path))
    return removed


def stop_everything(throwaway: Settings) -> None:
    """Stop every server any engine has in the throwaway state dir, then remove the dir."""
    from refresher.engines import docker_answers, make_engine

    names = (
        ["local", "docker"] if (throwaway.state_dir / "docker").exists() and docker_answers() else ["local"]
    )
    for name in names:
        engine = make_engine(name, throwaway)
        for status in engine.status():
            engine.stop(status.profile)
    shutil.rmtree(throwaway.state_dir, ignore_errors=True)


__all__ = [
    "OWNER_FILE",
    "PYTEST_LABEL",
    "THROWAWAY_PREFIX",
    "LoadedServer",
    "build_server",
    "mark_kept",
    "stop_everything",
    "stop_server",
    "sweep",
    "sweep_abandoned_dirs",
]
