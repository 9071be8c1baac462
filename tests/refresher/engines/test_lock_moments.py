"""A profile's start/stop lock held for a moment by another command: neither told nor refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from refresher.engines import _common
from tests.held_lock import held_a_moment


def test_a_start_of_the_running_serverheld_a_moment_is_neither_told_nor_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A start of the running server holds the start/stop lock for a moment: `--no-wait` beside it refused at once,
    # and a waiting command printed a line saying another might be stopped (Ctrl-Z). The grace is raised so the
    # moment is well inside it however slow the machine.
    monkeypatch.setattr(_common, "HOLD_GRACE_SECONDS", 60.0)
    told: list[str] = []
    path = tmp_path / "held.lock"
    held_a_moment(path, _common.server_locked(path, "p", "local", wait=False, on_wait=told.append))
    assert told == []
