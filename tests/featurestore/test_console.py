"""How the console scripts end their process: what a normal exit does first is done, the native teardown that
can abort a finished command (Arrow's and DuckDB's thread pools) is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import IO

import pytest

from tests.child_processes import reap

REPO = Path(__file__).resolve().parents[2]


def _run(
    code: str, *args: str, stdout: int | IO[str] | None = None, unbuffered: bool = False
) -> subprocess.CompletedProcess[str]:
    """``code`` run by a Python of its own, its stdout captured unless given. The environment is as a user's
    shell has it: stdout buffered when not a terminal (PYTHONUNBUFFERED, set where the tests run, wrote each print
    at once, so a failing stdout was met inside the command rather than at its end), unless ``unbuffered``."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**env, "PYTHONUNBUFFERED": "1"} if unbuffered else env,
        timeout=120,
    )


def test_leave_finishes_threads_and_atexit_handlers_then_skips_the_teardown() -> None:
    done = _run(
        """
        import atexit, sys, threading, time
        from concurrent.futures import ThreadPoolExecutor
        from featurestore.console import leave

        class Torn:
            def __del__(self):
                print("torn down", file=sys.stderr, flush=True)  # the interpreter's teardown, not run

        kept = Torn()
        atexit.register(lambda: print("atexit", flush=True))
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread", flush=True))).start()
        pool = ThreadPoolExecutor(1)  # never shut down: its worker waits on its queue until exit
        pool.submit(time.sleep, 0.1)
        print("buffered", end="")  # no newline: still in the buffer
        leave(3)
        """
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines() == ["bufferedthread", "atexit"], done.stdout
    assert "torn down" not in done.stderr


def test_an_interrupted_command_leaves_without_waiting_for_threads_or_handlers() -> None:
    done = _run(
        """
        import atexit, threading, time
        from featurestore.console import leave

        atexit.register(lambda: print("atexit", flush=True))
        threading.Thread(target=lambda: (time.sleep(30), print("thread", flush=True))).start()
        print("said", end="")
        leave(130, finalize=False)
        """
    )
    assert (done.returncode, done.stdout) == (130, "said")


def _interrupted(code: str, ready: list[str], presses: int = 1) -> tuple[int | None, str, str, float]:
    """``code`` run by a Python of its own (stdout buffered, as a user's shell has it), sent ``presses`` Ctrl-Cs
    0.3 s apart from 0.3 s after it printed the lines ``ready``: its status, the rest of its stdout, its stderr,
    and the seconds from the first Ctrl-C to its end."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:  # not ``with``: on a failure its exit waited, without a bound, for a child that may not end
        assert child.stdout is not None and [child.stdout.readline() for _ in ready] == [
            f"{line}\n" for line in ready
        ]
        time.sleep(0.3)  # inside what printed the last of them
        sent = time.monotonic()
        for _ in range(presses):
            child.send_signal(signal.SIGINT)
            time.sleep(0.3)
        out, err = child.communicate(timeout=60)
    finally:
        reap(child)
    return child.returncode, out, err, time.monotonic() - sent


def test_a_ctrl_c_while_threads_are_joined_leaves_at_once_in_one_line() -> None:
    # A Ctrl-C while leave waited for a thread: a KeyboardInterrupt traceback, then the native teardown
    code = """
        import sys, threading, time
        from featurestore.console import leave

        class Torn:
            def __del__(self):
                print("torn down", file=sys.stderr, flush=True)  # the interpreter's teardown, not run

        kept = Torn()
        threading.Thread(target=time.sleep, args=(30,)).start()
        join = threading._shutdown

        def joining():  # said inside leave: a Ctrl-C once it is read is leave's, however late this process runs
            print("joining", flush=True)
            join()

        threading._shutdown = joining
        leave(0)
        """
    status, _out, err, _ = _interrupted(code, ["joining"])
    assert (status, err) == (130, "-c: interrupted\n")


def _interrupted_in_a_handler(
    handler: str, presses: int, *, ignored: bool = False
) -> tuple[int | None, str, str, float]:
    """``_interrupted`` of a Python whose atexit handler (``handler``, a statement run after printing 'handler')
    is sent ``presses`` Ctrl-Cs while it runs under ``leave``, with Ctrl-C ignored from its start if ``ignored``."""
    code = f"""
        import atexit, signal, sys, time
        from featurestore.console import leave

        if {ignored}:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        def handler():
            print("handler", flush=True)
            {handler}

        atexit.register(handler)
        print("said")
        leave(0)
        """
    return _interrupted(code, ["said", "handler"], presses)


def test_a_ctrl_c_while_an_atexit_handler_runs_lets_it_finish_and_leaves_in_one_line() -> None:
    # 'Exception ignored in atexit callback: <function handler ...>', a KeyboardInterrupt traceback, the handler cut
    # short (a temporary directory's removal, weakref.finalize's, half done) and exit status 0
    status, out, err, _ = _interrupted_in_a_handler("time.sleep(1.5); print('handled', flush=True)", 1)
    assert (status, err) == (130, "-c: interrupted\n")
    assert out == "handled\n"


def test_a_second_ctrl_c_while_an_atexit_handler_runs_ends_the_process_at_once() -> None:
    # a handler that does not end (a native library's teardown waiting on a thread) must not hold the process
    status, out, err, took = _interrupted_in_a_handler("time.sleep(30); print('handled', flush=True)", 2)
    assert (status, err) == (-signal.SIGINT, "-c: interrupted\n")
    assert "handled" not in out and took < 10


def test_a_ctrl_c_ignored_stays_ignored_while_atexit_handlers_run() -> None:
    # a command started in the background by a shell ignores Ctrl-C: holding it off must not make it count
    status, out, err, _ = _interrupted_in_a_handler(
        "time.sleep(1); print('handled', flush=True)", 1, ignored=True
    )
    assert (status, out, err) == (0, "handled\n", "")


@pytest.mark.parametrize(
    ("argv", "status"),
    [(["refresher", "nonesuch"], 2), (["featurestore", "stats", "--cache-root", "STORE"], 2)],
)
def test_both_console_scripts_end_their_process_through_leave(
    argv: list[str], status: int, tmp_path: Path
) -> None:
    argv = [str(tmp_path / "store") if word == "STORE" else word for word in argv]
    done = _run(
        f"""
        import sys
        from featurestore import console
        import {argv[0]}.cli as cli
        def leave(status, *, finalize=True):
            print("left", status, finalize, flush=True)
            raise SystemExit(status)
        console.leave = leave
        sys.argv = {argv!r}
        cli.main()
        print("returned")
        """
    )
    assert done.stdout.splitlines()[-1:] == [f"left {status} True"], (done.stdout, done.stderr)
    assert done.returncode == status


def test_an_answer_lost_at_the_last_flush_fails_in_one_line(tmp_path: Path) -> None:
    # `refresher market status > out` on a full disk: the answer, still in the buffer, was lost, exit status 0
    code = "import sys; from refresher.cli import main; sys.argv = ['refresher', *sys.argv[1:]]; main()"
    with open("/dev/full", "w") as full:
        done = _run(code, "market", "status", "--exchange", "XNYS", "--state-dir", str(tmp_path), stdout=full)
    assert (done.returncode, done.stderr) == (
        2,
        "refresher: stdout: No space left on device: the output is lost\n",
    )


def test_a_json_error_that_stdout_itself_refuses_is_one_line(tmp_path: Path) -> None:
    # `PYTHONUNBUFFERED=1 refresher market status --json > /dev/full`: the answer's print failed inside the
    # command, and printing its JSON error to the same stdout failed again inside the handler: a traceback, rc 1
    code = "import sys; from refresher.cli import main; sys.argv = ['refresher', *sys.argv[1:]]; main()"
    args = ("market", "status", "--exchange", "XNYS", "--json", "--state-dir", str(tmp_path))
    with open("/dev/full", "w") as full:
        done = _run(code, *args, stdout=full, unbuffered=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("command", [["stats", "--json"], ["verify"], ["gc", "--dry-run"]])
def test_a_featurestore_answer_that_stdout_refuses_is_one_line(command: list[str], tmp_path: Path) -> None:
    # `PYTHONUNBUFFERED=1 featurestore stats --json > /dev/full`: the answer's print met the full disk inside the
    # command: an OSError traceback, status 1, and the interpreter's teardown
    (tmp_path / "store").mkdir()
    code = "import sys; from featurestore.cli import main; sys.argv = ['featurestore', *sys.argv[1:]]; main()"
    with open("/dev/full", "w") as full:
        done = _run(code, *command, "--cache-root", str(tmp_path / "store"), stdout=full, unbuffered=True)
    assert (done.returncode, done.stderr) == (
        2,
        "featurestore: stdout: No space left on device: the output is lost\n",
    )


def test_a_reader_gone_at_the_last_flush_is_no_failure() -> None:
    # `featurestore stats | head -0`: what the reader wanted it read
    read, write = os.pipe()
    os.close(read)
    try:
        done = _run("from featurestore.console import leave; print('said'); leave(0)", stdout=write)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_reader_gone_in_the_middle_of_an_answer_is_no_failure(tmp_path: Path) -> None:
    # `refresher profiles | head -1`: an answer past stdout's buffer met the closed pipe while printing, a
    # BrokenPipeError traceback and exit status 1 (and the interpreter's teardown, which leave is there to skip)
    for i in range(300):
        (tmp_path / f"profile_{i:03}.yaml").write_text("universe: {symbols: [AAPL]}\nstart: 2024-10-01\n")
    code = "import sys; from refresher.cli import main; sys.argv = ['refresher', *sys.argv[1:]]; main()"
    read, write = os.pipe()
    os.close(read)
    try:
        args = ("profiles", "--profiles-dir", str(tmp_path), "--state-dir", str(tmp_path / "state"))
        done = _run(code, *args, stdout=write)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_reader_gone_keeps_the_commands_own_status(tmp_path: Path) -> None:
    # `featurestore verify | head -1` of a damaged store: the BrokenPipeError was caught around the whole
    # command, which then exited 0, its status 1 (damage found) lost
    import pyarrow as pa

    from featurestore import FeatureStore

    store = FeatureStore(tmp_path / "store")
    entries = store.put_many((f"{i:064}", pa.table({"x": [i]}), None) for i in range(300))
    for path in {entry.path for entry in entries}:
        path.unlink()
    read, write = os.pipe()
    os.close(read)
    try:
        code = "import sys; from featurestore.cli import main; sys.argv = ['featurestore', *sys.argv[1:]]; main()"
        done = _run(code, "verify", "--quick", "--cache-root", str(tmp_path / "store"), stdout=write)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (1, "")
