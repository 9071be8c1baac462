"""The store's generation: a value that moves whenever a key may have left the store or changed its content.

Whoever caches an answer derived from the store (``refresher.stamp``: "this profile's segments are all there,
with these content hashes") must know when that answer may have gone stale, without opening the manifest
(DuckDB, pyarrow: a second of imports). The manifest file's own (inode, size, time) moved with every write,
additions too, so one profile's refresh voided every other profile's answer. Additions cannot make such an
answer wrong (keys are content-addressed: a key another process adds holds what this one would have stored under
it, and a key it already held is not touched); only a removal or a replacement can, and those move the
generation:

- a row deleted (``Manifest.delete``, ``Manifest.delete_at``: gc, ``clear_cache``, a corrupt file evicted),
- a key written again with other content, or over a row whose file is gone (``FeatureStore._store``),
- the manifest restored from the files (``maintenance.restore_rows``: ``rebuild_manifest``, a missing or
  unfilled manifest) or set aside as damaged,
- a store made anew (a fresh root, a wiped one): its generation is random, never an earlier store's,
- the manifest written by another program since this code last did (featurestore from before this module, whose
  gc removed keys without a move): see below.

The generation is a random 128-bit hex string in ``<root>/generation``, replaced atomically (temporary, fsync,
rename, fsync of the root) by the process holding the manifest's exclusive lock, BEFORE the removal commits (or,
for a key's own file, is renamed into place): a reader never sees the old generation with the removal made, and a
process killed between the two leaves a generation moved for nothing, never one that did not move. It moves at
most once per exclusive hold (``Manifest.removing``): a move made in it precedes every change the hold commits.
Readers take no lock. A store without the file (made by code from before it) reads as None, "unknown", which
answers nothing; the store's first opening writes one (``FeatureStore``).

Code from before this module removes keys from a store shared with this one without moving the generation. So the
file also records the manifest (its file's and its WAL's inode, size and time) as this code's last writer left it
(``note_manifest``, after every write), and the generation reads as None while the manifest is otherwise: written
by that code (a removal, an addition alike), or by a writer of this code that has not noted it yet (committed,
or killed before noting). This code's next writer, finding None, moves it (its hold's one move) before it commits
anything. A stamp of another checkout thus never trusts a store such code removed from.

This module imports nothing beyond the standard library (``refresher.stamp`` reads it on its quick path).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from pathlib import Path

GENERATION_FILE = "generation"
# ``featurestore.manifest``'s file, named here: importing that module loads DuckDB.
MANIFEST_FILE = "manifest.duckdb"
_TEMPORARY = f".{GENERATION_FILE}-"
_VALID = re.compile(r"[0-9a-f]{32}")


def read_generation(root: Path) -> str | None:
    """The store's generation now; None when it has none (a store from before generations, or no store), or when
    the manifest is not as this code's last writer left it (``note_manifest``): another program wrote it since."""
    recorded = _read(root)
    if recorded is None or recorded[1] != _manifest_state(root):
        return None
    return recorded[0]


def move_generation(root: Path) -> str:
    """Replace the store's generation with a new random one, durably; returns it. The caller holds the manifest's
    exclusive lock (so two movers never race for the file, and a temporary another one left is a dead one's)."""
    value = uuid.uuid4().hex
    _replace(root, value, durably=True)
    return value


def note_manifest(root: Path) -> None:
    """Record the manifest as this writer leaves it (its file's and its WAL's inode, size and time) beside the
    generation: ``read_generation`` answers only while the manifest is still so. A writer that does not record
    it (featurestore from before this, whose removals do not move the generation) thus voids the generation, and
    this code's next writer, finding none, moves it. Called by every writer of the manifest under its exclusive
    lock, once the file is closed. Not fsynced: a record lost in a crash reads as no generation (none answered),
    never as an earlier one (the move before it was made durable)."""
    recorded = _read(root)
    if recorded is not None:
        _replace(root, recorded[0], durably=False)


def _read(root: Path) -> tuple[str, str] | None:
    """The generation file's value and the manifest's state it noted (``_manifest_state``'s two words); None when
    it is not there or holds no valid value. A word or line a newer writer adds after these is read as absent
    (it made the generation None: the store taken for changed by another program, every stamp void)."""
    try:
        first, _newline, rest = (root / GENERATION_FILE).read_text().partition("\n")
    except (OSError, UnicodeDecodeError):
        return None
    value = first.split(" ")[0]
    if not _VALID.fullmatch(value):
        return None
    return value, " ".join(rest.partition("\n")[0].split(" ")[:2])


def _manifest_state(root: Path) -> str:
    """The manifest file's and its WAL's (inode, size, mtime); '-' for a file that is not there."""
    states: list[str] = []
    for name in (MANIFEST_FILE, f"{MANIFEST_FILE}.wal"):
        try:
            status = os.stat(root / name)
        except OSError:
            states.append("-")
        else:
            states.append(f"{status.st_ino}:{status.st_size}:{status.st_mtime_ns}")
    return " ".join(states)


def _replace(root: Path, value: str, *, durably: bool) -> None:
    """``<root>/generation`` replaced atomically by ``value`` and the manifest's state now (temporary, rename;
    fsynced with the root when ``durably``)."""
    from featurestore._files import fsync_dir
    from featurestore.errors import StoreDiskFull

    temporary = root / f"{_TEMPORARY}{uuid.uuid4().hex}.tmp"
    try:
        for stale in root.glob(f"{_TEMPORARY}*.tmp"):  # a writer killed before its rename
            stale.unlink(missing_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, f"{value}\n{_manifest_state(root)}\n".encode())
            if durably:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, root / GENERATION_FILE)
        if durably:
            fsync_dir(root)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreDiskFull.at(str(root), f"writing {GENERATION_FILE}: {exc.strerror}") from None
        raise


__all__ = ["GENERATION_FILE", "MANIFEST_FILE", "move_generation", "note_manifest", "read_generation"]
