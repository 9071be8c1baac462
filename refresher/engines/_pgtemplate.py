"""A cache of initdb's output: one never-started cluster per server binary and initdb argument list.

A new local cluster is a copy of it (``cp --reflink=auto``: a reflink where the filesystem clones, a plain copy
elsewhere) instead of an initdb run, and gets its own superuser password in single-user mode before its first
start: single-user mode listens on nothing, so no moment exists in which anyone could log in with the
template's password (a random one, never stored, that nobody knows).

Layout under the cache directory (``$XDG_CACHE_HOME/refresher/pg-templates``)::

    <key>/pgdata       the template cluster (owned by the server's OS user)
    <key>/complete     the key, the postgres build it hashes and the template's listing (every path and file
                       size), written (and everything above fsynced) before ``<key>`` gets its name; a template
                       that no longer matches its listing (a cache cleaner, a half-done ``rm -r``) is built
                       again, never copied
    <key>.tmp-*        a template being copied in or removed; a kill -9 leaves it for the next builder to remove
    .<key>.lock        flock held while a template is checked, built, copied from or removed
    <key>.spare*       a ready-made copy of the template for the next new cluster (``_pgspare``), removed with it

``<key>`` hashes the postgres binary (path, size, mtime), its version, the exact initdb arguments and the
files' owner, so a new server build or a new initdb flag makes a new template rather than reusing a stale one.
Each new template ends its build by removing those of builds gone from disk, and those of its own build made
with older initdb arguments (``prune``).
The copies share the template's system identifier, which only replication and backup tools read; a local
cluster has neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from refresher.engines import _pgctl
from refresher.engines._common import locked, try_locked
from refresher.errors import EngineUnavailable

MARKER = "complete"
PGDATA = "pgdata"
TMP_INFIX = ".tmp-"
# What the single-user ALTER ROLE may carry unquoted (secrets.token_urlsafe's alphabet).
PASSWORD_CHARS = re.compile(r"[A-Za-z0-9_-]+")
FSYNC_THREADS = 16
KEY_NAME = re.compile(r"[0-9a-f]{32}")
# How long a new cluster waits for the template's lock, which another start holds for its copy (a second) or its
# first build (an initdb: seconds): past it (filelock.Timeout, an OSError) the start runs initdb itself. One holder
# stopped there (Ctrl-Z) held every new cluster of this user, any checkout's and the pytest plugin's, for good.
TEMPLATE_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class TemplateKey:
    """Which template a new cluster may be copied from: ``name`` in the cache, and the build it was made by."""

    name: str
    build: tuple[str, int, int]  # the postgres binary as found: resolved path, size, mtime (ns)


def template_key(bin_dir: Path, version: str, initdb_args: list[str], owner: _pgctl.OsUser) -> TemplateKey:
    """The cache key of a template: the binary as found on disk, its version, initdb's arguments and the OS
    user owning the files (a cache shared by root and a user must not hand one the other's unreadable copy)."""
    build = _build(bin_dir / "postgres")
    raw = json.dumps([*build, version, initdb_args, owner.uid])
    return TemplateKey(hashlib.sha256(raw.encode()).hexdigest()[:32], build)


def _build(postgres: Path) -> tuple[str, int, int]:
    exe = postgres.resolve()
    st = exe.stat()
    return str(exe), st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def template_for(
    cache: Path,
    key: TemplateKey,
    *,
    claim: Callable[[], bool] | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[Path | None]:
    """Hold the template ``key``'s lock and yield its cluster directory, or None when it does not exist yet;
    ``filelock.Timeout`` once another holder kept it ``TEMPLATE_WAIT_SECONDS`` (the caller runs initdb instead),
    ``on_wait`` told once it has been waited for a while (``locked``).

    With None the caller runs initdb and may ``keep`` the result while still holding the lock, so two processes
    at once run initdb once and the second copies the first's result.

    ``claim`` (taking the template's spare, ``_pgspare.claim``) is tried first, under the lock, when the marker
    names ``key``: once it returns True the template's own listing is not walked (about 1,000 stats, 25-85 ms on
    the loaded dev machine). The claim checks the spare against the marker's listing, so what it took is a whole
    copy of the template as built, whatever happened to the template since; a damaged template is found and
    built again at the next start that copies it, and no spare is made of it (``_pgspare.make`` checks its copy).
    """
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    with locked(
        template_lock(cache, key.name), timeout=TEMPLATE_WAIT_SECONDS, on_wait=_waiting(cache, on_wait)
    ):
        _remove_leftovers(cache, key.name)
        final = cache / key.name
        if claim is not None and _marked(final, key.name) and claim():
            yield final / PGDATA
            return
        if _complete(final, key.name):
            yield final / PGDATA
            return
        if final.exists():  # damaged (its marker, or files its listing names): never copy from it
            _remove(cache, key.name)
        remove_spare(cache, key.name)  # a copy of a template gone: the one about to be built replaces it
        yield None


def template_lock(cache: Path, name: str) -> Path:
    return cache / f".{name}.lock"


def _waiting(cache: Path, on_wait: Callable[[str], None] | None) -> Callable[[], None] | None:
    """What ``locked`` calls when a template's lock in ``cache`` is waited for: ``on_wait`` told in one line."""
    if on_wait is None:
        return None
    # Its holder copies the template to make a cluster, or builds it first (initdb, several seconds: two first
    # starts at once, pytest-xdist's workers, always meet it); the line said only the copy.
    line = (
        f"template cache {cache}: another command holds it (a copy, or its first build; perhaps stopped: Ctrl-Z); "
        f"waiting for it, {TEMPLATE_WAIT_SECONDS:g} s at most"
    )
    return lambda: on_wait(line)


def spare_of(cache: Path, name: str) -> Path:
    """Where the template ``name``'s spare copy waits (``_pgspare``)."""
    return cache / f"{name}.spare"


def spare_lock(cache: Path, name: str) -> Path:
    """The lock the one maker of the template ``name``'s spare holds for the whole copy (``_pgspare.make``)."""
    return cache / f".{name}.spare.lock"


def _remove_leftovers(cache: Path, name: str) -> None:
    """Remove what a killed builder (a half copy), remover or spare maker left of the template ``name``; call
    with its lock. A spare maker's half copy only while no maker holds the spare lock: one may be copying now."""
    for leftover in cache.glob(f"{name}{TMP_INFIX}*"):
        _pgctl.remove_leftover(leftover, pgdata=leftover / PGDATA)  # a builder's cp may still run there
    if any(cache.glob(f"{spare_of(cache, name).name}{TMP_INFIX}*")):
        with try_locked(spare_lock(cache, name)) as free:
            if free:
                sweep_spare_leftovers(cache, name)


def sweep_spare_leftovers(cache: Path, name: str) -> None:
    """Remove the half-made spares of the template ``name``; call with its spare lock (so no maker is alive)."""
    for leftover in cache.glob(f"{spare_of(cache, name).name}{TMP_INFIX}*"):
        _pgctl.remove_leftover(leftover)  # a killed maker's cp may still run there


def remove_spare(cache: Path, name: str) -> None:
    """Remove the template ``name``'s spare, if any; call with the template's lock. Renamed away first, as
    templates are: a kill -9 during the removal leaves a half-made spare's name, which is swept, never used."""
    spare = spare_of(cache, name)
    dead = cache / f"{spare.name}{TMP_INFIX}{secrets.token_hex(4)}"
    try:
        spare.rename(dead)
    except FileNotFoundError:
        return
    _delete(dead)


def identity(template: Path) -> int:
    """Which build of a template ``template_for`` yielded (its marker's inode), for ``discard``."""
    return (template.parent / MARKER).stat().st_ino


def discard(
    cache: Path, key: TemplateKey, built: int, *, on_wait: Callable[[str], None] | None = None
) -> None:
    """Remove the template ``key`` if it is still the build ``built`` (``identity``): a cluster copied from it was
    refused by the server, so the next new cluster builds it again instead of copying it and failing the same way.
    Its lock is waited for as ``template_for`` waits (``filelock.Timeout``: the template is left to a later
    discard); a holder stopped there (Ctrl-Z) held this start for good, without a word.
    """
    lock = template_lock(cache, key.name)
    with (
        locked(lock, timeout=TEMPLATE_WAIT_SECONDS, on_wait=_waiting(cache, on_wait)),
        contextlib.suppress(FileNotFoundError),
    ):
        if identity(cache / key.name / PGDATA) == built:
            _remove(cache, key.name)


def _remove(cache: Path, name: str) -> None:
    """Remove the template ``name`` and its spare (first: a kill -9 between leaves a template without one)."""
    remove_spare(cache, name)
    # Renamed out of the key first: a kill -9 during the removal leaves a ``.tmp-`` leftover, not a template.
    dead = cache / f"{name}{TMP_INFIX}{secrets.token_hex(4)}"
    (cache / name).rename(dead)
    _delete(dead)


_delete = _pgctl.remove_tree  # a directory tree, or whatever else took its name (a file someone wrote there)


def keep(cache: Path, key: TemplateKey, cluster: Path) -> None:
    """Copy ``cluster`` (fresh from initdb, never started) in as the template ``key``; call with its lock held.

    All or nothing: the copy is fsynced and marked under a temporary name, then renamed, so a kill -9 or a power
    loss leaves no template or a complete one. Then ``prune``: a new template is when a build may have gone.
    """
    tmp = cache / f"{key.name}{TMP_INFIX}{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o700)
    try:
        (tmp / PGDATA).mkdir(mode=0o700)
        copy_cluster(cluster, tmp / PGDATA)
        fsync_tree(tmp)
        marker = {"key": key.name, "postgres": key.build, "listing": listing(tmp / PGDATA)}
        _write_synced(tmp / MARKER, json.dumps(marker))
        tmp.rename(cache / key.name)
        fsync_path(cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(cache, key)


def prune(cache: Path, current: TemplateKey) -> None:
    """Remove the templates (and leftovers) no new cluster will be copied from again (``_superseded``).

    Templates of other builds still on disk stay, whichever is ``current``: another venv or checkout may use them.
    Each is taken by its lock without waiting, so one that another process copies from, builds or checks right
    now is left for a later prune; it is renamed away before its files go (``_remove``), its spare with it, as is
    a spare whose template is gone. Never raises OSError: a prune that fails leaves what it could not remove.
    Cheap: a marker read and a stat per template, at each build.
    """
    with contextlib.suppress(OSError):
        owner = (cache / current.name / PGDATA / "PG_VERSION").stat().st_uid
        names = {entry.name.partition(".")[0] for entry in cache.iterdir()}
        for name in sorted(n for n in names if KEY_NAME.fullmatch(n) and n != current.name):
            with contextlib.suppress(OSError), try_locked(template_lock(cache, name)) as ours:
                if not ours:
                    continue
                _remove_leftovers(cache, name)
                if not (cache / name).exists():
                    remove_spare(cache, name)
                elif _superseded(cache / name, current, owner):
                    _remove(cache, name)


def _superseded(final: Path, current: TemplateKey, owner: int) -> bool:
    """Whether no key can name the template ``final`` again: the postgres binary it was made by is gone or holds
    another file (an upgraded wheel, a removed venv or install; a marker from before markers named their build
    counts as gone), or it is ``current``'s build for the same owner (``owner``, its files' uid) with other initdb
    arguments, those of a refresher before this one: kept, it stayed for good. Two refresher versions that differ
    in them and share one install (two checkouts on one venv) each build their template again after the other's
    build: an initdb then, never a wrong copy."""
    try:
        marker = json.loads((final / MARKER).read_text(encoding="utf-8"))
        path, size, mtime_ns = marker["postgres"]
        build = (path, size, mtime_ns)
        if _build(Path(path)) != build:
            return True
        return build == current.build and (final / PGDATA / "PG_VERSION").stat().st_uid == owner
    except (OSError, ValueError, KeyError, TypeError):
        return True


def copy_cluster(source: Path, target: Path) -> None:
    """Copy the contents of ``source`` into the existing directory ``target``, owners and modes kept.

    One ``cp`` per database directory under ``base/`` (about 300 files each) and one for the rest, all at once:
    the copy is nearly all kernel time creating ~1,000 files, which one process does on one core (on the 2-core
    dev machine, alternating: 0.55-0.60 s one ``cp``, 0.29-0.31 s four). Each runs in ``target``, so
    ``_pgctl.kill_processes_in(target)`` finds them, and dies with the CLI.
    """
    base = source / "base"
    (target / "base").mkdir()
    shutil.copystat(base, target / "base")
    st = base.stat()
    os.chown(target / "base", st.st_uid, st.st_gid)
    rest = [str(entry) for entry in sorted(source.iterdir()) if entry.name != "base"]
    jobs = [(rest, ".")] + [([str(db)], "base") for db in sorted(base.iterdir())]
    procs = [
        subprocess.Popen(
            ["cp", "--reflink=auto", "--sparse=always", "-a", "--", *sources, destination],
            cwd=target,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_pgctl.kill_with_parent,  # a kill -9 of the CLI stops the copy too
        )
        for sources, destination in jobs
    ]
    errors = []
    try:
        for proc in procs:
            _, stderr = proc.communicate()
            if proc.returncode != 0:
                errors.append(stderr.strip()[-500:])
    finally:
        for proc in procs:  # Ctrl-C: stop the others too, before the caller removes ``target``
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if errors:
        raise OSError(f"cp {source} -> {target} failed: {'; '.join(errors)}")


def set_password(bin_dir: Path, pgdata: Path, user: _pgctl.OsUser, role: str, password: str) -> None:
    """Give ``role`` of the never-started cluster ``pgdata`` a new password, in single-user mode (no listener).

    The password reaches the backend through a pipe and is hashed there (password_encryption=scram-sha-256).
    """
    if not PASSWORD_CHARS.fullmatch(password) or not PASSWORD_CHARS.fullmatch(role):
        raise ValueError("password and role must be URL-safe base64 characters")
    result = _pgctl.run(
        bin_dir,
        "postgres",
        ["--single", "-D", str(pgdata), "-c", "fsync=off", "postgres"],
        user,
        cwd=pgdata.parent,
        stdin_text=f"ALTER ROLE \"{role}\" PASSWORD '{password}';\n",
        die_with_parent=True,
        timeout=120,
    )
    failed = re.search(r"^(?:.*\s)?(ERROR|FATAL|PANIC):", result.output, re.MULTILINE)
    if result.returncode != 0 or failed:
        output = result.output.replace(password, "***")  # an error echoes the statement
        raise EngineUnavailable(f"setting the new cluster's password failed: {output.strip()[-1000:]}")


def _marked(final: Path, key: str) -> bool:
    """Whether the template ``final``'s marker names ``key`` (its listing not checked: ``_complete``)."""
    try:
        marker = json.loads((final / MARKER).read_text(encoding="utf-8"))
        return isinstance(marker, dict) and marker.get("key") == key
    except (OSError, ValueError):
        return False


def _complete(final: Path, key: str) -> bool:
    """Marked with ``key`` and still every path and file size it was built with (about 1,000 stat calls, 10 ms
    on the loaded dev machine, against a start of 0.6 s: a copy of a template with a file gone makes a cluster
    that starts and then fails at the first login to a new database)."""
    try:
        marker = json.loads((final / MARKER).read_text(encoding="utf-8"))
        return (
            isinstance(marker, dict)
            and marker.get("key") == key
            and marker.get("listing") == listing(final / PGDATA)
        )
    except (OSError, ValueError):
        return False


def marked_listing(final: Path) -> dict[str, int]:
    """The listing the template ``final``'s marker records (``listing`` of its pgdata when it was made)."""
    recorded = json.loads((final / MARKER).read_text(encoding="utf-8"))["listing"]
    if not isinstance(recorded, dict):
        raise ValueError(f"{final / MARKER}: no listing")
    return recorded


def listing(pgdata: Path) -> dict[str, int]:
    """Every path under ``pgdata``: a file's size, -1 for a directory (an empty one counts: pg_tblspc, ...)."""
    listing: dict[str, int] = {}
    for dirpath, dirs, files in os.walk(pgdata):
        here = Path(dirpath)
        for name in dirs:
            listing[str((here / name).relative_to(pgdata))] = -1
        for name in files:
            listing[str((here / name).relative_to(pgdata))] = (here / name).lstat().st_size
    return listing


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``: initdb ran with --no-sync and cp does not sync.

    On threads: concurrent fsyncs share the filesystem's journal commits (a template's ~1,000 files, same session
    on the loaded dev machine: 0.54 s one by one, 0.21-0.36 s on 16 threads). Only the first use of a template
    pays it.
    """
    paths = []
    for dirpath, _dirs, files in os.walk(root):
        paths += [Path(dirpath) / name for name in files]
        paths.append(Path(dirpath))
    with ThreadPoolExecutor(max_workers=FSYNC_THREADS) as pool:
        list(pool.map(fsync_path, paths))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
