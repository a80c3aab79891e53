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
    """Stored bytes do not match their manifest (missing, size, SHA-256, decoding)."""


class DecryptionError(BackupdError):
    """The data cannot be decrypted: wrong identity, not age, or corrupted."""


class IdentityRequired(DecryptionError):
    """An encrypted backup is read back without an identity to decrypt it."""

    def __init__(self, stem: str) -> None:
        self.stem = stem
        super().__init__(
            f"backup {stem} is encrypted with age: reading it needs an identity "
            "(the secret key of one of its recipients)"
        )


class ToolFailed(BackupdError):
    """A PostgreSQL client tool (pg_restore, psql) could not start or exited non-zero;
    the message holds its first errors."""


class UnsafeDump(BackupdError):
    """The dump holds a database reference that cannot be mapped to the typed name."""


class AmbiguousDatabase(UsageError):
    """A backup of several databases was asked for without naming one."""

    def __init__(self, stem: str, names: str) -> None:
        self.stem = stem
        self.names = names
        super().__init__(f"backup {stem} holds several databases ({names}): name one")


class NoSuchDatabase(NotFound):
    """A backup lacks the database asked for; `globals_kept` when the name asked for
    is "globals" and the backup has a roles and tablespaces dump."""

    def __init__(self, message: str, globals_kept: bool = False) -> None:
        self.globals_kept = globals_kept
        super().__init__(message)


class PlainDumpSelection(UsageError):
    """Tables, schemas or a clean restore asked of a plain SQL dump (pg_restore's only)."""

    def __init__(self) -> None:
        super().__init__(
            "selecting tables or schemas and cleaning need a custom-format dump; "
            "this one is plain SQL"
        )


class DatabaseExists(UsageError):
    """A restore that creates its database found the database already there."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"database {name!r} already exists on the target: a restore that creates its "
            "database restores only into a new one"
        )


class PasswordInTarget(UsageError):
    """The target DSN holds a password, which would be visible in the tools' argv."""

    def __init__(self) -> None:
        super().__init__(
            "the target DSN contains a password, which would be visible in the process list: "
            "remove it and set PGPASSWORD or use a ~/.pgpass file (PGPASSFILE)"
        )


class NothingMatches(UsageError):
    """Table or schema patterns that match nothing in the archive; each miss is
    (kind, pattern, close names)."""

    def __init__(self, misses: Sequence[tuple[str, str, Sequence[str]]]) -> None:
        self.misses = [(kind, pattern, list(close)) for kind, pattern, close in misses]
        what = "; ".join(f"{kind} {pattern}" for kind, pattern, _ in self.misses)
        super().__init__(f"nothing in the backup matches {what}: it would restore nothing")
