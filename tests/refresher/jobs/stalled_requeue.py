"""``python -m tests.refresher.jobs.stalled_requeue TTL ARGS...``: ``refresher ARGS`` (``jobs requeue`` or ``jobs
retry-dead``) whose run lock lasts TTL seconds, and which stops itself (SIGSTOP) once it holds that lock and is
about to write (the script that writes registered: a requeue's reads all done), as a process suspended there
would be; SIGCONT resumes it."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import redis

from refresher import cli
from refresher.jobs import runs


def main(ttl: str, argv: list[str]) -> int:
    runs._REQUEUE_LOCK_TTL = float(ttl)
    real = redis.Redis.register_script

    def stopping(client: redis.Redis, script: Any) -> Any:
        if script in (runs.REQUEUE, runs.REVIVE):
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(client, script)

    redis.Redis.register_script = stopping  # type: ignore[method-assign]
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
