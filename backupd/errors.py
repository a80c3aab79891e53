"""One exception tree for backupd; `cli.py` maps it to exit codes.

`transient` says whether retrying the same attempt could succeed (connection
refused, timeouts, throttling, 5xx). Everything else fails a run at once.
Messages never carry secrets: callers redact DSNs before raising.
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class BackupdError(Exception):
    """Base of every error backupd raises on purpose."""

    exit_code: int = EXIT_FAILED
    transient: bool = False


class ConfigError(BackupdError):
    """The config is invalid; carries every problem found, each with its key path."""

    exit_code = EXIT_USAGE

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class UsageError(BackupdError):
    """The command line asked for something that cannot be done (unknown job, bad flag)."""

    exit_code = EXIT_USAGE


class DaemonUnreachable(BackupdError):
    """No daemon answers on the control socket."""

    exit_code = EXIT_UNREACHABLE


class TransientError(BackupdError):
    """A failure worth retrying: the same attempt may succeed later."""

    transient = True


class SecretError(BackupdError):
    """A secret reference cannot be resolved (missing file or variable, unsafe mode)."""


class SecretMissing(SecretError):
    """The secret belongs to the service's environment, which this process lacks.

    An unset variable, a relative credential name without
    `$CREDENTIALS_DIRECTORY`, a path under another unit's `/run/credentials/`:
    `backupd check` run by hand reports these as unchecked rather than as
    errors. An absolute path that is wrong (absent, a directory) is a plain
    `SecretError`.
    """


class SourceError(BackupdError):
    """The database cannot be backed up (auth, missing database, client too old)."""


class SourceUnavailable(SourceError, TransientError):
    """The database server cannot be reached right now."""

    transient = True


class DumpFailed(BackupdError):
    """The dump tool failed or produced too little output; message includes its stderr."""


class StorageError(BackupdError):
    """A storage backend refused an operation (403, missing bucket, disk full)."""


class TransientStorageError(StorageError, TransientError):
    """A storage operation failed in a way worth retrying (5xx, throttling, reset)."""

    transient = True


class NotFound(StorageError):
    """The object or backup asked for does not exist."""


class PreconditionFailed(StorageError):
    """A conditional write was refused: the object exists (create) or changed (replace)."""


class NotSupported(StorageError):
    """The store does not implement what was asked (HTTP 501), e.g. conditional writes."""


class IntegrityError(BackupdError):
    """Stored bytes do not match their manifest (size, SHA-256, archive listing)."""
