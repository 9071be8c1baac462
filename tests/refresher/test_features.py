"""The feature registry over synthetic daily bars: every named feature computes sane, aligned numbers."""

from __future__ import annotations

import datetime as dt
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refresher.calendar import get_calendar
from refresher.errors import ProfileError
from refresher.features import FEATURES, compute_universe, equal_weight_index, get_feature
from refresher.profile import Listing, profile_from_file
from refresher.sources.synthetic import generate_daily
from tests.child_processes import reap


def bars(symbol: str) -> pd.DataFrame:
    table = generate_daily(
        Listing(symbol, "XNYS", "equity", 5), get_calendar("XNYS"), dt.date(2024, 1, 1), dt.date(2024, 12, 31)
    )
    df: pd.DataFrame = table.to_pandas().drop(columns="symbol")
    return df.set_index(pd.DatetimeIndex(pd.to_datetime(df.pop("date")), name="date"))


@pytest.fixture(scope="module")
def universe() -> dict[str, pd.DataFrame]:
    return {s: bars(s) for s in ("AAA", "BBB", "CCC")}


@pytest.mark.parametrize("name", sorted(n for n, spec in FEATURES.items() if spec.timeframe == "1d"))
def test_every_feature_is_float_and_aligned(name: str, universe: dict[str, pd.DataFrame]) -> None:
    out = compute_universe(name, universe)
    assert set(out) == set(universe)
    for sym, frame in out.items():
        assert frame.index.equals(universe[sym].index)
        assert all(np.issubdtype(t, np.floating) for t in frame.dtypes), frame.dtypes
        assert frame.iloc[60:].notna().all().all(), frame.iloc[60:].isna().sum()


def test_high_low_and_breakouts(universe: dict[str, pd.DataFrame]) -> None:
    df = universe["AAA"]
    out = get_feature("high_low_detection").compute(df)
    assert (out["high_20d"].dropna() >= df["close"][out["high_20d"].notna()]).all()
    assert out["high_20d"].iloc[25] == df["high"].iloc[6:26].max()
    up = out["breakout_up"] == 1.0
    assert (df["close"][up] > out["high_20d"].shift(1)[up]).all()


def test_trend_and_full_analysis_values(universe: dict[str, pd.DataFrame]) -> None:
    df = universe["BBB"]
    trend = get_feature("trend_analysis").compute(df)
    assert trend["sma_50"].iloc[60] == pytest.approx(df["close"].iloc[11:61].mean())
    assert trend["adx_14"].dropna().between(0, 100).all()
    full = get_feature("full_analysis").compute(df)
    assert full["rsi_14"].dropna().between(0, 100).all()
    assert (full["bollinger_upper"].dropna() >= full["bollinger_lower"].dropna()).all()


def test_performance_metrics(universe: dict[str, pd.DataFrame]) -> None:
    df = universe["CCC"]
    perf = get_feature("performance_metrics").compute(df)
    assert perf["cumulative_return"].iloc[-1] == pytest.approx(df["close"].iloc[-1] / df["close"].iloc[0] - 1)
    assert (perf["drawdown"] <= 0).all() and perf["max_drawdown"].is_monotonic_decreasing


def test_correlation_to_equal_weight_index(universe: dict[str, pd.DataFrame]) -> None:
    bench = equal_weight_index(universe)
    assert bench.iloc[0] == pytest.approx(1.0)
    out = compute_universe("correlation_analysis", universe)
    assert out["AAA"]["corr_60d"].dropna().between(-1, 1).all()
    with pytest.raises(ValueError, match="benchmark"):
        get_feature("correlation_analysis").compute(universe["AAA"])
    same = compute_universe("correlation_analysis", {"AAA": universe["AAA"]})["AAA"]
    assert same["corr_60d"].dropna().iloc[-1] == pytest.approx(1.0)


def test_unknown_feature_names_the_value() -> None:
    with pytest.raises(ProfileError) as info:
        get_feature("nope")
    assert info.value.value == "nope" and "high_low_detection" in str(info.value)


# --- parameters in the profile -------------------------------------------------------------------------------

PARAM_PROFILE = """\
universe: {{symbols: [AAA]}}
months: 1
timeframes: [1d]
features: {features}
"""


