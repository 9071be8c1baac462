"""Where bars come from: ``make_source(profile)`` picks the profile's source."""

from __future__ import annotations

from refresher.profile import FilesSourceSpec, PostgresSourceSpec, Profile
from refresher.sources.base import Source, SourceReport, effective_range


def make_source(profile: Profile) -> Source:
    """The source ``profile.source`` describes (its type is the kind: pydantic chose it at the YAML edge)."""
    spec = profile.source
    # imported here: a synthetic profile never pays for pandas (files) or a second psycopg connection
    if isinstance(spec, FilesSourceSpec):
        from refresher.sources.files import FilesSource

        return FilesSource(profile)
    if isinstance(spec, PostgresSourceSpec):
        from refresher.sources.postgres import PostgresSource

        return PostgresSource(profile)
    from refresher.sources.synthetic import SyntheticSource

    return SyntheticSource(profile)


__all__ = ["Source", "SourceReport", "effective_range", "make_source"]
