"""Which file a ``--profile`` argument names, and the one rule for profile names; no YAML is read here.

Apart from ``refresher.profile`` so a stamped no-op refresh can find the profile's file (and compare its bytes
with the stamp's) without importing pydantic and YAML to parse it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from refresher.errors import ProfileError

PROFILE_SUFFIXES = (".yaml", ".yml")
# Profile names reach file paths, container names and database names.
PROFILE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


def validate_profile(profile: str, *, file: Path | str = "--profile", field: str = "profile") -> str:
    """Profile names reach file paths, container names and database names: this is the one rule for them.

    ``file`` and ``field`` say where the name came from (a profile's YAML, the command line) for the error.
    """
    if not PROFILE_NAME.match(profile):
        raise ProfileError(file, field, profile, f"profile names must match {PROFILE_NAME.pattern}")
    return profile


def profile_files(dirs: Sequence[Path]) -> dict[str, Path]:
    """name -> file; the first directory wins, so user directories shadow the built-in profiles.

    A directory that is there but cannot be listed (its mode keeps this user out) is one line saying so: glob
    found nothing in it, so its profiles were "no such profile (known: none)", or shadowed by the built-ins."""
    found: dict[str, Path] = {}
    for d in dirs:
        if not Path(d).is_dir():
            continue
        try:  # one listing, which also says whether it can be read (two globs after it listed it twice more)
            with os.scandir(d) as entries:
                names = sorted(entry.name for entry in entries if entry.name.endswith((".yaml", ".yml")))
        except OSError as exc:
            from refresher._file_obstacle import os_reason  # an error's path: not a no-op's import

            raise ProfileError(
                d, "(profiles directory)", str(d), f"cannot read it: {os_reason(exc)}"
            ) from None
        for name in names:
            f = Path(d) / name
            found.setdefault(f.stem, f)
    return found


def find_profile_file(name_or_path: str, dirs: Sequence[Path], *, private_dirs: Sequence[Path] = ()) -> Path:
    """The file of a profile named ``name_or_path`` (searched in ``dirs``, first wins), or the path itself.

    Nothing else is ever named: not a file of another kind (``/etc/passwd``), not a file under ``private_dirs``
    (the state dir, where server passwords live), even through a symlink.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in PROFILE_SUFFIXES or "/" in name_or_path or candidate.is_file():
        if candidate.suffix not in PROFILE_SUFFIXES:
            raise ProfileError(
                "(command line)", "profile", name_or_path, "not a profile name or a .yaml/.yml file"
            )
        if not candidate.is_file():
            raise ProfileError(candidate, "(file)", name_or_path, "no such profile file")
        real = candidate.resolve()
        if any(real.is_relative_to(Path(d).resolve()) for d in private_dirs):
            raise ProfileError(
                "(command line)", "profile", name_or_path, "is inside the state dir, not a profile"
            )
        return candidate
    files = profile_files(dirs)
    try:
        validate_profile(name_or_path, file="(command line)")
    except ProfileError as exc:  # a typo (`UI_testing`) more often than a try at a path: list the profiles
        known = ", ".join(sorted(files)) or "none"
        raise ProfileError(exc.file, exc.field, exc.value, f"{exc.reason} (known: {known})") from None
    if name_or_path not in files:
        raise ProfileError.unknown(name_or_path, list(dirs), list(files))
    return files[name_or_path]


__all__ = ["PROFILE_NAME", "PROFILE_SUFFIXES", "find_profile_file", "profile_files", "validate_profile"]
