"""Installed library versions, read from the ``*.dist-info`` directory names on ``sys.path``.

``importlib.metadata`` answers the same question but costs 20-50 ms to import on this machine (zipfile, email,
csv...), more than the whole work of `market status` or a stamped no-op refresh, which both need a version:
the calendar cache and the stamp are keyed on the libraries that decide their values. A wheel's dist-info
directory is named ``<normalized name>-<version>.dist-info``; anything this scan does not find is asked of
``importlib.metadata`` after all.
"""

from __future__ import annotations

import os
import re
import sys


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _listing(entry: str) -> tuple[str, ...]:
    try:
        return tuple(os.listdir(entry or "."))
    except OSError:  # a zip, a hook or a missing directory on sys.path
        return ()


def installed_version(name: str) -> str:
    """The version of the distribution ``name`` the interpreter imports (the first on ``sys.path``)."""
    wanted = _normalized(name)
    for entry in sys.path:
        for item in _listing(entry):
            stem, dot, kind = item.rpartition(".")
            if not dot or kind not in ("dist-info", "egg-info"):
                continue
            dist, _, version = stem.partition("-")
            if version and _normalized(dist) == wanted:
                return version.split("-")[0]  # an egg-info may carry "-py3.11"
    from importlib.metadata import version as metadata_version

    return metadata_version(name)


__all__ = ["installed_version"]
