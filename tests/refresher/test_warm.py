"""`refresher warm`: the store filled without any database, so the refresh after it only loads."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = pytest.mark.postgres

FEATURES = "[dashboard_data, {name: trend_analysis, as: trend_fast, params: {fast: 10, slow: 30}}, correlation_analysis]"


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    root = world_traversable_tmp("refresher-warm-")
    ws = Workspace(root, "local", f"warm_{uuid.uuid4().hex[:8]}")
    name = ws.write_profile(months=2)
    path = root / "profiles" / f"{name}.yaml"
    path.write_text(path.read_text().replace("features: [dashboard_data]", f"features: {FEATURES}"))
    try:
        yield ws
    finally:
        ws.down()


def warm(ws: Workspace, *extra: str) -> dict[str, int]:
    done = ws.run("warm", "--profile", ws.profile, "--json", *extra)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_warm_touches_no_database_and_the_refresh_after_it_only_loads(workspace: Workspace) -> None:
    report = warm(workspace)
    segments = report["segments"]
    assert report["fetched"] == segments > 0
    assert report["features"] == report["computed"] == 3 * 3  # three entries, three symbols
    # No server was started, no state written for one: nothing of a database exists.
    assert (
        not list((workspace.root / "state").rglob("PG_VERSION"))
        if (workspace.root / "state").exists()
        else True
    )
    assert workspace.run("status", "--profile", workspace.profile, "--json").stdout.count('"profile"') == 0

    again = warm(workspace)
    assert (again["fetched"], again["computed"]) == (0, 0)

    refreshed = workspace.refresh()
    # 100% hits: every segment and every feature the refresh asked the store for was there.
    assert refreshed["store"]["misses"] == 0 and refreshed["store"]["hits"] >= segments
    assert refreshed["segments"]["fetched"] == 0
    assert refreshed["features"]["loaded"] == 9 and refreshed["features"]["computed"] == 0
    assert workspace.scalar("SELECT count(*) FROM features_trend_fast WHERE sma_10 IS NOT NULL") > 0


def test_warm_as_of_and_a_bad_profile(workspace: Workspace, tmp_path: Path) -> None:
    january_february = warm(workspace, "--as-of", "2025-02-28")
    assert january_february["fetched"] == january_february["segments"] == 3 * 2 * 2
    february_march = warm(workspace)  # the profile's own as_of, 2025-03-31: only March is new
    assert february_march["fetched"] == 3 * 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "universe: {symbols: [AAA]}\nmonths: 1\nfeatures: [{name: trend_analysis, params: {slow: 1}}]\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "refresher.cli", "warm", "--profile", str(bad)],
        env=workspace.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"{bad}: features.0.params.slow=1:" in done.stderr
    assert not (workspace.root / "store").exists() or not any((workspace.root / "store").rglob("*.arrow"))


def test_warm_holds_the_collector_back_and_gives_it_back_even_when_a_fetch_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from featurestore import FeatureStore
    from refresher import warm as warm_module
    from refresher._gc import YOUNG_THRESHOLD
    from refresher.jobs.segment import fetch_tables
    from refresher.profile import load_profile

    (tmp_path / "p.yaml").write_text(
        "universe:\n  symbols: [AAPL]\nmonths: 2\ntimeframes: [1d]\nfeatures: []\n"
    )
    profile = load_profile("p", (tmp_path,))
    before = gc.get_threshold()
    seen: list[tuple[int, int]] = []
    fail = False

    def observed(*args: object) -> object:
        seen.append((gc.get_threshold()[0], gc.get_freeze_count()))
        if fail:
            raise OSError("the store's disk went away")
        return fetch_tables(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(warm_module, "fetch_tables", observed)
    assert warm_module.warm(profile, FeatureStore(tmp_path / "store")).fetched > 0
    fail = True
    with pytest.raises(OSError, match="went away"):
        warm_module.warm(profile, FeatureStore(tmp_path / "other-store"))
    assert len(seen) == 2 and all(
        young == max(before[0], YOUNG_THRESHOLD) and frozen > 0 for young, frozen in seen
    )
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, 0)
