"""How the detached refill takes a stop (``pool._Stops``): real signals, delivered to this process's main thread."""

from __future__ import annotations

import signal

import pytest

from refresher.pool import _Stopped, _Stops


def test_a_watchs_give_up_landing_once_its_block_ended_is_dropped_and_a_later_stop_is_taken() -> None:
    # The watch decides to give up while the block runs, its signal lands once the block ended (held back here by
    # the mask, as by a thread's scheduling): before, it stopped whatever the refill did next, its work done, and
    # the refill exited 1 "gave up".
    stops = _Stops()
    with stops.installed():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            with stops.watched():
                stops.give_up("gave up: the server did not answer for 60 s")
        finally:
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # delivered now
            except _Stopped as exc:
                pytest.fail(f"a give-up after its block ended stopped the refill: {exc}")
        assert (stops.signum, stops.reason) == (None, None)
        with pytest.raises(_Stopped, match="stopped by SIGTERM") as stopped:
            signal.raise_signal(signal.SIGTERM)
        assert stopped.value.reason is None
