"""The config model: frozen dataclasses of the whole SPEC schema, and secret references.

What every other module imports, and where each config key is declared, once:
`key(parser, default=...)` gives its type, default, parser (validation and
error messages), how `check --show` prints it and whether it is a secret
(`backupd.config.keys`). Reading the TOML file lives in `backupd.config.file`,
which derives the schema from these declarations. Durations are seconds
(float), sizes are bytes (int); secrets stay references (`Secret`) until a run
resolves them.

Adding a key: declare it here (the parser kinds are in `backupd.config.values`),
use it, test it, document it. Key order is the order errors are reported in and
`--show` prints.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from backupd.config import values as v
from backupd.config.keys import (
    Ctx,
    Invalid,
    Parser,
    describe,
    key,
    kind,
    model,
    secret_values,
    table,
)
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
CompressionAt = Literal["client", "server"]
COMPRESSION_AT: tuple[CompressionAt, ...] = ("client", "server")
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


_REFERENCE_FORMS = (
    '{ file = "PATH" } (a file only backupd can read; relative paths are looked up in '
    '$CREDENTIALS_DIRECTORY) or { env = "NAME" } (an environment variable)'
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _read_secret(value: object, ctx: Ctx) -> Secret:
    """`{ file = ... }` or `{ env = ... }`; the value itself is never quoted back."""
    if isinstance(value, str):
        raise Invalid(f"secrets are not written in the config file; use {_REFERENCE_FORMS}")
    if not isinstance(value, dict):
        raise Invalid(f"expected {_REFERENCE_FORMS}, got {kind(value)}")
    if len(value) != 1 or next(iter(value)) not in ("file", "env"):
        raise Invalid(f"expected exactly one key, file or env: {_REFERENCE_FORMS}")
    name, ref = next(iter(value.items()))
    if not isinstance(ref, str) or not ref or "\x00" in ref:
        raise Invalid(f"{name}: expected a non-empty string, got {kind(ref)}")
    if name == "env":
        if _ENV_NAME.fullmatch(ref) is None:
            raise Invalid(f"env: not a valid environment variable name: {describe(ref)}")
        return Secret(env=ref)
    return Secret(file=ref)


secret_reference = Parser(_read_secret, show=Secret.reference)


def _read_url_or_secret(value: object, ctx: Ctx) -> Secret | str:
    return v.http_url(value, ctx) if isinstance(value, str) else _read_secret(value, ctx)


url_or_secret = Parser(
    _read_url_or_secret, show=lambda url: url if isinstance(url, str) else url.reference()
)


@model
class RetryPolicy:
    max_attempts: int = key(v.integer(1), default=4)
    initial_delay: float = key(v.duration(), default=30.0)
    max_delay: float = key(v.duration(), default=900.0)
    multiplier: float = key(v.number(1.0), default=2.0)

    @staticmethod
    def rules(values: Mapping[str, Any], given: Collection[str]) -> Iterator[tuple[str, str]]:
        if values["max_delay"] < values["initial_delay"]:
            yield (
                "max_delay",
                f"must be at least initial_delay ({v.format_duration(values['initial_delay'])})",
            )


@model
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


_COMPRESSION_RE = re.compile(r"(none|gzip|zstd|lz4)(?::([0-9]{1,2}))?")
_COMPRESSION_LEVELS: dict[str, tuple[int, int] | None] = {
    "none": None,
    "gzip": (1, 9),
    "zstd": (1, 19),
    "lz4": (0, 16),
}
_COMPRESSION_FORMS = "none, gzip[:1-9], zstd[:1-19] or lz4[:0-16]"


def parse_compression(text: str) -> Compression:
    """`"zstd:3"` -> Compression("zstd", 3); without a level, the codec's default (level None)."""
    match = _COMPRESSION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"expected {_COMPRESSION_FORMS}, got {describe(text)}")
    algorithm: CompressionAlgorithm
    algorithm = next(a for a in ("none", "gzip", "zstd", "lz4") if a == match[1])
    if match[2] is None:
        return Compression(algorithm, None)
    levels = _COMPRESSION_LEVELS[algorithm]
    if levels is None:
        raise ValueError(f'"none" takes no level, got {describe(text)}')
    level = int(match[2])
    if not levels[0] <= level <= levels[1]:
        raise ValueError(
            f"{algorithm} levels go from {levels[0]} to {levels[1]}, got {describe(text)}"
        )
    return Compression(algorithm, level)


