"""A real redis-server on a free loopback port, with AOF in a directory of its own; restartable.

Shared by the jobs tests (``tests/refresher/jobs/conftest.py``) and the jobs benchmark (``bench/bench_jobs.py``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def free_port() -> int:
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
    # More redis-server arguments, e.g. ("--key-load-delay", "1000"): a start that loads slowly.
    options: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, wait: bool = True) -> None:
        """Start it and, with ``wait``, return once it answers (its data loaded)."""
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no"]
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen([*args, *self.options], stdout=log, stderr=subprocess.STDOUT)
        if not wait:
            return
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

    @classmethod
    def started(cls, directory: Path) -> RedisServer:
        """A server on a free port in ``directory``, answering; raises RuntimeError without redis-server."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        server = cls(binary, directory, free_port())
        server.start()
        return server


__all__ = ["RedisServer", "free_port"]
