"""Helpers for source tests: small profiles written to a temporary directory."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from refresher.profile import Profile, load_profile
from tests.fixtures_postgres import throwaway_postgres

MakeProfile = Callable[..., Profile]


@pytest.fixture
def make_profile(tmp_path: Path) -> MakeProfile:
    def make(body: str, name: str = "test") -> Profile:
        path = tmp_path / f"{name}.yaml"
        path.write_text(body)
        return load_profile(str(path), [])

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def upstream_dsn() -> Iterator[str]:
    """A throwaway real PostgreSQL server standing in for the team's upstream database."""
    port = _free_port()
    with throwaway_postgres(port, "127.0.0.1"):
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
