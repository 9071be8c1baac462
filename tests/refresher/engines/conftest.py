"""Fixtures of the engine tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from refresher.engines.local import LocalEngine


@pytest.fixture
def engine(local_state_dir: Path) -> Iterator[LocalEngine]:
    """The session's state dir, and every profile a test starts stopped after it."""
    engine = LocalEngine(local_state_dir)
    before = {s.profile for s in engine.status()}
    yield engine
    for status in engine.status():
        if status.profile not in before:
            engine.stop(status.profile)
