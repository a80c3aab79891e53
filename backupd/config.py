"""The config model: frozen dataclasses of the whole SPEC schema, and secret references.

What every other module imports. Reading and validating the TOML file lives
in `backupd.configfile`. Durations are seconds (float), sizes are bytes (int);
secrets stay references (`Secret`) until a run resolves them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from backupd.errors import SecretError, SecretMissing

DEFAULT_CONFIG_PATH = "/etc/backupd/backupd.toml"
DEFAULT_SOCKET_PATH = "/run/backupd/control.sock"
CONFIG_ENV_VAR = "BACKUPD_CONFIG"

JobKind = Literal["full", "schema-only", "data-only", "physical"]
DumpFormat = Literal["custom", "plain"]
CompressionAlgorithm = Literal["none", "gzip", "zstd", "lz4"]
LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
AddressingStyle = Literal["auto", "path", "virtual"]
S3Checksum = Literal["crc32", "md5"]
NotifierType = Literal["webhook", "slack", "healthchecks"]

JOB_KINDS: tuple[JobKind, ...] = ("full", "schema-only", "data-only", "physical")
DUMP_FORMATS: tuple[DumpFormat, ...] = ("custom", "plain")
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console")
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
ADDRESSING_STYLES: tuple[AddressingStyle, ...] = ("auto", "path", "virtual")
S3_CHECKSUMS: tuple[S3Checksum, ...] = ("crc32", "md5")
NOTIFIER_TYPES: tuple[NotifierType, ...] = ("webhook", "slack", "healthchecks")
NOTIFY_EVENTS = ("start", "success", "failure", "recovered", "retry")
SYSTEMD_CREDENTIALS = "/run/credentials"  # systemd's per-unit $CREDENTIALS_DIRECTORY lives here


@dataclass(frozen=True, slots=True)
class Secret:
    """A reference to a secret: `{ file = ... }` or `{ env = ... }`, read when used."""

    file: str | None = None
    env: str | None = None

    def reference(self) -> dict[str, str]:
        return {"file": self.file} if self.file is not None else {"env": str(self.env)}

    def __repr__(self) -> str:
        return f"Secret({self.reference()!r})"

    def resolve(self) -> str:
        """Read the secret now. Files must be private regular files.

        A relative `file` is looked up in `$CREDENTIALS_DIRECTORY` (systemd
        `LoadCredential=`), never in the working directory. The mode is checked
        on the opened file, so a file swapped after the check is not read.
        Messages name the file or variable, never the value.

        `SecretMissing` (not readable *here*, which `check` run by hand only
        notes) is kept for what belongs to the service's environment: an unset
        variable, a relative credential name without `$CREDENTIALS_DIRECTORY`,
        a path under another service's `/run/credentials/UNIT/`. Any other
        file that cannot be read (absent, a directory, no permission) is a
        `SecretError`: the path is wrong wherever it is read.
        """
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise SecretMissing(f"secret environment variable {self.env} is not set")
            return value
        assert self.file is not None
        path = Path(self.file)
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not path.is_absolute():
            if not creds:
                raise SecretMissing(
                    f"secret file {self.file} is a relative path and $CREDENTIALS_DIRECTORY is "
                    "not set (systemd sets it for LoadCredential=); use an absolute path"
                )
            path = Path(creds) / path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO: no hang
        except OSError as exc:
            if _another_services_credential(path, creds):
                raise SecretMissing(
                    f"secret file {path}: {exc.strerror} (a systemd credential, readable only "
                    "by its service)"
                ) from None
            raise SecretError(f"secret file {path}: {exc.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise SecretError(f"secret file {path} is {what}")
        with os.fdopen(fd, "rb") as f:
            mode = stat.S_IMODE(st.st_mode)
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise SecretError(
                    f"secret file {path} is accessible by group or others (mode {mode:04o}); "
                    f"chmod 600 {path}"
                )
            try:
                data = f.read()
            except OSError as exc:
                raise SecretError(f"secret file {path}: {exc.strerror}") from None
        try:
            value = data.decode().rstrip("\r\n")
        except UnicodeDecodeError:
            raise SecretError(f"secret file {path} is not UTF-8 text") from None
        if not value:
            raise SecretError(f"secret file {path} is empty")
        return value


def _another_services_credential(path: Path, creds: str | None) -> bool:
    """Whether `path` is a systemd credential that this process is not the service of."""
    normal = Path(os.path.normpath(path))
    if not normal.is_relative_to(SYSTEMD_CREDENTIALS):
        return False
    return not creds or not normal.is_relative_to(os.path.normpath(creds))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 4
    initial_delay: float = 30.0
    max_delay: float = 900.0
    multiplier: float = 2.0


@dataclass(frozen=True, slots=True)
class Compression:
    algorithm: CompressionAlgorithm = "zstd"
    level: int | None = 3

    @property
    def spec(self) -> str:
        """The config spelling, e.g. `zstd:3`."""
        return self.algorithm if self.level is None else f"{self.algorithm}:{self.level}"

    @property
    def extension(self) -> str:
        return {"none": "", "gzip": ".gz", "zstd": ".zst", "lz4": ".lz4"}[self.algorithm]


@dataclass(frozen=True, slots=True)
class Retention:
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    max_age: float | None = None

    @property
    def is_empty(self) -> bool:
        """An empty policy keeps everything."""
        return (
            not any(
                (
                    self.keep_last,
                    self.keep_daily,
                    self.keep_weekly,
                    self.keep_monthly,
                    self.keep_yearly,
                )
            )
            and self.max_age is None
        )


@dataclass(frozen=True, slots=True)
class VerifyPolicy:
    schedule: tuple[str, ...] = ()
    restore: bool = False
    target: str | None = None  # DSN of a server where scratch databases are created


# -- physical jobs (issue 16; see backupd/wal.py) --
@dataclass(frozen=True, slots=True)
class WalPolicy:
    """`wal = { slot, max_lag, spool }` of a `kind = "physical"` job."""

    slot: str = ""  # physical replication slot; "" -> backupd_{job}
    max_lag: float = 300.0  # archive lag above this is an alert
    spool: str = ""  # pg_receivewal's directory; "" -> {state dir}/wal/{job}


@dataclass(frozen=True, slots=True)
class Encryption:
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    socket: str = DEFAULT_SOCKET_PATH
    socket_mode: int = 0o660
    socket_group: str | None = None
    allow_uids: tuple[int, ...] = ()
    http_listen: str = "127.0.0.1:9187"
    max_concurrent_jobs: int = 4
    timezone: str = "UTC"
    shutdown_grace: float = 300.0
    log_format: LogFormat = "json"
    log_level: LogLevel = "info"


@dataclass(frozen=True, slots=True)
class PostgresSource:
    name: str
    dsn: str
    password: Secret | None = None
    pg_bin_dir: str = ""
    max_concurrent: int = 1
    type: Literal["postgres"] = "postgres"


Source = PostgresSource


@dataclass(frozen=True, slots=True)
class S3Storage:
    name: str
    bucket: str
    prefix: str = ""
    endpoint_url: str = ""
    region: str = "us-east-1"
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    part_size: int = 16 * 1024 * 1024
    upload_concurrency: int = 4
    storage_class: str = ""
    addressing_style: AddressingStyle = "auto"
    # crc32: S3 flexible checksums, as AWS SDKs send them; md5: Content-MD5 only.
    checksum: S3Checksum = "crc32"
    abandoned_upload_grace: float = 86400.0
    type: Literal["s3"] = "s3"


@dataclass(frozen=True, slots=True)
class FilesystemStorage:
    name: str
    path: str
    abandoned_upload_grace: float = 86400.0
    type: Literal["filesystem"] = "filesystem"


Storage = S3Storage | FilesystemStorage


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    source: str
    storage: tuple[str, ...]
    databases: tuple[str, ...] = ()  # empty: the DSN's database; ("*",): every database
    globals: bool = False
    schedule: tuple[str, ...] = ()
    timezone: str = "UTC"  # filled from daemon.timezone when the job does not set it
    jitter: float = 0.0
    catch_up: bool = False
    kind: JobKind = "full"
    format: DumpFormat = "custom"
    tables: tuple[str, ...] = ()
    exclude_tables: tuple[str, ...] = ()
    exclude_table_data: tuple[str, ...] = ()
    encryption: Encryption | None = None
    min_size: int = 1024
    retention: Retention = field(default_factory=Retention)
    verify: VerifyPolicy | None = None
    notify: tuple[str, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 6 * 3600.0
    compression: Compression = field(default_factory=Compression)
    wal: WalPolicy | None = None  # kind = "physical" only (issue 16)


@dataclass(frozen=True, slots=True)
class Notifier:
    name: str
    type: NotifierType
    url: Secret | str
    on: tuple[str, ...] = ("failure", "recovered")
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig
    sources: dict[str, Source]
    storages: dict[str, Storage]
    jobs: dict[str, Job]
    notifiers: dict[str, Notifier]
    path: str = ""
