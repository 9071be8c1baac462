"""What stands where a user's setting names a file to read: nothing, a regular file, or something else, said.

Shared by the profile (``universe.file``) and the files source (``source.daily``/``source.minute``): a directory or
a symbolic link that loops was "no such file" about a name the user can see there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def file_obstacle(path: Path) -> tuple[os.stat_result | None, str | None]:
    """``path``'s status when it is a regular file (a symbolic link to one is), else None and what is there
    instead, in words, or None and None when nothing is there at all."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if not path.is_symlink():
            return None, None
        # a link into a share that is not mounted: every file "missing" and loaded empty, said only as a note
        return None, f"a symbolic link to {os.readlink(path)!r}, which does not exist"
    except OSError as exc:  # ELOOP (a link to itself), ENOTDIR (a file where a directory is named), EACCES
        return None, os_reason(exc)
    if stat.S_ISREG(st.st_mode):
        return st, None
    return None, "a directory, not a file" if stat.S_ISDIR(st.st_mode) else "not a regular file"


def os_reason(exc: OSError) -> str:
    """An OSError's reason in a few words, by its number: pyarrow's strerror is a message of several sentences
    naming the path again."""
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


__all__ = ["file_obstacle", "os_reason"]
