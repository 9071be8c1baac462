"""Whether a source file named by the profile can be read, said in one line when it cannot.

A file that is not there is the files source's ordinary case (reported, an empty segment). Anything else in the
way of reading it (a dangling or looping symbolic link, a directory, a mode that keeps this user out, a `.gz` that
is no gzip) was a traceback mid-refresh, or, for a directory, "no such file ... but bars.csv is there: rename it to
bars.csv" about the very name the user wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

from refresher._file_obstacle import file_obstacle, os_reason
from refresher.errors import SourceError


def file_status(path: Path, field: str, pattern: str) -> os.stat_result | None:
    """``path``'s status when it is a regular file (a symbolic link to one is), None when nothing is there;
    ``field``/``pattern`` name the profile's setting that named it, for the error."""
    st, reason = file_obstacle(path)
    if reason is None:
        return st
    raise SourceError(
        f"{path}: cannot read it ({field}={pattern!r}): {reason}", file=str(path), field=field, value=pattern
    )


def unreadable(path: Path, exc: OSError, field: str, pattern: str) -> SourceError:
    """The one-line error for a file whose reading failed in the OS or the decompressor (not in its contents'
    format: those errors name what pyarrow refused)."""
    reason = os_reason(exc)
    if path.suffix == ".gz" and not isinstance(exc, PermissionError):
        reason += " (its name ends in .gz, so it is read as gzip: is it?)"
    return SourceError(
        f"{path}: cannot read it ({field}={pattern!r}): {reason}", file=str(path), field=field, value=pattern
    )
