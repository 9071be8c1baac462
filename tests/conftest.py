"""Shared fixtures. Server fixtures live in their own modules, registered here."""

pytest_plugins = ["tests.fixtures_postgres", "tests.fixtures_docker"]
