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


class _BlockOnAThread:
    """A ``fewer_collections`` block on another thread, begun by ``start`` and ended by ``end``."""

    def __init__(self, *, freeze: bool) -> None:
        self._inside, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(freeze,))

    def _run(self, freeze: bool) -> None:
        with fewer_collections(freeze=freeze):
            self._inside.set()
            self._release.wait(10)

    def start(self) -> None:
        self._thread.start()
        self._inside.wait(10)

    def end(self) -> None:
        self._release.set()
        self._thread.join(10)


def test_blocks_on_two_threads_restore_only_when_the_last_one_ends() -> None:
    before = gc.get_threshold()
    other = _BlockOnAThread(freeze=True)
    with fewer_collections():
        other.start()
    # This thread's block ended first: the other one still runs with fewer collections.
    assert gc.get_threshold()[0] == max(before[0], YOUNG_THRESHOLD)
    other.end()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_block_without_freeze_holds_the_threshold_alone_and_nests_with_a_freezing_one() -> None:
    before = gc.get_threshold()
    held = (max(before[0], YOUNG_THRESHOLD), *before[1:])
    with fewer_collections(freeze=False):
        assert (gc.get_threshold(), gc.get_freeze_count()) == (held, 0)
        with fewer_collections():
            assert gc.get_threshold() == held and gc.get_freeze_count() > 0
        # The freezing block ended: what it froze is collectable again; the threshold is still held.
        assert (gc.get_threshold(), gc.get_freeze_count()) == (held, 0)
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, 0)


def test_a_freezing_block_that_outlives_a_non_freezing_one_keeps_its_freeze_then_restores_all() -> None:
    before = gc.get_threshold()
    worker_batch = _BlockOnAThread(freeze=False)
    with fewer_collections():
        worker_batch.start()
        worker_batch.end()
        assert gc.get_threshold()[0] == max(before[0], YOUNG_THRESHOLD) and gc.get_freeze_count() > 0
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, 0)
