"""The "none" engine: a server someone else runs (a testcontainers container, a CI service, a DSN).

refresher loads and snapshots it like any other; starting and stopping it is its owner's business.
"""

from __future__ import annotations

from collections.abc import Callable

from refresher.engines.base import ServerInfo, ServerStatus


class ExistingServerEngine:
    """Serves one already-running server under the given profile name."""

    name = "existing"

    def __init__(self, server: ServerInfo) -> None:
        self.server = server

    def start(
        self, profile: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
    ) -> ServerInfo:
        return self.info(profile) or self.server

    def info(self, profile: str) -> ServerInfo | None:
        return self.server if profile == self.server.profile else None

    def is_new(self, profile: str) -> bool:
        return False  # someone else's server: whatever it holds is there already

    def stop(self, profile: str, *, on_wait: Callable[[str], None] | None = None) -> bool:
        return False

    def status(self, profile: str | None = None) -> list[ServerStatus]:
        if profile not in (None, self.server.profile):
            return []
        return [
            ServerStatus(self.name, self.server.profile, True, self.server.host, self.server.port, "external")
        ]
