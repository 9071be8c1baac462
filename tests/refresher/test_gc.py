"""A refresh holds the garbage collector back and leaves it exactly as it found it, on every path."""

from __future__ import annotations

import gc
import threading

import pytest

from refresher._gc import YOUNG_THRESHOLD, fewer_collections


def test_collections_are_held_back_inside_and_restored_after() -> None:
    before = gc.get_threshold()
    with fewer_collections():
        assert gc.get_threshold()[0] == max(before[0], YOUNG_THRESHOLD)
        assert gc.get_freeze_count() > 0  # what existed is out of every collection
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_an_error_inside_still_restores_the_collector() -> None:
    before = gc.get_threshold()
    with pytest.raises(KeyError), fewer_collections():
        raise KeyError("boom")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_blocks_on_two_threads_restore_only_when_the_last_one_ends() -> None:
    before = gc.get_threshold()
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with fewer_collections():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with fewer_collections():
        thread.start()
        inside.wait(10)
    # This thread's block ended first: the other one still runs with fewer collections.
    assert gc.get_threshold()[0] == max(before[0], YOUNG_THRESHOLD)
    release.set()
    thread.join(10)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
