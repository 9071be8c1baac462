"""A Ctrl-C while DuckDB's native module initialises is raised after it, never inside (that aborts the process)."""

from __future__ import annotations

import subprocess
import sys

# Sends SIGINT to itself as the import system looks for DuckDB's native module: without the hold, the
# KeyboardInterrupt is raised inside the import; with it, once DuckDB is whole.
SCRIPT = """
import os, signal, sys

class SigintOnNativeModule:
    def find_spec(self, name, path=None, target=None):
        if name == "_duckdb":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, SigintOnNativeModule())
try:
    import featurestore.manifest
except KeyboardInterrupt:
    duckdb = sys.modules.get("duckdb")
    print("interrupted; duckdb whole:", duckdb is not None and hasattr(duckdb, "connect"))
else:
    print("not interrupted")
"""


def test_ctrl_c_during_the_duckdb_import_is_raised_after_it() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "interrupted; duckdb whole: True", out.stderr
