"""`jobs submit` beside a command stopped (Ctrl-Z) holding what its plan needs: it says what it waits for.

Each holder is stopped for real, and the submit's first line is waited for with a timeout: on the old code each
test failed by that timeout (no line at all) or by the line it gave at the end of its wait, never by hanging."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.child_processes import outputs, reap
from tests.redis_server import RedisServer
from tests.refresher.test_refresh_e2e import Workspace
from tests.refresher.test_stopped_holders import (
    STARTING,
    TIMEOUT,
    _stopped,
    reset_at_its_door,
    says_what_it_waits_for,
    workspace,
)

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

__all__ = ["workspace"]  # the fixture, shared


def _submit(workspace: Workspace, redis_server: RedisServer) -> subprocess.Popen[str]:
    return subprocess.Popen(
        workspace.command(
            "jobs", "submit", "--profile", workspace.profile, "--queue", redis_server.url, "--json"
        ),
        env=workspace.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _submitted(submit: subprocess.Popen[str]) -> None:
    [(out, err)] = outputs([submit], TIMEOUT)
    assert submit.returncode == 0, err
    assert json.loads(out)["run_id"], out


def test_submit_behind_a_stopped_start_says_what_it_waits_for(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    # `jobs submit` starts the profile's server, as `url` does, but told no one of the wait for the engine's
    # start/stop lock: behind a command stopped (Ctrl-Z) in it, it waited without a word, for good.
    workspace.refresh()
    lock = workspace.root / "state" / "local" / f".{workspace.profile}.lock"
    holder = f"""
        import os, signal
        from pathlib import Path
        from refresher.engines._common import locked
        with locked(Path({str(lock)!r})):
            print("held", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
    """
    submit: subprocess.Popen[str] | None = None
    try:  # reaped also when the holder's end fails (_stopped's exit), its pipes with it
        with _stopped(holder, workspace.env):
            submit = _submit(workspace, redis_server)
            says_what_it_waits_for(submit, STARTING)
        _submitted(submit)
    finally:
        reap(submit)


def test_submit_behind_a_stopped_resets_shut_door_says_what_it_waits_for(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    # A reset stopped (Ctrl-Z) with the database's door shut holds TAKE: `jobs submit` waited for it
    # DOOR_WAIT_SECONDS (30 s) without a word, then failed saying a reset held it.
    workspace.refresh()
    submit: subprocess.Popen[str] | None = None
    try:  # reaped also when the holder's end fails (_stopped's exit), its pipes with it
        with _stopped(reset_at_its_door(workspace), workspace.env):
            submit = _submit(workspace, redis_server)
            says_what_it_waits_for(submit, f"database {workspace.profile} refuses sessions", "a reset")
        _submitted(submit)
    finally:
        reap(submit)
