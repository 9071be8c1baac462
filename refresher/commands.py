"""The library face of each CLI command: Settings in, a report object out (no printing here)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from refresher._lazy import LazyModule
from refresher.errors import EngineStateError, ProfileError, RefresherError, SnapshotError
from refresher.settings import Settings

# Each command imports what it alone needs, inside it: `refresher url` must not pay for pyarrow, pandas and
# DuckDB (about a second on this machine), which only refresh, plan and warm use, nor `refresher profiles`,
# which asks no server, for psycopg and the engines (LazyModule: imported on first use).
# tests/refresher/test_cli_imports.py holds each command to the modules it may import.
if TYPE_CHECKING:
    import filelock
    import psycopg

    from refresher import body_keys, diskfull, engines, pool, profile_lock, snapshot, stamp
    from refresher.engines.base import Engine, ServerInfo, ServerStatus
    from refresher.pool import PoolStatus
    from refresher.profile import BadRowPolicy, Profile
    from refresher.refresh import PlanReport, ProgressCallback, RefreshReport
    from refresher.warm import WarmReport
else:
    filelock = LazyModule("filelock")
    psycopg = LazyModule("psycopg")
    body_keys = LazyModule("refresher.body_keys")
    diskfull = LazyModule("refresher.diskfull")
    engines = LazyModule("refresher.engines")
    pool = LazyModule("refresher.pool")
    profile_lock = LazyModule("refresher.profile_lock")
    snapshot = LazyModule("refresher.snapshot")
    stamp = LazyModule("refresher.stamp")


@contextmanager
def _database_errors(profile: str) -> Iterator[None]:
    """A server that vanished or refuses us mid-command is a one-line error, not a traceback."""
    try:
        yield
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineStateError(
            f"profile {profile}: lost the database server ({first}); "
            f"check `refresher status`, or `refresher down --profile {profile}` and refresh again"
        ) from exc


def _profile(
    settings: Settings,
    name: str,
    as_of: dt.date | None = None,
    on_bad_rows: BadRowPolicy | None = None,
    allow_shrink: bool | None = None,
) -> Profile:
    from refresher.profile import load_profile, with_source_policy

    profile = load_profile(name, settings.profiles_dirs, as_of=as_of, private_dirs=(settings.state_dir,))
    return with_source_policy(profile, on_bad_rows=on_bad_rows, allow_shrink=allow_shrink)


def refresh(
    settings: Settings,
    name: str,
    *,
    prune: bool = False,
    verify: bool = False,
    as_of: dt.date | None = None,
    progress: ProgressCallback | None = None,
    on_bad_rows: BadRowPolicy | None = None,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
    allow_shrink: bool | None = None,
    on_stamp: Callable[[str], None] | None = None,
) -> RefreshReport:
    """``refresher refresh``; the pool keeps ``settings.pool_size`` warm clones (None: the size the server's
    snapshot records, else ``DEFAULT_POOL_SIZE``). ``on_stamp`` is told whether the refresh was stamped, and why
    not (``refresh -v``)."""
    from featurestore import FeatureStore
    from refresher.refresh import refresh as _refresh

    profile = _profile(settings, name, as_of, on_bad_rows, allow_shrink)
    engine = engines.select_engine(settings.engine, settings, profile.name)
    with (
        profile_lock.hold_profile(settings.state_dir, profile.name, wait=wait, on_wait=on_wait),
        _database_errors(profile.name),
        diskfull.store_disk_full(settings.store_root),
    ):
        stamp.clear(settings.state_dir, profile.name, engine.name)
        # a store from before generations gets one here
        store = FeatureStore(settings.store_root, on_wait=on_wait)
        # before the plan reads the store: a removal while this refresh runs leaves a stamp that does not answer
        store_state = stamp.store_state(settings.store_root)
        report = _refresh(
            profile,
            engine,
            store,
            prune=prune,
            verify=verify,
            progress=progress,
            pool_size=settings.pool_size,
            state_dir=settings.state_dir,
            wait=wait,
            on_wait=on_wait,
        )
        server = engine.info(profile.name)
        # no stamp only costs the next no-op its speed
        why: str | None = "the server is not running"
        if server is not None:
            try:
                why = stamp.write(settings.state_dir, store_state, profile, server, report.to_json())
            except (OSError, psycopg.Error, RefresherError) as exc:
                why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if on_stamp is not None:
            on_stamp("written" if why is None else f"not written: {why}")
        return report


def refresh_if_noop(settings: Settings, name: str) -> stamp.Verdict:
    """The report of a ``refresh`` (without flags) that the profile's stamp proves has nothing to do, found with
    the server's psql (psycopg where that cannot tell) and without parsing the profile (``refresher.stamp``); its
    report is None when it must run in full, and its ``why`` says why."""
    from refresher.profile_files import validate_profile

    try:
        path = _find_profile(settings, name)
        profile = validate_profile(path.stem)
    except ProfileError as exc:
        # the full path reads the profile and says what is wrong with it
        return stamp.Verdict(None, f"the profile: {exc}")
    engine = engines.select_engine(settings.engine, settings, profile)
    server = engine.info(profile)
    if server is None:
        return stamp.Verdict(None, f"no running server of profile {profile} ({engine.name} engine)")
    verdict = stamp.verdict(
        settings.state_dir, settings.store_root, path, server, pool_size=settings.pool_size
    )
    if verdict.report is not None:
        _refill_left_bodies(settings, profile, server)
    return verdict


def _refill_left_bodies(settings: Settings, profile: str, server: ServerInfo) -> None:
    """Spawn a refill without clones for the profile's list of COPY bodies when no refill holds it (one killed by a
    reboot or SIGKILL left it; ``body_keys.unheld``): a refresh the stamp answers loads nothing and spawned none,
    so those bodies waited for the next refresh that loads, or `refresher warm`. Detached, as after a full
    refresh; the check is one ``open`` (no list: the usual no-op, nothing more imported than ``body_keys``). Not
    for a list a maker left with what it could not make (``body_keys.tried``: their files gone or damaged), which
    spawned a refill failing on the same segments at every no-op."""
    keys = body_keys.keys_path(settings.state_dir, profile)
    if body_keys.unheld(keys) and not body_keys.tried(keys):
        from refresher._refill_spawn import spawn_refill  # not ``pool``: it imports psycopg

        spawn_refill(server, fill=False, bodies=(keys, settings.store_root))


def plan(
    settings: Settings,
    name: str,
    *,
    verify: bool = False,
    as_of: dt.date | None = None,
    on_bad_rows: BadRowPolicy | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> PlanReport:
    """``refresher plan``; ``on_wait`` is told when the store's manifest (``FeatureStore``) or a reset's shut door
    (``refresh.plan_refresh``) is waited for."""
    import tempfile

    from featurestore import FeatureStore
    from featurestore.manifest import MANIFEST_FILE
    from refresher.refresh import plan_refresh

    profile = _profile(settings, name, as_of, on_bad_rows)
    engine = engines.select_engine(settings.engine, settings, profile.name)
    with _database_errors(profile.name), ExitStack() as stack:
        if (settings.store_root / MANIFEST_FILE).exists():
            store = FeatureStore(settings.store_root, on_wait=on_wait)
        else:
            # A missing store is an empty one; plan against a throwaway empty store rather than create the
            # user's root and manifest: `plan` promises to touch nothing.
            store = FeatureStore(stack.enter_context(tempfile.TemporaryDirectory(prefix="refresher-plan-")))
        return plan_refresh(profile, engine, store, verify=verify, on_wait=on_wait)


def warm(
    settings: Settings,
    name: str,
    *,
    as_of: dt.date | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> WarmReport:
    """``refresher warm``: the profile's segments and features into the store; no engine is even chosen.
    ``on_wait`` is told when the store's manifest is waited for (``FeatureStore``)."""
    from featurestore import FeatureStore
    from refresher.warm import warm as _warm

    return _warm(
        _profile(settings, name, as_of),
        FeatureStore(settings.store_root, on_wait=on_wait),
        state_dir=settings.state_dir,
    )


