"""Which modules a user feature's version reads: the user's own, through every way of importing, and no others."""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from refresher.features.modules import Seen, user_modules


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"proj_{uuid.uuid4().hex[:8]}"
    root = tmp_path / name
    (root / "deep").mkdir(parents=True)
    files = {
        "__init__.py": "",
        # Libraries (the standard library, site-packages, refresher itself) are not read; a cycle ends.
        "mine.py": (
            "import json, os.path\nimport numpy as np\nimport refresher.errors\nfrom featurestore import keys\n"
            "from .helpers import *\nfrom . import middle as m\n\n"
            f"def f(df):\n    import {name}.deep.lazy\n    return df\n"
        ),
        "middle.py": "from .helpers import FACTOR  # noqa\n\ndef g():\n    from .. import nothing  # beyond the top: skipped\n",
        "helpers.py": "FACTOR = 2.0\nfrom . import middle  # noqa\n",
        "deep/__init__.py": "",
        "deep/lazy.py": "from ..helpers import FACTOR  # noqa\n",
        "unused.py": "",
    }
    for path, text in files.items():
        (root / path).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
        del sys.modules[module]


def test_the_users_modules_imported_transitively_and_nothing_else(package: str) -> None:
    mine = importlib.import_module(f"{package}.mine")
    # deep and deep.lazy: imported inside the function, not run yet: found without importing them.
    assert f"{package}.deep" not in sys.modules
    seen: Seen = {}
    names = [m.name for m in user_modules([mine], seen)]
    assert names == [
        package + suffix for suffix in ("", ".deep", ".deep.lazy", ".helpers", ".middle", ".mine")
    ]
    assert f"{package}.deep" not in sys.modules
    assert seen["json"] is None and seen["numpy"] is None and seen["refresher.errors"] is None
    # A second entry of the same refresh reads nothing again.
    assert [m.name for m in user_modules([mine], seen)] == names


def test_a_root_and_its_package_are_read_wherever_they_are_and_no_other_library() -> None:
    # A feature of a package the user installed: its modules version it (json's own, imported relatively), the
    # libraries they import (re, codecs) do not.
    import json

    assert [m.name for m in user_modules([json])] == ["json", "json.decoder", "json.encoder", "json.scanner"]
