"""Fixtures for a real Docker engine; skip without one unless REFRESHER_REQUIRE_DOCKER=1."""
