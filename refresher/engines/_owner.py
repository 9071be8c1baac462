"""Which process owns a throwaway server, written as labels, and whether that process is gone.

A pytest run that is killed cannot stop its servers; the next run removes them, but only when it can prove
their owner is dead: the owner ran on this host, in this pid namespace, and no process with its pid and start
time exists. Anything else (another developer's live run on the same daemon, a container from another machine
or another container's pid namespace, a pid reused since) is left alone.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

HOST_LABEL = "io.refresher.owner.host"
PIDNS_LABEL = "io.refresher.owner.pidns"
PID_LABEL = "io.refresher.owner.pid"
STARTED_LABEL = "io.refresher.owner.started"
OWNER_LABELS = (HOST_LABEL, PIDNS_LABEL, PID_LABEL, STARTED_LABEL)


def owner_labels(pid: int) -> dict[str, str]:
    """Labels naming process ``pid`` of this host as the owner."""
    return {
        HOST_LABEL: socket.gethostname(),
        PIDNS_LABEL: _pid_namespace(),
        PID_LABEL: str(pid),
        STARTED_LABEL: _start_time(pid),
    }


def owner_gone(labels: Mapping[str, str]) -> bool:
    """True only when the labels name a process of this host and pid namespace that no longer runs."""
    if any(not labels.get(label) for label in OWNER_LABELS):
        return False
    if labels[HOST_LABEL] != socket.gethostname() or labels[PIDNS_LABEL] != _pid_namespace():
        return False
    try:
        pid = int(labels[PID_LABEL])
    except ValueError:
        return False
    return _start_time(pid) != labels[STARTED_LABEL]


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "unknown"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" when there is no such process, or it has ended and
    is a zombie nobody reaped: where no init reaps orphans, as in a container whose first process is no init, a
    killed orphan stays one, its pid and start time kept)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing one.
    fields = stat.rsplit(")", 1)[1].split()
    return "" if fields[0] in ("Z", "X") else fields[19]
