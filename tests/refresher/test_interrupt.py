"""Ctrl-C stops a refresh promptly at any phase, under CPU load, and leaves nothing half-loaded."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from refresher.database import count_rows, read_loaded_segments
from refresher.load import SEGMENT_LOCK_WAIT
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
SYMBOLS = [f"S{i:02d}" for i in range(12)]
# Not a timing assertion: a bound far above what Ctrl-C takes on a loaded machine (~0.1 s), far below the
# two minutes a swallowed interrupt used to take.
DEADLINE = 10.0


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    ws = Workspace(world_traversable_tmp("refresher-sigint-"), "local", f"int_{uuid.uuid4().hex[:8]}")
    ws.write_profile(symbols=SYMBOLS, months=3)
    try:
        yield ws
    finally:
        ws.down()


def _interrupt_after(ws: Workspace, seconds: float) -> tuple[int, float, str]:
    """Start a refresh, SIGINT it after ``seconds``; (exit status, seconds it took to stop, stderr)."""
    proc = subprocess.Popen(
        ws.command("refresh", "--profile", ws.profile),
        env=ws.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # A shell that started us in the background may ignore SIGINT; Python then never raises
        # KeyboardInterrupt. Restore the default so the test measures refresher, not its parent.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(seconds)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"refresh still running {DEADLINE:.0f}s after SIGINT (sent {seconds}s after start)")
    return proc.returncode, time.monotonic() - sent, err


def _assert_nothing_half_loaded(ws: Workspace) -> None:
    try:
        conn = psycopg.connect(ws.dsn())
    except psycopg.OperationalError as exc:
        assert "does not exist" in str(exc)  # interrupted before the database was made: nothing to check
        return
    with conn:
        ledger = read_loaded_segments(conn)
        counted = count_rows(conn, list(ledger), timezones="America/New_York", wait=SEGMENT_LOCK_WAIT)
    assert {s: row.rows for s, row in ledger.items()} == counted


@pytest.mark.usefixtures("cpu_load")
def test_ctrl_c_at_any_phase_stops_promptly_and_a_rerun_completes(workspace: Workspace) -> None:
    stops = []
    for delay in (1.0, 2.0, 3.5, 5.0, 8.0, 12.0):
        status, took, err = _interrupt_after(workspace, delay)
        stops.append((delay, status, round(took, 2)))
        if status == 0:
            break  # the refresh finished before the signal: every phase before it was hit
        if status == -signal.SIGINT:  # still importing (pyarrow under load takes seconds): Python's own exit
            assert ", in main" not in err, err  # but once main() runs, an interrupt is one line
            continue
        assert status == 130, err
        assert err.strip().splitlines()[-1].startswith("refresher: interrupted"), err
        assert "Traceback" not in err, err
        if (workspace.root / "state").exists() and workspace.run("status").stdout.count("running"):
            _assert_nothing_half_loaded(workspace)
    print("delay, exit status, seconds to stop:", stops)
    report = workspace.refresh()
    assert report["segments"]["present"] + report["segments"]["loaded"] == report["segments"]["desired"]
    _assert_nothing_half_loaded(workspace)
