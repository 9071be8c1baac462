"""A spare copy of a template cluster, made in the background, so the next new cluster is a rename, not a copy.

A new local cluster costs a copy of the template (``_pgtemplate``): about 1,000 files created, 0.15-0.7 s on
the loaded 2-core dev machine, on the critical path of a refresh into a new database. Once a start that used
the template has its server answering (not before: the maker's start and copy slowed that server's start),
``request`` starts a detached, low-priority process (``python -m refresher.engines._pgspare``) that copies the
template once more into the cache; the next start takes that copy by renaming it onto its empty
``pgdata.init-*`` directory (``claim``) and then goes on exactly as after a copy: its password, its
``refresher.conf`` and its port are written after the claim, never into the spare.

Layout beside the template ``<key>`` (``_pgtemplate``'s module docstring)::

    <key>.spare          the spare: a whole copy of ``<key>/pgdata``, checked against its marker's listing,
                         renamed here only once complete, under the template's lock
    <key>.spare.tmp-*    a spare being made; one whose maker died (no one holds the spare lock) is swept
    .<key>.spare.lock    flock held by the one maker of the key's spare, for the whole copy

The maker holds the template's lock only for its final rename: it copies at nice 19 and best-effort I/O
priority 7, and a process that slow must not hold a lock the next start waits for. A template removed or built
again meanwhile (``_pgtemplate.identity`` differs at the rename) leaves its copy unused; every removal of a
template removes its spare under the same lock, so a spare in place is always a copy of the template in place.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from refresher.engines import _pgctl, _pgtemplate
from refresher.engines._common import locked, try_locked
from refresher.engines._placement import spread_subdirectories

# Below every other process of ours (the pool's refill runs at nice 10).
NICENESS = 19


def claim(cache: Path, name: str, target: Path) -> bool:
    """Move the template ``name``'s spare onto the empty directory ``target``; False: none (or none usable) waits.

    Call with the template's lock held (inside ``_pgtemplate.template_for``), so no maker renames a spare in and
    no removal takes it meanwhile. A spare that no longer matches its template's listing (a cache cleaner) is
    removed, never used. The rename is atomic: a kill -9 leaves the spare where it was or as the caller's
    ``pgdata.init-*`` directory, which that profile's next start removes. Where ``target`` is on another
    filesystem than the cache the rename fails and the spare stays.
    """
    spare = _pgtemplate.spare_of(cache, name)
    if not spare.is_dir():
        return False
    try:
        if _pgtemplate.listing(spare) != _pgtemplate.marked_listing(cache / name):
            _pgtemplate.remove_spare(cache, name)
            return False
        spare.rename(target)  # replaces the empty directory ``target``
    except (OSError, ValueError, KeyError):
        return False
    return True


def request(cache: Path, name: str, user: _pgctl.OsUser, near: Path) -> None:
    """Start a detached maker of the template ``name``'s spare, unless one waits already, a maker is at work, or a
    spare could not be claimed into ``near`` (another filesystem than the cache: a claim is a rename).

    ``sh ... &`` double-forks, as the pool's refill does: the maker is reparented to init, so the CLI neither
    waits for it nor leaves a zombie. Best effort: a maker that cannot start means the next start copies.
    """
    try:
        if _pgtemplate.spare_of(cache, name).exists() or os.stat(cache).st_dev != os.stat(near).st_dev:
            return
        with try_locked(_pgtemplate.spare_lock(cache, name)) as free:
            if not free:
                return
    except OSError:
        return
    command = [sys.executable, "-m", "refresher.engines._pgspare", str(cache), name]
    command += [user.name, str(user.uid), str(user.gid)]
    ionice = shutil.which("ionice")
    if ionice is not None:
        command = [ionice, "-c", "2", "-n", "7", *command]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), "LC_ALL": "C"}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["/bin/sh", "-c", '"$@" &', "sh", *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            check=False,
            timeout=10,
        )


def make(cache: Path, name: str, user: _pgctl.OsUser) -> bool:
    """Copy the template ``name`` into ``<name>.spare``; False when another maker is at it, a spare waits, there
    is no template, or the template changed or went during the copy.

    The copy is checked against the marker's listing and fsynced under a temporary name, then renamed with the
    template's lock held, only if the template is still the build it was copied from: a kill -9 leaves a
    ``.spare.tmp-`` directory that the next maker (or start, or prune) sweeps, never a partial spare.
    """
    with try_locked(_pgtemplate.spare_lock(cache, name)) as ours:
        if not ours:
            return False
        _pgtemplate.sweep_spare_leftovers(cache, name)  # with the spare lock: whoever left them is gone
        template, spare = cache / name / _pgtemplate.PGDATA, _pgtemplate.spare_of(cache, name)
        try:
            built = _pgtemplate.identity(template)
            expected = _pgtemplate.marked_listing(cache / name)
        except (OSError, ValueError, KeyError):
            return False
        if spare.exists():
            return False
        # The spare becomes a cluster, and every file its databases create lands in its block group: in the cache
        # directory's own group, which each `down` of a cluster made from an earlier spare fills with inodes
        # just freed, CREATE DATABASE took 0.6-0.9 s instead of 0.05-0.13 s (_placement).
        spread_subdirectories(cache)
        tmp = cache / f"{spare.name}{_pgtemplate.TMP_INFIX}{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        try:
            user.give(tmp)
            _pgtemplate.copy_cluster(template, tmp)
            if _pgtemplate.listing(tmp) != expected:
                return False
            _pgtemplate.fsync_tree(tmp)
            with locked(_pgtemplate.template_lock(cache, name)):
                if _pgtemplate.identity(template) != built or spare.exists():
                    return False
                tmp.rename(spare)
            _pgtemplate.fsync_path(cache)
            return True
        except OSError:
            return False
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m refresher.engines._pgspare CACHE NAME USER UID GID``: the detached maker ``request`` starts."""
    cache, name, user_name, uid, gid = argv if argv is not None else sys.argv[1:]
    os.nice(NICENESS)
    if not _pgtemplate.KEY_NAME.fullmatch(name):
        return 2
    made = make(Path(cache), name, _pgctl.OsUser(user_name, int(uid), int(gid)))
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
