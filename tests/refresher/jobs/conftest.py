"""A real redis-server per test, on a free loopback port, with AOF in a temp dir; restartable mid-test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, free_port


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("REFRESHER_REQUIRE_REDIS", "") not in ("", "0", "false"):
            pytest.fail("redis-server is not installed and REFRESHER_REQUIRE_REDIS=1")
        pytest.skip("redis-server is not installed")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(binary, directory, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