def profile_with(tmp_path: Path, features: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(PARAM_PROFILE.format(features=features))
    return path


def test_entries_take_parameters_and_a_table_name(tmp_path: Path, universe: dict[str, pd.DataFrame]) -> None:
    path = profile_with(
        tmp_path, "[trend_analysis, {name: trend_analysis, as: trend_fast, params: {fast: 10, slow: 30}}]"
    )
    plain, fast = profile_from_file(path, as_of=dt.date(2024, 6, 28)).features
    assert (plain.name, plain.feature, dict(plain.params)) == (
        "trend_analysis",
        "trend_analysis",
        {"fast": 20, "slow": 50, "slope": 5, "adx": 14},
    )
    assert (fast.name, fast.feature, dict(fast.params)) == (
        "trend_fast",
        "trend_analysis",
        {"fast": 10, "slow": 30, "slope": 5, "adx": 14},
    )
    assert plain.params_json != fast.params_json
    df = universe["AAA"]
    out = fast.compute(df)
    assert list(out.columns) == ["sma_10", "sma_30", "sma_10_slope", "trend_up", "adx_14"]
    assert out["sma_10"].iloc[40] == pytest.approx(df["close"].iloc[31:41].mean())
    assert out["sma_30"].iloc[:29].isna().all() and out["sma_30"].iloc[29:].notna().all()
    # At the defaults a feature computes exactly what it always did.
    pd.testing.assert_frame_equal(plain.compute(df), get_feature("trend_analysis").compute(df))


def test_every_parameter_has_a_documented_default() -> None:
    for spec in FEATURES.values():
        assert spec.defaults, spec.name
        doc = inspect.getdoc(spec.compute) or ""
        assert "NULL" in doc and "``" in doc, spec.name


@pytest.mark.parametrize(
    ("entry", "field", "value"),
    [
        ("{name: trend_analysis, params: {fast: 1}}", "features.0.params.fast", "1"),
        ("{name: trend_analysis, params: {fast: '10'}}", "features.0.params.fast", "'10'"),
        ("{name: trend_analysis, params: {fats: 10}}", "features.0.params.fats", "10"),
        ("{name: trend_analysis, params: {fast: 60}}", "features.0.params.fast", "60"),
        ("{name: full_analysis, params: {bollinger_k: -2}}", "features.0.params.bollinger_k", "-2"),
        ("{name: trend_analysis, as: Trend-Fast}", "features.0.as", "Trend-Fast"),
        ("{name: trend_analysys, as: t}", "features.0.name", "trend_analysys"),
        ("{name: trend_analysis, parms: {fast: 10}}", "features.0.parms", "fast"),
        ("[trend_analysis, {name: trend_analysis, params: {fast: 10}}]", "features.1", "trend_analysis"),
    ],
)
def test_a_bad_entry_names_file_field_and_value(tmp_path: Path, entry: str, field: str, value: str) -> None:
    path = profile_with(tmp_path, entry if entry.startswith("[") else f"[{entry}]")
    with pytest.raises(ProfileError) as info:
        profile_from_file(path, as_of=dt.date(2024, 6, 28))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert info.value.field == field and value in message, message


def test_a_bad_parameter_on_the_cli_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = profile_with(tmp_path, "[{name: trend_analysis, as: trend_fast, params: {fast: 0}}]")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "refresher.cli",
            "plan",
            "--profile",
            str(path),
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert f"{path}: features.0.params.fast=0: " in done.stderr


# A fix in a helper of the built-in features (RSI's seed, say), made in both implementations: no feature function's
# own lines change.
HELPER_FIXES = {
    "compute": "    delta = close.diff()\n",
    "bulk": "    delta = g.diff(close)\n",
}


def test_a_fix_in_a_helper_or_in_the_bulk_pass_changes_a_built_in_features_key(tmp_path: Path) -> None:
    # Only full_analysis's own lines versioned it: another checkout with _rsi fixed (in compute.py, or in bulk.py,
    # whose pass computes the rows of a miss) had the same key, and its store and ledger kept the old RSI rows.
    import featurestore
    import refresher

    for package in (refresher, featurestore):
        source = Path(package.__file__ or "").parent
        shutil.copytree(source, tmp_path / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "from refresher.features.cached import _version\nfrom refresher.features import FEATURES\n"
        "print(_version(FEATURES['full_analysis']))"
    )

    def version() -> str:
        # In the copy (-c puts the working directory first on the path): the checkout under test is elsewhere.
        env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    def fix(module: str) -> None:
        path = tmp_path / "refresher" / "features" / f"{module}.py"
        text = path.read_text()
        line = HELPER_FIXES[module]
        assert text.count(line) == 1, module
        path.write_text(text.replace(line, line + "    delta = delta.fillna(0.0).where(delta.notna())\n"))

    versions = [version()]
    for module in HELPER_FIXES:
        fix(module)
        versions.append(version())
    assert len(set(versions)) == 3, versions

    # A long-lived worker imports the features at its start and keys its first rows later: the checkout moved on
    # (a `git pull`) in between, it runs the old code, and its rows must carry the old code's key, not the new's.
    shutil.rmtree(tmp_path / "refresher")
    shutil.copytree(
        Path(refresher.__file__ or "").parent,
        tmp_path / "refresher",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    worker = (
        "import sys\nfrom refresher.features import FEATURES\nfrom refresher.features.cached import _bulk, _version\n"
        "_bulk()\nprint('imported', flush=True)\nsys.stdin.readline()\nprint(_version(FEATURES['full_analysis']))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", worker],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "imported"
        for module in HELPER_FIXES:
            fix(module)
        out, _ = proc.communicate("\n", timeout=120)
    finally:
        reap(proc)
    assert out.strip() == versions[0], (out, versions)
