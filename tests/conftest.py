"""Shared fixtures. Server fixtures live in their own modules, registered here."""

import signal

import pytest

pytest_plugins = ["tests.fixtures_postgres", "tests.fixtures_docker"]


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches the tests (and the processes they start) even when `make test` was started with it ignored.

    A shell starting a command in the background without job control (`nohup make test &` in a script, some CI
    runners) starts it with SIGINT ignored, and Python then installs no KeyboardInterrupt handler; an ignored
    signal is also inherited through exec. The tests that interrupt DuckDB on purpose then failed or hung.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
