"""A store's lock held for a moment by another process is waited for without a word."""

from __future__ import annotations

from pathlib import Path

import pytest

from featurestore import _locks
from tests.held_lock import held_a_moment


def test_a_writers_moment_on_the_manifest_is_not_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store's writer (a refresh's pool refill) holds its lock for a moment: each such moment printed a line saying
    # a process might be stopped (Ctrl-Z). The limit is raised so the moment is well inside it however slow the
    # machine.
    monkeypatch.setattr(_locks, "SAY_AFTER_SECONDS", 60.0)
    told: list[str] = []
    held_a_moment(
        tmp_path / "held.lock",
        _locks.file_lock(tmp_path / "held.lock", timeout=120, on_wait=lambda: told.append("told")),
    )
    assert told == []


def test_a_computations_moment_on_a_key_is_not_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A key's lock is waited for with no time limit (a computation takes what it takes), and told once its wait
    # passes SAY_AFTER_SECONDS: a moment's hold is waited for without a word.
    monkeypatch.setattr(_locks, "SAY_AFTER_SECONDS", 60.0)
    told: list[str] = []
    held_a_moment(
        tmp_path / "held.lock", _locks.file_lock(tmp_path / "held.lock", on_wait=lambda: told.append("told"))
    )
    assert told == []