def _engine_of(settings: Settings, name: str) -> Engine | None:
    """The engine serving profile ``name``: the one with its state (``auto``), else the one configured."""
    _check_name(settings, name)
    if settings.engine == "auto":
        return engines.engine_serving(name, settings)
    return engines.make_engine(settings.engine, settings)


def _serving(
    settings: Settings, name: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> tuple[Engine, ServerInfo]:
    """The engine and running server of a profile; a stopped server (after a reboot) is started again, waiting for
    another command starting or stopping it as ``Engine.start`` does."""
    engine = _engine_of(settings, name)
    if engine is None:
        raise _no_server(settings, name, "no server")
    server = engine.info(name)
    if server is None:
        if not engine.status(name):
            raise _no_server(settings, name, f"no {engine.name} server")
        if engine.is_new(name):
            # Its state file is left but its data is not (`docker system prune --volumes` after a reboot, the data
            # directory removed, a first refresh killed or still starting): a start would make an empty server, after
            # an initdb's wait, for the URL or the reset to find without tables. Only a refresh makes what they need.
            raise _no_server(
                settings,
                name,
                f"its {engine.name} server has no data yet (removed outside refresher, or its first refresh stopped)",
            )
        server = engine.start(name, wait=wait, on_wait=on_wait)
    return engine, server


def _find_profile(settings: Settings, name: str) -> Path:
    """The file of profile ``name`` in the profiles dirs or this state dir's own; ProfileError listing the
    profiles when none is."""
    from refresher.profile_files import find_profile_file

    return find_profile_file(name, settings.profiles_dirs, private_dirs=(settings.state_dir,))


def _check_name(settings: Settings, name: str) -> None:
    """A name that is no valid profile name (``UI_testing``) is a typo: one line listing the profiles, before
    an engine or a lock refuses it naming only the pattern."""
    from refresher.profile_files import PROFILE_NAME

    if not PROFILE_NAME.match(name):
        _find_profile(settings, name)


def _no_server(settings: Settings, name: str, what: str) -> RefresherError:
    """The error of a command needing ``name``'s server when it has none: a name no profile has is a typo
    (``make url PROFILE=ui_testin``), which lists the profiles; else how to start it, in the user's words
    (under ``make``, where ``refresher`` is not on a new user's PATH, the make target)."""
    try:
        _find_profile(settings, name)
    except ProfileError as exc:  # its own words: which profiles there are (``ProfileError.unknown``)
        return exc
    return SnapshotError(f"profile {name}: {what}; run `{_refresh_command(name)}` first")


def _refresh_command(name: str) -> str:
    """How the user refreshes ``name``: under ``make`` (``refresher`` not on a new user's PATH) its target."""
    return (
        f"make refresh PROFILE={name}"
        if os.environ.get("MAKELEVEL")
        else f"refresher refresh --profile {name}"
    )


def reset(
    settings: Settings, name: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> snapshot.RestoreReport:
    _check_name(settings, name)
    with profile_lock.hold_profile(settings.state_dir, name, wait=wait, on_wait=on_wait):
        engine, server = _serving(settings, name, wait=wait, on_wait=on_wait)
        with _database_errors(name):
            try:
                try:
                    return snapshot.restore_pristine(server)
                except SnapshotError as exc:
                    if not exc.fields.get("unreachable"):
                        raise
                    # A container still initialising (a first refresh killed in its wait) runs, but refuses every
                    # connection until its entrypoint restarts the server: wait as a start does (its log tail on a
                    # timeout), then try once more, as the user would: a reset failed part way is one to finish.
                    return snapshot.restore_pristine(engine.start(name, wait=wait, on_wait=on_wait))
            except SnapshotError as exc:
                if "missing" not in exc.fields:
                    raise
                # a first refresh stopped (Ctrl-C) before its snapshot: running it again finishes it
                raise SnapshotError(
                    f"profile {name}: no pristine snapshot yet (its refresh has not finished); "
                    f"run `{_refresh_command(name)}`",
                    **exc.fields,
                ) from None


def url(
    settings: Settings, name: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> str:
    """The DSN of ``name``'s database. While its first refresh runs (the profile's lock held and no pristine
    copy yet: a server still being made, or one half loaded), waits for that refresh as a reset does (``wait``
    False: ``ProfileBusy`` at once), then answers as it left things: "no server" while a refresh was making it
    was untrue, and the URL of a database half loaded was one a script took for ready. A later refresh is not
    waited for (the database it updates is whole, segment by segment, as it has always been)."""
    _check_name(settings, name)  # before the lock's own check of the name, which lists no profiles
    server: ServerInfo | None = None
    if profile_lock.held(settings.state_dir, name):
        # Only a server running now: the refresh holding the lock may be starting it, under the engine's lock, which
        # a start of ours waited for, and for good while that refresh was stopped (Ctrl-Z), even with ``wait`` False.
        engine = _engine_of(settings, name)
        server = None if engine is None else engine.info(name)
    else:
        try:
            server = _serving(settings, name, wait=wait, on_wait=on_wait)[1]
        except SnapshotError:
            if not profile_lock.held(settings.state_dir, name):
                raise
    if server is not None and (not profile_lock.held(settings.state_dir, name) or _has_pristine(server)):
        return server.dsn()
    with profile_lock.hold_profile(settings.state_dir, name, wait=wait, on_wait=on_wait):
        return _serving(settings, name, wait=wait, on_wait=on_wait)[1].dsn()


def _has_pristine(server: ServerInfo) -> bool:
    """Whether ``server`` holds its pristine copy; a server still starting (it refuses connections) does not."""
    try:
        return snapshot.has_pristine(server)
    except (RefresherError, psycopg.Error):
        return False


def status(settings: Settings, name: str | None = None, *, all_checkouts: bool = False) -> list[ServerStatus]:
    """This state dir's servers; ``all_checkouts`` adds every refresher container on the Docker daemon."""
    statuses = engines.all_statuses(settings, all_checkouts=all_checkouts)
    found = [s for s in statuses if name is None or s.profile == name]
    if name is not None and not found:
        # neither a server nor a profile: a typo (`status --profile ui_testin`), which lists the profiles
        _find_profile(settings, name)
    return found


def pools(settings: Settings, statuses: list[ServerStatus]) -> list[PoolStatus | None]:
    """The warm pool of each of ``statuses`` (``refresher status``): its size, the clones ready, and so whether a
    reset renames or copies. None for a server that is stopped, not this state dir's, or does not answer."""
    found: list[PoolStatus | None] = []
    for listed in statuses:
        server = None
        if listed.running:
            with contextlib.suppress(RefresherError, psycopg.Error):
                server = engines.make_engine(listed.engine, settings).info(listed.profile)
        if server is None or server.port != listed.port:  # another checkout's server of the same profile
            found.append(None)
            continue
        try:
            bodies = body_keys.keys_path(
                settings.state_dir, listed.profile
            )  # a line of them only while listed
            found.append(pool.pool_status(server, bodies=bodies))
        except (RefresherError, psycopg.Error):
            found.append(None)
    return found


def left_out(
    settings: Settings,
    name: str,
    *,
    on_bad_rows: BadRowPolicy | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> tuple[str, ...]:
    """What the source left out of the profile's segments, as stored with them (``status --profile P``); ``on_wait``
    is told when the store's manifest is waited for (``FeatureStore``).

    Read from the store alone: nothing is fetched, no server asked, and a missing store is not created.
    """
    from featurestore import FeatureStore
    from featurestore.manifest import MANIFEST_FILE
    from refresher.plan import segment_key
    from refresher.segments import desired_segments
    from refresher.sources import make_source
    from refresher.sources.reports import stored_reports

    if not (settings.store_root / MANIFEST_FILE).exists():
        return ()
    profile = _profile(settings, name, on_bad_rows=on_bad_rows)
    with make_source(profile) as source:
        keys = {s: segment_key(s, source.kind, source.version(s)) for s in desired_segments(profile)}
    return tuple(str(r) for r in stored_reports(FeatureStore(settings.store_root, on_wait=on_wait), keys))


@dataclass(frozen=True)
class Down:
    """What ``down`` did: the servers it stopped, and those under a profile's names it left to their owner."""

    stopped: list[str]
    left_alone: list[str]  # "<engine>:<profile> left alone: <why>"


def down(settings: Settings, name: str, *, on_wait: Callable[[str], None] | None = None) -> Down:
    """Stop and remove ``name``'s server ("all": every server); ``on_wait`` is told when another command starting
    or stopping one is waited for."""
    if name != "all":
        _check_name(settings, name)
    stopped: list[str] = []
    left_alone: list[str] = []
    # The second list: a `down` interrupted while removing a local cluster left its files hidden, where only
    # another `down` (or a start) looks; the user's retry found "nothing to stop" and the files stayed.
    for server in [*engines.all_statuses(settings), *engines.interrupted_removals(settings)]:
        if name in ("all", server.profile):
            engine = engines.make_engine(server.engine, settings)
            # Only what is ours goes (another checkout's server under the profile's names stays): say which.
            removed = engine.stop(server.profile, on_wait=on_wait)
            if server.left_alone:
                left_alone.append(f"{server.engine}:{server.profile} left alone: {server.left_alone}")
            elif removed:
                stopped.append(f"{server.engine}:{server.profile}")
    if not stopped and not left_alone and name != "all":
        error = _no_server(settings, name, "no server")
        if isinstance(error, ProfileError):  # a typo; a known profile without a server has nothing to stop
            raise error
    for profile in {entry.split(":", 1)[1] for entry in stopped}:
        _remove_lock_files(settings.state_dir, profile)
    return Down(stopped, left_alone)


def _remove_lock_files(state_dir: Path, profile: str) -> None:
    """Remove a stopped profile's empty lock files (the refresh lock, the engines' start/stop locks).

    Each is unlinked while held: filelock's acquire sees an unlinked inode (st_nlink 0) and retries on the new
    file, so a process that opened the old one meanwhile never believes it holds the lock. One in use stays, and
    so does one this user may not open (root's, in a checkout root and its owner both ran).
    """
    for path in (
        profile_lock.lock_path(state_dir, profile),
        state_dir / "local" / f".{profile}.lock",
        state_dir / "docker" / f".{profile}.lock",
    ):
        if not path.exists():
            continue
        lock = filelock.FileLock(path, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            continue  # a refresh or start holds it: it is not ours to remove
        except PermissionError:
            continue  # another user's (root's docker lock beside this user's local server): not ours either
        try:
            path.unlink(missing_ok=True)
        finally:
            lock.release()


@dataclass(frozen=True)
class ProfileListing:
    """The profiles refresher can find: the loadable ones, and the invalid ones with their one-line error."""

    profiles: list[Profile]
    invalid: list[ProfileError]


def profiles(settings: Settings) -> ProfileListing:
    from refresher.profile import list_profiles

    invalid: list[ProfileError] = []
    found = list_profiles(settings.profiles_dirs, errors=invalid)
    return ProfileListing(found, invalid)