def _read_compression(value: object, ctx: Ctx) -> Compression:
    if not isinstance(value, str):
        raise Invalid(f"expected {_COMPRESSION_FORMS}, got {describe(value)}")
    try:
        return parse_compression(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


compression_spec = Parser(_read_compression, show=lambda c: c.spec)


@model
class Retention:
    keep_last: int = key(v.integer(0), default=0)
    keep_daily: int = key(v.integer(0), default=0)
    keep_weekly: int = key(v.integer(0), default=0)
    keep_monthly: int = key(v.integer(0), default=0)
    keep_yearly: int = key(v.integer(0), default=0)
    max_age: float | None = key(v.optional_max_age, default=None)

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


_SOURCE_DSN_FIX = (
    'remove it from the DSN and set password = { file = "..." } or { env = "..." } instead'
)
_VERIFY_DSN_FIX = "remove it from the DSN and give it to libpq in a ~/.pgpass file (PGPASSFILE)"


@model
class VerifyPolicy:
    schedule: tuple[str, ...] = key(v.schedule, default=())
    restore: bool = key(v.boolean, default=False)
    # DSN of a server where scratch databases are created
    target: str | None = key(v.dsn(_VERIFY_DSN_FIX), default=None)

    # restore = true without a target: a Job rule, since a physical job's drill brings its
    # own server and needs none


@model
class WalPolicy:
    """`wal = { slot, max_lag, spool }` of a `kind = "physical"` job (see operations/wal.py)."""

    slot: str = key(v.slot_name, default="")  # physical replication slot; "" -> backupd_{job}
    max_lag: float = key(v.positive_duration, default=300.0)  # archive lag above: an alert
    spool: str = key(v.optional_absolute_path, default="")  # "" -> {state dir}/wal/{job}


# Keys of logical dumps that mean nothing to a physical job (a whole cluster, by pg_basebackup).
NOT_PHYSICAL = ("databases", "globals", "format", "tables", "exclude_tables", "exclude_table_data")


@model
class Encryption:
    recipients: tuple[str, ...] = key(v.recipients)


@model
class HaConfig:
    """`[daemon] ha`: several daemons sharing one schedule through claims in a store."""

    enabled: bool = key(v.boolean, default=False)
    lease: float = key(v.duration(positive=True), default=60.0)  # a claim's life unrenewed
    storage: str = key(v.string, default="")  # where claims live; "" = each job's first

    @staticmethod
    def rules(values: Mapping[str, Any], given: Collection[str]) -> Iterator[tuple[str, str]]:
        if values["lease"] < 3:
            yield ("lease", "must be at least 3s (claims are renewed every lease/3)")


def node_name(daemon: DaemonConfig) -> str:
    """This daemon's node name: `[daemon] node`, else the host name."""
    import socket

    return daemon.node or socket.gethostname() or "localhost"


@model
class DaemonConfig:
    socket: str = key(v.socket_path, default=DEFAULT_SOCKET_PATH)
    socket_mode: int = key(v.socket_mode, default=0o660)
    socket_group: str | None = key(v.optional_name, default=None)
    allow_uids: tuple[int, ...] = key(
        v.array(v.integer(0, 2**32 - 2), "an array of user ids"), default=()
    )
    http_listen: str = key(v.listen_address, default="127.0.0.1:9187")
    max_concurrent_jobs: int = key(v.integer(1), default=4)
    timezone: str = key(v.timezone, default="UTC")
    shutdown_grace: float = key(v.duration(), default=300.0)
    log_format: LogFormat = key(v.choice(LOG_FORMATS), default="json")
    log_level: LogLevel = key(v.choice(LOG_LEVELS), default="info")
    node: str = key(v.node_name, default="")  # "" = the host name (node_name)
    ha: HaConfig = key(table(HaConfig), default_factory=HaConfig)


# An entry of a named section ([source.NAME], [storage.NAME], [notify.NAME]) has a
# `name` (the table's) and a `type` (read first, it chooses the class); neither is a key().


@model
class PostgresSource:
    name: str
    dsn: str = key(v.dsn(_SOURCE_DSN_FIX))
    password: Secret | None = key(secret_reference, default=None, secret=True)
    pg_bin_dir: str = key(v.optional_absolute_path, default="")
    max_concurrent: int = key(v.integer(1), default=1)
    type: Literal["postgres"] = "postgres"


Source = PostgresSource

MIN_PART_SIZE = 5 * 1024**2  # S3's smallest part (all but the last)
MAX_PART_SIZE = 5 * 1024**3  # S3's largest part


@model
class S3Storage:
    name: str
    bucket: str = key(v.bucket)
    prefix: str = key(v.s3_prefix, default="")
    endpoint_url: str = key(v.optional_http_url, default="")
    region: str = key(v.nonempty, default="us-east-1")
    access_key_id: Secret | None = key(secret_reference, default=None, secret=True)
    secret_access_key: Secret | None = key(secret_reference, default=None, secret=True)
    # The first parts' size; parts double every 1,000 (storage/s3.py): small by default.
    part_size: int = key(v.size(MIN_PART_SIZE, MAX_PART_SIZE), default=MIN_PART_SIZE)
    upload_concurrency: int = key(v.integer(1, 64), default=4)
    storage_class: str = key(v.string, default="")
    addressing_style: AddressingStyle = key(v.choice(ADDRESSING_STYLES), default="auto")
    # crc32: S3 flexible checksums, as AWS SDKs send them; md5: Content-MD5 only.
    checksum: S3Checksum = key(v.choice(S3_CHECKSUMS), default="crc32")
    # PEM file of the CAs to trust for an https endpoint; empty: AWS_CA_BUNDLE or the system's.
    ca_bundle: str = key(v.optional_absolute_path, default="")
    abandoned_upload_grace: float = key(v.positive_duration, default=86400.0)
    # Each request: seconds to connect, and seconds without progress (sending the
    # body, then waiting for and reading the reply) before the attempt is abandoned.
    connect_timeout: float = key(v.positive_duration, default=10.0)
    read_timeout: float = key(v.positive_duration, default=60.0)
    type: Literal["s3"] = "s3"

    @staticmethod
    def rules(values: Mapping[str, Any], given: Collection[str]) -> Iterator[tuple[str, str]]:
        pair = ("access_key_id", "secret_access_key")
        for name, other in (pair, pair[::-1]):
            if name in given and other not in given:
                yield other, f"required when {name} is set (give both, or neither)"
        if values["ca_bundle"] and values["endpoint_url"].lower().startswith("http://"):
            yield "ca_bundle", "only used with an https endpoint_url"


@model
class FilesystemStorage:
    name: str
    path: str = key(v.absolute_path)
    abandoned_upload_grace: float = key(v.positive_duration, default=86400.0)
    type: Literal["filesystem"] = "filesystem"


Storage = S3Storage | FilesystemStorage


@model(kw_only=True)
class Job:
    name: str
    source: str = key(v.nonempty, ref="source")
    databases: tuple[str, ...] = key(v.databases, default=())  # (): the DSN's; ("*",): all
    globals: bool = key(v.boolean, default=False)
    storage: tuple[str, ...] = key(
        v.array(
            v.nonempty,
            "a storage name or an array of them",
            single=True,
            unique=True,
            at_least_one="expected at least one storage",
        ),
        ref="storage",
    )
    schedule: tuple[str, ...] = key(v.schedule, default=())
    # filled from daemon.timezone when neither the job nor [defaults] sets it
    timezone: str = key(v.timezone, default="UTC")
    jitter: float = key(v.duration(), default=0.0)
    catch_up: bool = key(v.boolean, default=False)
    kind: JobKind = key(v.choice(JOB_KINDS), default="full")
    format: DumpFormat = key(v.choice(DUMP_FORMATS), default="custom")
    tables: tuple[str, ...] = key(v.table_patterns, default=())
    exclude_tables: tuple[str, ...] = key(v.table_patterns, default=())
    exclude_table_data: tuple[str, ...] = key(v.table_patterns, default=())
    encryption: Encryption | None = key(table(Encryption), default=None)
    min_size: int = key(v.size(), default=1024)
    retention: Retention = key(table(Retention), default_factory=Retention)
    verify: VerifyPolicy | None = key(table(VerifyPolicy), default=None)
    notify: tuple[str, ...] = key(v.names, default=(), ref="notifier")
    retry: RetryPolicy = key(table(RetryPolicy), default_factory=RetryPolicy)
    timeout: float = key(v.positive_duration, default=6 * 3600.0)
    compression: Compression = key(compression_spec, default_factory=Compression)
    # physical: "server" makes pg_basebackup (PostgreSQL >= 15) compress on the server
    compression_at: CompressionAt = key(v.choice(COMPRESSION_AT), default="client")
    wal: WalPolicy | None = key(table(WalPolicy), default=None)  # kind = "physical" only

    @staticmethod
    def rules(values: Mapping[str, Any], given: Collection[str]) -> Iterator[tuple[str, str]]:
        physical = values["kind"] == "physical"
        if not physical and "wal" in given:
            yield ("wal", 'only a kind = "physical" job archives WAL')
        for key_name in NOT_PHYSICAL if physical else ():
            if key_name in given:
                yield (
                    key_name,
                    'a kind = "physical" job backs up the whole cluster: remove this key',
                )
        if values["compression_at"] == "server":
            yield from _server_compression_rules(values, physical)
        verify = values["verify"]
        # A logical drill restores into `target`; a physical one brings its own server.
        if verify is not None and verify.restore and verify.target is None and not physical:
            yield (
                "verify.target",
                "required when restore = true (the server where scratch databases are created)",
            )
        if verify is not None and verify.restore and values["encryption"]:
            yield (
                "verify",
                "restore = true cannot work on an encrypted job: the daemon holds no private key"
                " (use restore = false here, and `backupd verify --restore --identity FILE`"
                " by hand)",
            )


def _server_compression_rules(
    values: Mapping[str, Any], physical: bool
) -> Iterator[tuple[str, str]]:
    """`compression_at = "server"`: pg_basebackup's --compress=server-ALG[:LEVEL] takes it."""
    spec: Compression = values["compression"]
    if not physical:
        yield (
            "compression_at",
            'only the base backups of a kind = "physical" job can be compressed by the server',
        )
    elif spec.algorithm == "none":
        yield ("compression_at", 'compression = "none": there is nothing for the server to do')
    elif spec.algorithm == "lz4" and spec.level is not None and not 1 <= spec.level <= 12:
        yield ("compression", f"the server's lz4 levels go from 1 to 12, got {spec.level}")


@model
class Notifier:
    name: str
    type: NotifierType
    url: Secret | str = key(url_or_secret, secret=True)
    on: tuple[str, ...] = key(
        v.array(v.choice(NOTIFY_EVENTS), "an array of events"), default=("failure", "recovered")
    )
    timeout: float = key(v.positive_duration, default=10.0)


_SECTION = "backupd.section"  # (the TOML section, what an entry is called in messages)


@model
class Config:
    daemon: DaemonConfig = field(metadata={_SECTION: ("daemon", "")})
    sources: dict[str, Source] = field(metadata={_SECTION: ("source", "source")})
    storages: dict[str, Storage] = field(metadata={_SECTION: ("storage", "storage")})
    jobs: dict[str, Job] = field(metadata={_SECTION: ("job", "job")})
    notifiers: dict[str, Notifier] = field(metadata={_SECTION: ("notify", "notifier")})
    path: str = ""


def sections() -> list[tuple[str, str, str]]:
    """`(Config attribute, TOML section, what an entry is called)` in file order."""
    return [
        (f.name, *f.metadata[_SECTION])
        for f in dataclasses.fields(Config)
        if _SECTION in f.metadata
    ]


def secret_references(cfg: Config) -> list[tuple[str, Secret]]:
    """Every secret reference with its key path (`source.main.password`), in file order."""
    refs: list[tuple[str, Secret]] = []
    for attr, section, _ in sections():
        value = getattr(cfg, attr)
        entries = value.items() if isinstance(value, dict) else [("", value)]
        for name, entry in entries:
            path = f"{section}.{name}" if name else section
            refs += [(p, ref) for p, ref in secret_values(entry, path) if isinstance(ref, Secret)]
    return refs
