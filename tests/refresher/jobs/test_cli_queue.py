"""Every ``jobs``/``worker`` command facing a queue it cannot use, or bad worker options: one line naming the
option and the value, exit status 2, no traceback, no password; against a real redis-server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.redis

PROFILE = "universe: {symbols: [AAPL]}\nexchange: XNYS\nmonths: 1\nas_of: 2025-03-31\ntimeframes: [1d]\n"


@pytest.fixture
def not_redis() -> Iterator[str]:
    """A loopback port where something else answers (an HTTP server, say)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()


def refresher(
    tmp_path: Path,
    *args: str,
    queue: str | None = None,
    module: Sequence[str] = ("refresher.cli",),
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``refresher ARGS`` in a temp state dir and store; ``queue``: its $REFRESHER_QUEUE; ``module``: what runs
    it (``python -m MODULE...``, e.g. ``killed_worker STEP``); ``env``: more environment variables."""
    with start_refresher(tmp_path, *args, queue=queue, module=module, env=env) as proc:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_refresher(
    tmp_path: Path,
    *args: str,
    queue: str | None = None,
    module: Sequence[str] = ("refresher.cli",),
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    """``refresher``, started and left running (its output piped)."""
    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "profiles" / "q.yaml").write_text(PROFILE)
    environ = {
        **os.environ,
        "REFRESHER_STATE_DIR": str(tmp_path / "state"),
        "FEATURE_STORE_PATH": str(tmp_path / "store"),
        "REFRESHER_PROFILES": str(tmp_path / "profiles"),
    }
    environ.pop("REFRESHER_QUEUE", None)
    environ.pop("REFRESHER_WORKER_CONNECT_TIMEOUT", None)
    if queue is not None:
        environ["REFRESHER_QUEUE"] = queue
    return subprocess.Popen(
        [sys.executable, "-m", *module, *args, "--engine", "local"],
        env={**environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


COMMANDS = [
    ["jobs", "status", "r1"],
    ["jobs", "status", "r1", "--watch"],
    ["jobs", "list"],
    ["jobs", "retry-dead", "r1"],
    ["jobs", "requeue", "r1"],
    ["jobs", "cancel", "r1"],
    ["jobs", "delete", "r1"],
    ["jobs", "prune", "--older-than", "7d"],
    ["jobs", "submit", "--profile", "q"],
    [
        "worker",
        "--burst",
        "--connect-timeout",
        "0",
    ],  # asks once, as the others (test_worker_connect: waiting)
]


def one_line(done: subprocess.CompletedProcess[str], *named: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    for text in named:
        assert text in done.stderr, done.stderr


def refusing_queues(redis_server: RedisServer, not_redis: str) -> list[tuple[str, list[str]]]:
    """Queues no wait makes usable, each with what its line names: something else than Redis answering, and
    ``redis_server`` (given the password s3cret here) refusing a database number, a password, no password."""
    redis_server.client().config_set("requirepass", "s3cret")
    port = redis_server.port
    return [
        (not_redis, [not_redis, "not a usable Redis"]),  # was a traceback (InvalidResponse)
        (f"redis://:s3cret@127.0.0.1:{port}/99", [f"127.0.0.1:{port}/99"]),  # DB index out of range
        (f"redis://:wrong@127.0.0.1:{port}/0", [f"redis://:***@127.0.0.1:{port}/0"]),
        (f"redis://127.0.0.1:{port}/0", ["authenticated"]),  # HELLO refused
    ]


def test_a_queue_that_is_not_a_usable_redis_is_one_line_for_every_command(
    tmp_path: Path, redis_server: RedisServer, not_redis: str
) -> None:
    queues = [
        *refusing_queues(redis_server, not_redis),
        (f"redis://127.0.0.1:{free_port()}/0", ["cannot reach Redis"]),
    ]
    for queue, named in queues:
        for command in COMMANDS:
            done = refresher(tmp_path, *command, "--queue", queue)
            one_line(done, *named)
            assert "s3cret" not in done.stderr and "wrong" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--name", ""),  # accepted: a consumer named "-0"
        ("--visibility-timeout", "-1"),
        ("--visibility-timeout", "0"),
        ("--visibility-timeout", "nan"),
        ("--max-attempts", "0"),
    ],
)
def test_bad_worker_options_are_one_line(
    tmp_path: Path, redis_server: RedisServer, option: str, value: str
) -> None:
    done = refresher(tmp_path, "worker", "--burst", "--queue", redis_server.url, option, value)
    one_line(done, f"{option}=")  # -1 and nan were a traceback in the worker's thread, and exit status 0


def test_an_empty_when_closed_is_an_unknown_exchange_and_submits_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    done = refresher(
        tmp_path, "jobs", "submit", "--profile", "q", "--queue", redis_server.url, "--when-closed", ""
    )
    one_line(done, "exchange=''")  # was a run submitted with no hold at all, its server started
    assert redis_server.client().zcard("refresher:runs") == 0


def test_a_bad_refresher_queue_is_named_as_the_variable(tmp_path: Path) -> None:
    for queue in ("garbage", f"redis://:s3cret@127.0.0.1:{free_port()}/0"):
        for command in COMMANDS:
            done = refresher(tmp_path, *command, queue=queue)
            one_line(done, "REFRESHER_QUEUE=")  # was "--queue=", an option the user never gave
            assert "--queue" not in done.stderr and "s3cret" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("target", "part"),
    [
        ("postgresql://loader:pw@s3cr3t@localhost/x", "host"),  # libpq's host was 's3cr3t@localhost'
        ("postgresql://loader:pw@s3:cr3t@localhost/x", "port"),  # its port was 'cr3t@localhost'
    ],
)
def test_a_target_whose_password_has_an_unescaped_at_is_refused_without_showing_it(
    tmp_path: Path, redis_server: RedisServer, target: str, part: str
) -> None:
    # The rest of the password, cut by libpq at its first '@', became the host: it was printed in the
    # 'cannot connect' line (and, had the host resolved, it went into Redis as the run's target).
    done = refresher(
        tmp_path, "jobs", "submit", "--profile", "q", "--queue", redis_server.url, "--target", target
    )
    one_line(done, "--target", f"its {part} holds an '@'", "%-escape special characters in the password")
    assert "cr3t" not in done.stderr and "pw" not in done.stderr and "loader" not in done.stderr, done.stderr
    assert redis_server.client().zcard("refresher:runs") == 0
