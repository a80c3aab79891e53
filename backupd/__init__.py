"""backupd: a PostgreSQL backup daemon."""

# The one place the version is written: pyproject.toml reads it from here
# (a literal, not importlib.metadata, which costs every command ~30 ms at start).
__version__ = "0.1.0"
