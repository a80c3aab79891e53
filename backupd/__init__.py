"""backupd: a PostgreSQL backup daemon."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("backupd")
except PackageNotFoundError:  # running from a checkout without install
    __version__ = "0.0.0+unknown"
