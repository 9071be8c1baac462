"""``python -m tests.refresher.jobs.killed_worker STEP ARGS...``: ``refresher ARGS`` (a worker) that kills itself
with SIGKILL right after STEP of its first job, as a machine losing power there would; or a ``jobs`` command
killed right after one of its ``COMMAND_STEPS``."""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from refresher import cli, load, snapshot
from refresher.jobs import runs, worker
from refresher.jobs.queue import JobQueue

# step -> (the object holding the function, its name): the worker dies once that call has returned.
STEPS: dict[str, tuple[Any, str]] = {
    "claim": (JobQueue, "read"),  # XREADGROUP took the jobs
    "start": (JobQueue, "started"),  # marked in flight
    "store": (worker, "produce_tables"),  # fetched from the source and written to the store
    "copy": (load, "load_segment"),  # COPY done, inside the transaction, before the commit
    "commit": (worker, "load_produced"),  # committed with its ledger row, not acknowledged
    "ack": (JobQueue, "finish"),  # acknowledged and counted
    "features": (worker, "run_features"),  # the run's features computed, the run not marked complete
    "snapshot": (snapshot, "save_pristine"),  # the pristine snapshot saved, the run not marked complete
}

# The steps of a `jobs` command (not of a worker's job).
COMMAND_STEPS: dict[str, tuple[Any, str]] = {
    "delete-keys": (runs, "_delete_keys"),  # `jobs prune`/`delete`: the runs' keys gone, not their entries
}


def dies_after(call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = call(*args, **kwargs)
        if result != []:  # a read that found nothing is not a claim
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapper


def main(step: str, argv: list[str]) -> int:
    owner, name = {**STEPS, **COMMAND_STEPS}[step]
    setattr(owner, name, dies_after(getattr(owner, name)))
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
