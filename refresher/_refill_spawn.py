"""Starting the pool's detached refill (``python -m refresher.pool refill``), light on purpose: ``os``,
``subprocess`` and ``body_keys``. The refill's own module imports psycopg (about 0.2 s of CPU), which a refresh the
stamp answers never pays (``refresher.stamp``), yet it starts a refill for the COPY bodies a killed one left
(``commands.refresh_if_noop``). ``pool.spawn_refill`` is the public face.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from refresher import body_keys
from refresher.engines.base import MAINTENANCE_DB, ServerInfo


def spawn_refill(
    server: ServerInfo,
    *,
    log: Path | None = None,
    analyze: tuple[str, Sequence[str]] | None = None,
    fill: bool = True,
    bodies: tuple[Path, Path] | None = None,
) -> None:
    """``pool.spawn_refill``; ``analyze``: the name of a database just handed out and its tables to analyze."""
    command = [sys.executable, "-m", "refresher.pool", "refill"]
    command += ["--dsn", server.dsn(MAINTENANCE_DB, with_password=False), "--database", server.dbname]
    if server.engine == "local":
        command.append("--background")
    if analyze is not None:
        command += ["--analyze", analyze[0], "--also", ",".join(analyze[1])]
    if not fill:
        command.append("--no-fill")
    if bodies is not None:
        command += ["--bodies", str(bodies[0]), "--store", str(bodies[1])]
    env = {"PGPASSWORD": server.password, "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    # Where it records how it ended for a container's server (``pool._outcome_path``): the caller's cache directory.
    env.update({name: os.environ[name] for name in ("HOME", "XDG_CACHE_HOME") if name in os.environ})
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(log.open("ab")) if log is not None else subprocess.DEVNULL
            held = body_keys.hold(bodies[0]) if bodies is not None else None
            if held is not None:
                stack.callback(os.close, held)  # the refill keeps its own copy of the locked descriptor
            subprocess.run(
                ["/bin/sh", "-c", '"$@" &', "sh", *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                check=True,
                pass_fds=() if held is None else (held,),
            )
    except (OSError, subprocess.CalledProcessError) as exc:
        print(
            f"refresher: the pool's refill did not start ({exc}); the next refresh fills it", file=sys.stderr
        )
