"""A bad $REFRESHER_POOL_SIZE: the command that uses it (refresh) refuses in one line naming the variable and its
value; every other command warns once and works (reset too: it refills the pool to the size the server
remembers), so a mistyped variable never keeps a user from the status, the url, a reset or tearing down. Through the real CLI against a real local server."""

from __future__ import annotations

import json
import subprocess

import psycopg
import pytest

from tests.refresher.test_cli import one_line_error
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = pytest.mark.postgres

BAD = ("abc", "-1")


def _with(ws: Workspace, value: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**ws.env, "REFRESHER_POOL_SIZE": value}
    return subprocess.run(ws.command(*args), env=env, capture_output=True, text=True, timeout=600)


def _warned_once(done: subprocess.CompletedProcess[str], value: str) -> None:
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("refresher: warning: ") and f"REFRESHER_POOL_SIZE={value!r}" in lines[0]


def test_status_url_reset_and_down_work_with_a_bad_pool_size_and_refresh_refuses(
    checkout: Workspace,
) -> None:
    ws, profile = checkout, checkout.profile
    for value in BAD:
        line = one_line_error(_with(ws, value, "refresh", "--profile", profile))
        assert line == f"refresher: REFRESHER_POOL_SIZE={value!r}: not a whole number from 0 to 100, nor auto"

        _warned_once(_with(ws, value, "reset", "--profile", profile), value)

        status = _with(ws, value, "status", "--profile", profile, "--json")
        _warned_once(status, value)
        servers = json.loads(status.stdout)["servers"]
        assert [(s["profile"], s["running"]) for s in servers] == [(profile, True)]

        url = _with(ws, value, "url", "--profile", profile)
        _warned_once(url, value)
        with psycopg.connect(url.stdout.strip()) as conn:
            assert conn.execute("SELECT count(*) FROM refresher_segments").fetchone() == (4,)

    down = _with(ws, BAD[0], "down", "--profile", profile, "--json")
    _warned_once(down, BAD[0])
    assert json.loads(down.stdout)["stopped"] == [f"local:{profile}"]
    assert json.loads(ws.run("status", "--profile", profile, "--json").stdout)["servers"] == []
