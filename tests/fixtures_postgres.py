"""Fixtures for a real embedded PostgreSQL server (local engine)."""
