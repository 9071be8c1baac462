"""``kill_processes_in``: what an initdb orphaned by a killed CLI leaves running, found and killed, nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from refresher.engines._pgctl import kill_processes_in

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_kills_the_processes_working_in_the_directory_and_only_those(tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "initdb-x", tmp_path / "other"
    target.mkdir()
    elsewhere.mkdir()
    by_cwd = subprocess.Popen(SLEEPER, cwd=target)
    by_argument = subprocess.Popen([*SLEEPER, "-D", str(target)])
    by_pgdata = subprocess.Popen(SLEEPER, env={**os.environ, "PGDATA": str(target)})
    bystander = subprocess.Popen([*SLEEPER, "-D", str(elsewhere)], cwd=elsewhere)
    try:
        kill_processes_in(target)
        for proc in (by_cwd, by_argument, by_pgdata):
            assert proc.wait(timeout=60) == -9  # a deadline: killed, it is gone at once
        assert bystander.poll() is None
    finally:
        for proc in (by_cwd, by_argument, by_pgdata, bystander):
            proc.kill()
            proc.wait()
