"""``postgres --version`` and ``initdb --help`` asked once per binary, kept in the template cache (``_pgctl.answer``).

The counting programs are shell scripts standing in for a bin directory (they print what the real ones print and
log each run); the last test asks the real embedded binaries.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from refresher.engines import _pgctl, local
from tests.child_processes import outputs, reap
from tests.fixtures_postgres import world_traversable_tmp

VERSION_SCRIPT = """#!/bin/sh
echo run >> "$(dirname "$0")/runs"
echo "postgres (PostgreSQL) {version}"
"""


def _bin_dir(version: str = "18.1") -> Path:
    """A bin directory whose ``postgres --version`` prints ``version`` and logs each run in ``runs``."""
    bin_dir = world_traversable_tmp("answers-")  # the server's OS user (under root) runs the script
    _write_program(bin_dir, version)
    (bin_dir / "runs").touch()
    (bin_dir / "runs").chmod(0o666)
    return bin_dir


def _write_program(bin_dir: Path, version: str) -> None:
    tmp = bin_dir / "postgres.new"
    tmp.write_text(VERSION_SCRIPT.format(version=version), encoding="utf-8")
    tmp.chmod(0o755)
    tmp.replace(bin_dir / "postgres")  # a new inode, as an upgrade installs it


def _runs(bin_dir: Path) -> int:
    return len((bin_dir / "runs").read_text().split())


def _version(bin_dir: Path, cache: Path) -> str:
    return _pgctl.server_version(bin_dir, _pgctl.OsUser.for_server(), bin_dir, cache=cache)


def test_asked_once_per_binary(tmp_path: Path) -> None:
    bin_dir = _bin_dir()
    assert [_version(bin_dir, tmp_path) for _ in range(3)] == ["18.1"] * 3
    assert _runs(bin_dir) == 1


def test_a_replaced_or_touched_binary_is_asked_again(tmp_path: Path) -> None:
    bin_dir = _bin_dir("18.1")
    assert _version(bin_dir, tmp_path) == "18.1"
    _write_program(bin_dir, "19.0")  # replaced (an upgrade)
    assert _version(bin_dir, tmp_path) == "19.0"
    assert _runs(bin_dir) == 2
    st = (bin_dir / "postgres").stat()
    os.utime(bin_dir / "postgres", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched in place
    assert _version(bin_dir, tmp_path) == "19.0"
    assert _runs(bin_dir) == 3


@pytest.mark.parametrize("damage", [b"", b"{not json", b'{"identity": 1}', b"\xff\xfe", b'["a list"]'])
def test_a_damaged_entry_is_asked_again_and_rewritten(tmp_path: Path, damage: bytes) -> None:
    bin_dir = _bin_dir()
    _version(bin_dir, tmp_path)
    (entry,) = tmp_path.glob(".answer-postgres-*.json")
    entry.write_bytes(damage)
    assert _version(bin_dir, tmp_path) == "18.1"
    assert _runs(bin_dir) == 2
    assert _version(bin_dir, tmp_path) == "18.1"
    assert _runs(bin_dir) == 2  # rewritten whole


def test_an_unreadable_cache_directory_asks_every_time(tmp_path: Path) -> None:
    bin_dir = _bin_dir()
    missing = tmp_path / "no" / "such" / "dir"
    assert [_version(bin_dir, missing) for _ in range(2)] == ["18.1"] * 2
    assert _runs(bin_dir) == 2


def test_a_failed_answer_is_not_kept(tmp_path: Path) -> None:
    bin_dir = _bin_dir()
    (bin_dir / "postgres").write_text('#!/bin/sh\necho run >> "$(dirname "$0")/runs"\nexit 1\n')
    user = _pgctl.OsUser.for_server()
    for _ in range(2):
        assert (
            _pgctl.answer(bin_dir, "postgres", "--version", user, cwd=bin_dir, cache=tmp_path).returncode == 1
        )
    assert _runs(bin_dir) == 2
    assert not list(tmp_path.glob(".answer-*"))


ASK = (
    "import sys; from pathlib import Path; from refresher.engines import _pgctl;"
    "print(_pgctl.server_version(Path(sys.argv[1]), _pgctl.OsUser.for_server(), Path(sys.argv[1]),"
    " cache=Path(sys.argv[2])))"
)


def test_two_processes_at_once(tmp_path: Path) -> None:
    bin_dir = _bin_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for _ in range(5):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", ASK, str(bin_dir), str(tmp_path)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(2)
        ]
        assert [out.strip() for out, _ in outputs(procs, timeout=120)] == ["18.1", "18.1"]
        assert all(proc.returncode == 0 for proc in procs)
    # Whole entries only: one per binary, no temporary file left, and the cached answer read back.
    assert len(list(tmp_path.glob(".answer-*"))) == 1
    runs = _runs(bin_dir)
    assert _version(bin_dir, tmp_path) == "18.1"
    assert _runs(bin_dir) == runs


@pytest.mark.postgres
def test_the_real_binaries(tmp_path: Path) -> None:
    """The embedded install's answers, cached and not, agree; a copy of the binary elsewhere is its own entry."""
    bin_dir = _pgctl.embedded_bin_dir()
    user = _pgctl.OsUser.for_server()
    cwd = world_traversable_tmp("answers-cwd-")
    plain = _pgctl.server_version(bin_dir, user, cwd)
    assert _pgctl.server_version(bin_dir, user, cwd, cache=tmp_path) == plain
    assert _pgctl.server_version(bin_dir, user, cwd, cache=tmp_path) == plain
    options = local._initdb_options(bin_dir, user, cwd, cache=None)
    assert local._initdb_options(bin_dir, user, cwd, cache=tmp_path) == options
    assert local._initdb_options(bin_dir, user, cwd, cache=tmp_path) == options
    assert len(list(tmp_path.glob(".answer-*.json"))) == 2
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".answer-")]


STUCK = (
    "import os, sys, time; from pathlib import Path; from refresher.engines import _pgctl;"
    "os.fsync = lambda fd: (print('writing', flush=True), time.sleep(600));"
    "_pgctl.server_version(Path(sys.argv[1]), _pgctl.OsUser.for_server(), Path(sys.argv[1]), cache=Path(sys.argv[2]))"
)


def _stuck_writer(bin_dir: Path, cache: Path) -> subprocess.Popen[str]:
    """A process asking ``bin_dir``'s postgres, stopped in the middle of writing the kept answer."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, str(bin_dir), str(cache)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    except BaseException:
        reap(proc)  # its 600 s sleep, else, and its pipe
        raise
    return proc


def test_a_writer_killed_mid_write_leaves_a_temporary_file_the_next_write_sweeps(tmp_path: Path) -> None:
    killed = _stuck_writer(_bin_dir("18.1"), tmp_path)
    killed.kill()  # kill -9 between the temporary file's write and its rename
    killed.communicate()
    (left,) = tmp_path.glob("..answer-postgres-*.tmp")
    old = left.stat().st_mtime - 3600
    os.utime(left, (old, old))
    writing = _stuck_writer(_bin_dir("17.2"), tmp_path)  # a writer at work now: its file is not a leftover
    try:
        (current,) = set(tmp_path.glob("..answer-postgres-*.tmp")) - {left}
        assert _version(_bin_dir("16.4"), tmp_path) == "16.4"  # writes its own answer, and sweeps
        assert not left.exists()
        assert current.exists()
    finally:
        writing.kill()
        writing.communicate()
