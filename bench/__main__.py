"""Run the benchmarks and write a markdown table with ratios against baselines measured in the same run.

Each ``bench/bench_*.py`` module exposes ``run(quick: bool = False) -> list[dict]``; a row has the keys
benchmark, ours, baseline (optional), unit, ratio (how many times better ours is; optional), note (optional).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Before any bench module imports pyarrow: the rows run in this process get Arrow's memory pool as a user's
# refresh does (featurestore/__init__.py chooses it, docs/engines.md "Arrow's memory pool").
import featurestore  # noqa: F401

MODULES = (
    "bench_cli",
    "bench_engine",
    "bench_featurestore",
    "bench_features",
    "bench_fixtures",
    "bench_jobs",
    "bench_load",
    "bench_plan",
    "bench_production",
    "bench_queue_library",
    "bench_refresh",
    "bench_validation",
)


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def render(sections: dict[str, list[dict[str, Any]]], seconds: float, *, quick: bool = False) -> str:
    how = (
        "`python -m bench --quick` (smaller sizes; `make bench` runs the full ones)"
        if quick
        else "`make bench`"
    )
    lines = [
        "# Benchmarks",
        "",
        f"Run: {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; total {seconds:.0f} s. Ratio = how many times better ours is than the "
        f"baseline measured in the same run. Reproduce: {how}.",
        "",
        "| section | benchmark | ours | baseline | unit | ratio | note |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for section, rows in sections.items():
        for row in rows:
            ratio = row.get("ratio")
            lines.append(
                f"| {section} | {row['benchmark']} | {_fmt(row.get('ours'))} | {_fmt(row.get('baseline'))} | "
                f"{row.get('unit', '')} | {_fmt(ratio) + 'x' if ratio not in (None, '') else ''} | "
                f"{row.get('note', '')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--output", type=Path, default=Path("bench/results.md"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", action="append", choices=MODULES, help="run only these modules")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sections: dict[str, list[dict[str, Any]]] = {}
    failed = False
    for name in args.only or MODULES:
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            sections[name.removeprefix("bench_")] = module.run(quick=args.quick)
        except Exception:
            failed = True
            traceback.print_exc()
            sections[name.removeprefix("bench_")] = [{"benchmark": "FAILED", "note": "see stderr"}]
    text = render(sections, time.perf_counter() - started, quick=args.quick)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
