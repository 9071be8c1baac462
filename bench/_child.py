"""A refresh in a fresh interpreter, for the rows that need one: peak RSS of its own, or an environment read at
import (Arrow's memory pool)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_CODE = (
    "import json, os, resource, sys, time\n"
    "from pathlib import Path\n"
    "from featurestore import FeatureStore\n"
    "from refresher.engines.local import LocalEngine\n"
    "from refresher.profile import load_profile\n"
    "from refresher.refresh import refresh\n"
    "import psycopg\n"
    "import pyarrow\n"
    "profile = load_profile(sys.argv[2], [])\n"
    "started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)\n"
    "engine = LocalEngine(Path(sys.argv[1]), template_dir=Path(sys.argv[4]) if len(sys.argv) > 4 else None)\n"
    "report = refresh(profile, engine, FeatureStore(sys.argv[3]))\n"
    "seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)\n"
    # The server's CPU: its postmaster's own and its exited children's (cutime, cstime), and its live children's.
    "with psycopg.connect(engine.start(profile.name).dsn()) as conn:\n"
    "    backend = conn.execute('SELECT pg_backend_pid()').fetchone()[0]\n"
    "def stat(pid): return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()\n"
    "postmaster = int(stat(backend)[1])\n"
    "ticks = sum(map(int, stat(postmaster)[11:15]))\n"
    "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
    "    try:\n"
    "        fields = stat(pid)\n"
    "    except OSError:\n"
    "        continue\n"
    "    if int(fields[1]) == postmaster and int(pid) != backend:\n"
    "        ticks += sum(map(int, fields[11:15]))\n"
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child would report the
    # bench's own peak (2 GB after the earlier sections of a full run) instead of its own.
    "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "out = {'seconds': seconds, 'phases': report.phases,\n"
    "       'rows': report.rows_loaded, 'loaded': report.segments.loaded,\n"
    "       'rss_mb': int(hwm.split()[1]) / 1024,\n"
    "       'user': after.ru_utime - cpu.ru_utime, 'sys': after.ru_stime - cpu.ru_stime,\n"
    "       'pool': pyarrow.default_memory_pool().backend_name,\n"
    "       'server': ticks / os.sysconf('SC_CLK_TCK')}\n"
    "print(json.dumps(out))\n"
)


def child_refresh(
    state: Path,
    profile_path: Path,
    store: Path,
    env: Mapping[str, str] | None = None,
    *,
    template_dir: Path | None = None,
) -> dict[str, Any]:
    """One refresh of the profile file on the local engine in ``state`` (new clusters copy ``template_dir``'s
    initdb output, as the CLI's do, when given): its report, wall time, peak RSS (MB), the interpreter's own CPU
    seconds during it (``user``, ``sys``), the server's CPU seconds by the time it returned (``server``: the
    postmaster and its children, exited or live) and the backend of Arrow's default pool."""
    templates = [] if template_dir is None else [str(template_dir)]
    done = subprocess.run(
        [sys.executable, "-c", _CODE, str(state), str(profile_path), str(store), *templates],
        capture_output=True,
        text=True,
        env=None if env is None else dict(env),
    )
    if done.returncode:
        raise RuntimeError(f"the child refresh failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
