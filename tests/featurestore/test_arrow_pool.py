"""Arrow's memory pool in the processes that run refresher or the store (``featurestore/__init__.py``,
docs/engines.md): glibc malloc ("system") on Linux, unless the user chose a pool or imported pyarrow first.

Each case is a fresh interpreter: pyarrow fixes its pool once, at its import, and this process has long made its
choice. The children get this environment without ARROW_DEFAULT_MEMORY_POOL, which importing refresher here has
set: inherited, it would make every case pass with the choice deleted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the pool is chosen on Linux only")

ROOT = Path(__file__).resolve().parents[2]
VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, **extra}


def _pool_after(code: str, env: dict[str, str]) -> str:
    """The backend of pyarrow's default pool once ``code`` has run in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport pyarrow\nprint(pyarrow.default_memory_pool().backend_name)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()[-1]


def test_pyarrow_alone_uses_another_pool() -> None:
    # The control: were pyarrow's own default glibc malloc, the cases below would prove nothing.
    assert _pool_after("pass", _env()) != "system"


@pytest.mark.parametrize(
    "module",
    [
        "refresher.refresh",
        "refresher.cli",
        "refresher.jobs.worker",
        "refresher.pytest_plugin",
        "featurestore",
    ],
)
def test_each_way_into_a_load_uses_glibc_malloc(module: str) -> None:
    assert _pool_after(f"import {module}", _env()) == "system"


def test_a_pool_the_user_chose_is_kept() -> None:
    assert _pool_after("import refresher.refresh", _env(**{VARIABLE: "mimalloc"})) == "mimalloc"


def test_an_empty_variable_is_no_choice() -> None:
    # `export ARROW_DEFAULT_MEMORY_POOL=` (a Makefile's or a shell profile's blank) chooses nothing; pyarrow reads
    # it as unset and took mimalloc, so the blank silently cost the gain.
    assert _pool_after("import refresher.refresh", _env(**{VARIABLE: ""})) == "system"


def test_a_pyarrow_imported_first_is_left_alone() -> None:
    # Its pool is fixed already; setting the variable now would only change the user's child processes.
    code = "import os, pyarrow, refresher.refresh\nassert 'ARROW_DEFAULT_MEMORY_POOL' not in os.environ"
    assert _pool_after(code, _env()) != "system"


def test_a_pytest_run_with_the_plugin_uses_glibc_malloc(tmp_path: Path) -> None:
    # The plugin loads through its pytest11 entry point, before any test module or conftest imports pyarrow.
    (tmp_path / "test_pool.py").write_text(
        textwrap.dedent(
            """\
            import pyarrow

            def test_pool():
                assert pyarrow.default_memory_pool().backend_name == "system"
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_pool.py")],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (
        "refresher"
        in subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "--trace-config",
                "--co",
                "-q",
                "-p",
                "no:cacheprovider",
                str(tmp_path),
            ],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
    )  # the entry point did load the plugin: the run above is not passing for another reason
