"""How the detached refill takes a stop (``pool._Stops``): real signals, delivered to this process's main thread."""

from __future__ import annotations

import signal
import threading

import pytest

from refresher.pool import GIVE_UP_SIGNAL, _Stopped, _Stops


def test_a_watchs_give_up_landing_once_its_block_ended_is_dropped_and_a_later_stop_is_taken() -> None:
    # The watch decides to give up while the block runs, its signal lands once the block ended (held back here by
    # the mask, as by a thread's scheduling): before, it stopped whatever the refill did next, its work done, and
    # the refill exited 1 "gave up".
    stops = _Stops()
    with stops.installed():
        signal.pthread_sigmask(signal.SIG_BLOCK, {GIVE_UP_SIGNAL})
        try:
            with stops.watched():
                stops.give_up("gave up: the server did not answer for 60 s")
        finally:
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {GIVE_UP_SIGNAL})  # delivered now
            except _Stopped as exc:
                pytest.fail(f"a give-up after its block ended stopped the refill: {exc}")
        assert (stops.signum, stops.reason) == (None, None)
        with pytest.raises(_Stopped, match="stopped by SIGTERM") as stopped:
            signal.raise_signal(signal.SIGTERM)
        assert stopped.value.reason is None


def test_a_sigterm_landing_with_a_watchs_give_up_once_its_block_ended_is_taken() -> None:
    # A user's SIGTERM pending at the same moment as the watch's give-up (both held back here by the mask): the
    # give-up was a SIGTERM too, the kernel kept one of the two, and its one delivery was dropped as the give-up
    # landing after its block: the user's stop was lost, the refill went on and exited 0.
    stops = _Stops()
    with stops.installed():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, GIVE_UP_SIGNAL})
        try:
            with stops.watched():
                stops.give_up("gave up: the server did not answer for 60 s")
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)  # the user's
        finally:
            with pytest.raises(_Stopped, match="stopped by SIGTERM") as stopped:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, GIVE_UP_SIGNAL})  # delivered now
        assert stopped.value.reason is None


def test_a_sigterm_while_a_give_up_is_withdrawn_is_raised_once_the_next_record_is_written() -> None:
    # The watch's give-up raised as the clones' step returned, and a user's SIGTERM taken before the refill
    # withdrew it (``pool._refill_main``): let go as a second stop, then forgotten with the give-up.
    stops = _Stops()
    with stops.installed():
        with pytest.raises(_Stopped) as gave_up, stops.watched():
            stops.give_up("gave up: the server did not answer for 60 s")  # raised as its signal is taken
        assert gave_up.value.reason is not None
        signal.raise_signal(signal.SIGTERM)  # a second stop: let go, the first honoured
        stops.withdraw()
        with pytest.raises(_Stopped, match="stopped by SIGTERM") as stopped, stops.held():
            pass  # the outcome record, written whole
        assert stopped.value.reason is None
