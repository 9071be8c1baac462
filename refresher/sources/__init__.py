"""Where bars come from: ``make_source(profile)`` picks the profile's source."""

from __future__ import annotations

from refresher.errors import SourceError
from refresher.profile import Profile
from refresher.sources.base import Source, SourceReport, effective_range


def make_source(profile: Profile) -> Source:
    """The source named by ``profile.source.kind``, configured from its options."""
    kind = profile.source.kind
    if kind == "synthetic":
        from refresher.sources.synthetic import SyntheticSource

        return SyntheticSource(profile)
    if kind == "files":
        from refresher.sources.files import FilesSource

        return FilesSource(profile)
    if kind == "postgres":
        from refresher.sources.postgres import PostgresSource

        return PostgresSource(profile)
    raise SourceError(
        f"{profile.path}: source.kind={kind!r}: unknown source", field="source.kind", value=kind
    )


__all__ = ["Source", "SourceReport", "effective_range", "make_source"]
