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
    "import json, resource, sys, time\n"
    "from pathlib import Path\n"
    "from featurestore import FeatureStore\n"
    "from refresher.engines.local import LocalEngine\n"
    "from refresher.profile import load_profile\n"
    "from refresher.refresh import refresh\n"
    "import pyarrow\n"
    "profile = load_profile(sys.argv[2], [])\n"
    "started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)\n"
    "report = refresh(profile, LocalEngine(Path(sys.argv[1])), FeatureStore(sys.argv[3]))\n"
    "seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)\n"
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child would report the
    # bench's own peak (2 GB after the earlier sections of a full run) instead of its own.
    "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "out = {'seconds': seconds, 'phases': report.phases,\n"
    "       'rows': report.rows_loaded, 'loaded': report.segments.loaded,\n"
    "       'rss_mb': int(hwm.split()[1]) / 1024,\n"
    "       'user': after.ru_utime - cpu.ru_utime, 'sys': after.ru_stime - cpu.ru_stime,\n"
    "       'pool': pyarrow.default_memory_pool().backend_name}\n"
    "print(json.dumps(out))\n"
)


def child_refresh(
    state: Path, profile_path: Path, store: Path, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """One refresh of the profile file on the local engine in ``state``: its report, wall time, peak RSS (MB),
    the interpreter's own CPU seconds during it (``user``, ``sys``; the server's are not in them) and the
    backend of Arrow's default pool."""
    done = subprocess.run(
        [sys.executable, "-c", _CODE, str(state), str(profile_path), str(store)],
        check=True,
        capture_output=True,
        text=True,
        env=None if env is None else dict(env),
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
