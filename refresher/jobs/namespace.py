"""A queue's namespace: the prefix of every key of one queue, so that several queues share one Redis database.

Every stream, consumer group, dead-letter stream, retry set, run hash and index of a queue lives under
``{name}:`` (a stream's group, ``workers``, lives on the stream, so it is the namespace's too). Two checkouts or
two teams pointing ``--queue`` at one Redis database with two names share nothing: a worker reads only its own
namespace's streams, and ``jobs list``, ``prune``, ``delete`` and ``retry-dead`` see only its runs. The default
name, ``refresher``, gives the layout every queue had before namespaces (``refresher:jobs:normal``...): workers and
runs of an existing queue go on as they were.

The name travels in the queue URL (``redis://HOST:6379/0?namespace=teamA``), so a worker fleet configured by one
URL agrees on it; ``$REFRESHER_QUEUE_NAMESPACE`` gives it for a URL without one (``refresher.settings``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from refresher.errors import JobError, without_secrets

DEFAULT_NAMESPACE = "refresher"
# The query parameter of the queue URL; taken out before the URL reaches redis-py, which passed it on to its
# connections as an unknown keyword (a TypeError at the first command).
URL_PARAMETER = "namespace"
# No ':' (so no namespace's prefix is the start of another's: 'a:' never begins 'a:b:'), no space or glob
# character (a SCAN pattern of the prefix matches only its own keys), short enough to read in a key.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_namespace(name: str, label: str) -> str:
    """``name`` when it is a usable namespace; else the one line naming ``label`` (where it came from)."""
    if _NAME.fullmatch(name) is None:
        raise JobError(
            f"{label}: namespace {name!r} is not a usable name: 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
            field="namespace",
            value=name,
        )
    return name


@dataclass(frozen=True)
class Namespace:
    """The key names of one queue (see the module docstring); ``Namespace()`` is the default, the old layout."""

    name: str = DEFAULT_NAMESPACE

    @property
    def prefix(self) -> str:
        return f"{self.name}:"

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_NAMESPACE

    def stream(self, tier: str) -> str:
        """A priority tier's stream (consumer group ``workers``); an entry is one job."""
        return f"{self.prefix}jobs:{tier}"

    def run(self, run_id: str, part: str = "") -> str:
        """A run's hash, or one of its parts (``done``, ``inflight``, ``held``, ...)."""
        return f"{self.prefix}run:{run_id}" + (f":{part}" if part else "")

    @property
    def runs(self) -> str:
        """Sorted set of run ids by submit time."""
        return f"{self.prefix}runs"

    @property
    def dead(self) -> str:
        """The dead-letter stream."""
        return f"{self.prefix}dead"

    @property
    def retry(self) -> str:
        """Sorted set of jobs waiting out a backoff, scored by when they are due."""
        return f"{self.prefix}retry"

    @property
    def features_due(self) -> str:
        return f"{self.prefix}features-due"

    @property
    def held(self) -> str:
        return f"{self.prefix}held"

    @property
    def deleting(self) -> str:
        return f"{self.prefix}deleting"

    @property
    def fences_due(self) -> str:
        return f"{self.prefix}fences-due"


DEFAULT = Namespace()


def split_queue_url(url: str, label: str = "--queue") -> tuple[str, Namespace | None]:
    """The Redis URL without its ``namespace`` parameter, and the namespace it named (None: none named). Checked:
    a bad name, or two, is one line naming ``label``."""
    try:
        parts = urlsplit(url)
    except (
        ValueError
    ) as exc:  # 'redis://[::1:6379/0' (an unclosed IPv6 bracket): a traceback from every command
        shown = without_secrets(url)
        raise JobError(f"{label}={shown!r}: not a Redis URL ({exc})", field="queue", value=shown) from None
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = [value for key, value in query if key == URL_PARAMETER]
    if not names:
        return url, None
    if len(set(names)) > 1:
        shown = ", ".join(repr(n) for n in names)
        raise JobError(f"{label}: two namespaces in one URL ({shown}): give one", field="namespace")
    rest = urlencode([(key, value) for key, value in query if key != URL_PARAMETER])
    return urlunsplit(parts._replace(query=rest)), Namespace(check_namespace(names[0], label))


def in_namespace(url: str, fallback: str | None, label: str, fallback_label: str) -> str:
    """The queue URL naming its namespace: its own ``namespace`` parameter, else ``fallback``
    (``$REFRESHER_QUEUE_NAMESPACE``), else the default's (left unsaid: the URL as it was)."""
    redis_url, named = split_queue_url(url, label)
    if named is not None or not fallback:
        return url
    name = check_namespace(fallback, fallback_label)
    parts = urlsplit(redis_url)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), (URL_PARAMETER, name)])
    return urlunsplit(parts._replace(query=query))


def namespace_of(url: str, label: str = "--queue") -> Namespace:
    """The namespace a queue URL names; the default when it names none."""
    return split_queue_url(url, label)[1] or DEFAULT


__all__ = [
    "DEFAULT",
    "DEFAULT_NAMESPACE",
    "Namespace",
    "check_namespace",
    "in_namespace",
    "namespace_of",
    "split_queue_url",
]
