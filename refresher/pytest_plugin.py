"""pytest fixtures that hand each test a loaded PostgreSQL database (filled in by the plugin issue)."""
