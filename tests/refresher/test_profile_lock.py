"""One refresh or reset per profile at a time, through the real CLI and a real local server."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import filelock
import pytest

from refresher.errors import ProfileError
from refresher.profile_lock import lock_path
from tests.child_processes import reap
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = pytest.mark.postgres


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    ws = Workspace(world_traversable_tmp("refresher-lock-"), "local", f"lock_{uuid.uuid4().hex[:8]}")
    ws.write_profile(symbols=["AAPL", "KO"], months=1)
    try:
        yield ws
    finally:
        ws.down()


def _refresh(ws: Workspace, *extra: str) -> subprocess.CompletedProcess[str]:
    command = ws.command("refresh", "--profile", ws.profile, "--json", *extra)
    return subprocess.run(command, env=ws.env, capture_output=True, text=True, timeout=600)


def test_two_refreshes_at_once_both_succeed_and_the_work_is_done_once(workspace: Workspace) -> None:
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: _refresh(workspace), range(2)))
    assert [run.returncode for run in runs] == [0, 0], [run.stderr for run in runs]
    reports = [json.loads(run.stdout.strip().splitlines()[-1]) for run in runs]
    desired = reports[0]["segments"]["desired"]
    assert sorted(r["segments"]["loaded"] for r in reports) == [0, desired]
    assert sorted(r["features"]["loaded"] for r in reports) == [0, 2]
    assert sorted(r["snapshot"] for r in reports) == ["saved", "unchanged"]


def test_a_second_refresh_waits_saying_so_and_no_wait_fails_in_one_line(workspace: Workspace) -> None:
    lock = filelock.FileLock(lock_path(workspace.root / "state", workspace.profile), thread_local=False)
    lock_path(workspace.root / "state", workspace.profile).parent.mkdir(parents=True)
    with lock:
        for command in ("refresh", "reset"):
            done = subprocess.run(
                workspace.command(command, "--profile", workspace.profile, "--no-wait"),
                env=workspace.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 2, done.stderr
            assert done.stderr.count("\n") == 1 and "another refresh or reset is running" in done.stderr
        waiting = subprocess.Popen(
            workspace.command("refresh", "--profile", workspace.profile, "--json"),
            env=workspace.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert waiting.stderr is not None
            assert waiting.stderr.readline().endswith("another refresh or reset is running; waiting for it\n")
            assert waiting.poll() is None  # still waiting while we hold the lock
        except BaseException:
            reap(waiting)
            raise
    try:
        out, _ = waiting.communicate(timeout=600)
    finally:
        reap(waiting)
    assert waiting.returncode == 0
    assert json.loads(out.strip().splitlines()[-1])["segments"]["loaded"] > 0


def test_a_profile_path_never_reaches_the_lock_directory(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="profile="):
        lock_path(tmp_path, "/etc/passwd")


def test_asking_whether_a_profile_is_held_never_makes_a_no_wait_holder_give_up(tmp_path: Path) -> None:
    # `url` asks whether a first refresh holds the lock; the probe took the lock for an instant, and a
    # `refresh --no-wait`, a `reset --no-wait` or a worker's snapshot (wait=False: "skipped", no pristine copy)
    # starting in that instant gave up. The kernel's lock table answers without taking it.
    import threading

    from refresher.errors import ProfileBusy
    from refresher.profile_lock import held, hold_profile

    with hold_profile(tmp_path, "p"):
        assert held(tmp_path, "p")
    assert not held(tmp_path, "p") and not held(tmp_path, "never_locked")
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            held(tmp_path, "p")

    asking = [threading.Thread(target=ask) for _ in range(2)]
    for thread in asking:
        thread.start()
    refused = 0
    try:
        for _ in range(2000):
            try:
                with hold_profile(tmp_path, "p", wait=False):
                    pass
            except ProfileBusy:
                refused += 1
    finally:
        stop.set()
        for thread in asking:
            thread.join()
    assert refused == 0
