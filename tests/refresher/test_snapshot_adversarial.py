"""The instant reset under attack: a client holding a transaction open on the database."""

from __future__ import annotations

import threading

import psycopg
import pytest

from refresher.engines.base import ServerInfo
from refresher.snapshot import restore_pristine, save_pristine
from tests.refresher.test_snapshot_crash import _state

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize(
    "held",
    [
        "SELECT count(*) FROM ohlcv_daily",
        "DELETE FROM ohlcv_daily",
        "TRUNCATE ohlcv_daily",
        "TRUNCATE refresher_segments",
        "LOCK TABLE refresher_segments",
    ],
)
def test_a_reset_while_a_client_holds_a_transaction_open_ends_it_and_restores(
    loaded: ServerInfo, held: str
) -> None:
    save_pristine(loaded, pool_size=1)
    expected = _state(loaded.dsn())
    with psycopg.connect(loaded.dsn()) as client:
        client.execute(held)  # and the transaction stays open, idle
        done: list[object] = []
        resetting = threading.Thread(target=lambda: done.append(restore_pristine(loaded, refill=False)))
        resetting.daemon = True
        resetting.start()
        resetting.join(30)
        assert done, f"the reset still waits after 30 s behind an open transaction that ran {held!r}"
        with pytest.raises(psycopg.OperationalError):
            client.execute("SELECT 1")
    assert _state(loaded.dsn()) == expected
