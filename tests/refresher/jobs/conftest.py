"""A real redis-server per test, on a free loopback port, with AOF in a temp dir; restartable mid-test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """redis-server with ``appendonly yes`` / ``appendfsync everysec``, as production should run it."""

    binary: str
    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no"]
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        errors: list[str] = []
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=1).ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError) as exc:
                errors.append(str(exc))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        tail = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not answer on {self.port}: {errors[-1:]}\n{tail}")

    def stop(self) -> None:
        """SIGTERM: Redis flushes the AOF and exits, as a service manager's restart does."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("REFRESHER_REQUIRE_REDIS", "") not in ("", "0", "false"):
            pytest.fail("redis-server is not installed and REFRESHER_REQUIRE_REDIS=1")
        pytest.skip("redis-server is not installed")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(binary, directory, _free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
