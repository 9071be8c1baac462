"""Plain-text views of the store's report objects; ``--json`` prints the objects themselves instead."""

from __future__ import annotations

from featurestore.maintenance import IntegrityReport
from featurestore.store import CacheStats


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} TB"  # unreachable: GB is the last unit above


def render_stats(stats: CacheStats) -> str:
    kinds = ", ".join(f"{name} {k.entries:,}" for name, k in stats.kinds.items())
    sizes = ", ".join(f"{name} {human_bytes(k.bytes)}" for name, k in stats.kinds.items())
    return "\n".join(
        [
            f"featurestore: {stats.root}",
            f"  entries   {stats.entries:,} ({kinds})",
            f"  bytes     {human_bytes(stats.bytes)} ({sizes})",
            f"  bodies    {stats.bodies.entries:,} COPY bodies, {human_bytes(stats.bodies.bytes)}",
            f"  hits      {stats.hits:,}",
            f"  misses    {stats.misses:,}",
            f"  hit rate  {stats.hit_rate:.1%}",
        ]
    )


def render_integrity(report: IntegrityReport, *, deep: bool) -> str:
    how = "content hashes" if deep else "footers and sizes"
    verdict = "ok" if report.ok else "DAMAGED"
    lines = [f"featurestore verify: {verdict}: {report.checked:,} entries checked ({how})"]
    lines += [f"  missing file: {key}" for key in report.missing]
    lines += [f"  corrupt file: {key}" for key in report.corrupt]
    if report.orphans or report.temporaries:
        lines.append(
            f"  {len(report.orphans)} orphan files, {len(report.temporaries)} temporaries"
            " (featurestore gc removes them after the grace period)"
        )
    return "\n".join(lines)


__all__ = ["human_bytes", "render_integrity", "render_stats"]
