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
- a store made anew (a fresh root, a wiped one): its generation is random, never an earlier store's.

The generation is a random 128-bit hex string in ``<root>/generation``, replaced atomically (temporary, fsync,
rename, fsync of the root) by the process holding the manifest's exclusive lock, BEFORE the removal commits (or,
for a key's own file, is renamed into place): a reader never sees the old generation with the removal made, and a
process killed between the two leaves a generation moved for nothing, never one that did not move. Readers take no
lock. A store without the file (made by code from before it) reads as None, "unknown", which answers nothing; the
store's first opening writes one (``FeatureStore``). Code from before the file that removes from a store shared
with this one does not move it: such an answer may then miss that removal until it expires by its own rules.

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
_TEMPORARY = f".{GENERATION_FILE}-"
_VALID = re.compile(r"[0-9a-f]{32}")


def read_generation(root: Path) -> str | None:
    """The store's generation now; None when it has none (a store from before generations, or no store)."""
    try:
        text = (root / GENERATION_FILE).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    value = text.strip()
    return value if _VALID.fullmatch(value) else None


def move_generation(root: Path) -> str:
    """Replace the store's generation with a new random one, durably; returns it. The caller holds the manifest's
    exclusive lock (so two movers never race for the file, and a temporary another one left is a dead one's)."""
    from featurestore._files import fsync_dir
    from featurestore.errors import StoreDiskFull

    value = uuid.uuid4().hex
    temporary = root / f"{_TEMPORARY}{uuid.uuid4().hex}.tmp"
    try:
        for stale in root.glob(f"{_TEMPORARY}*.tmp"):  # a mover killed before its rename
            stale.unlink(missing_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, f"{value}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, root / GENERATION_FILE)
        fsync_dir(root)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreDiskFull.at(str(root), f"writing {GENERATION_FILE}: {exc.strerror}") from None
        raise
    return value


__all__ = ["GENERATION_FILE", "move_generation", "read_generation"]
