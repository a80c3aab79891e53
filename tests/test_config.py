"""The config file: what operators write, what backupd understands, and what it refuses."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from backupd.config.dsn import dsn_host, dsn_params, redact_dsn
from backupd.config.file import (
    config_path,
    config_to_toml,
    format_duration,
    format_size,
    load_config,
    parse_compression,
    parse_config,
    parse_duration,
    parse_size,
)
from backupd.config.model import (
    DEFAULT_CONFIG_PATH,
    Compression,
    Config,
    DaemonConfig,
    Encryption,
    FilesystemStorage,
    Notifier,
    PostgresSource,
    Retention,
    RetryPolicy,
    S3Storage,
    Secret,
    VerifyPolicy,
)
from backupd.errors import ConfigError, SecretError
from backupd.stream.age import generate_identity

AGE_KEY = "age1a45crpvsw7yxsqzq09g9ljqrfp7splgka4822f57c8s5sjejfsnq34hsjm"

# The SPEC's example, with a real age key and a real port.
SPEC_EXAMPLE = f"""
[daemon]
socket = "/run/backupd/control.sock"
socket_mode = "0660"
socket_group = "backupd"
allow_uids = []
http_listen = "127.0.0.1:9187"
max_concurrent_jobs = 4
timezone = "UTC"
shutdown_grace = "5m"
log_format = "json"
log_level = "info"

[defaults]
retry = {{ max_attempts = 4, initial_delay = "30s", max_delay = "15m", multiplier = 2.0 }}
timeout = "6h"
compression = "zstd:3"

[source.main]
type = "postgres"
dsn = "postgresql://backup@db1:5432/app"
password = {{ file = "/run/credentials/backupd.service/pg-main" }}
pg_bin_dir = ""
max_concurrent = 1

[storage.offsite]
type = "s3"
bucket = "db-backups"
prefix = "prod/"
endpoint_url = ""
region = "us-east-1"
access_key_id = {{ env = "AWS_ACCESS_KEY_ID" }}
secret_access_key = {{ file = "/run/credentials/backupd.service/s3-secret" }}
part_size = "16MiB"
upload_concurrency = 4
storage_class = ""
abandoned_upload_grace = "24h"

[storage.local]
type = "filesystem"
path = "/var/backups/backupd"

[job.app-nightly]
source = "main"
databases = ["app"]
globals = false
storage = ["offsite", "local"]
schedule = ["0 2 * * *"]
timezone = "Europe/Berlin"
jitter = "0s"
catch_up = true
kind = "full"
format = "custom"
tables = []
exclude_tables = []
exclude_table_data = []
encryption = {{ recipients = ["{AGE_KEY}"] }}
min_size = "1KiB"
retention = {{ keep_last = 3, keep_daily = 7, keep_weekly = 4, keep_monthly = 12, \
keep_yearly = 0, max_age = "" }}
verify = {{ schedule = "", restore = false }}
notify = ["ops-webhook"]

[notify.ops-webhook]
type = "webhook"
url = {{ env = "BACKUPD_WEBHOOK_URL" }}
on = ["failure", "recovered"]
"""

MINIMAL = """
[source.main]
type = "postgres"
dsn = "postgresql://backup@db1/app"

[storage.local]
type = "filesystem"
path = "/var/backups/backupd"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "backupd.toml"
    path.write_text(text)
    return path


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text))
    return info.value.errors


# --- durations, sizes, compression -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("15m", 900.0),
        ("6h", 21600.0),
        ("7d", 604800.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s", 93784.0),
        ("0s", 0.0),
        ("1.5h", 5400.0),
        ("0.5s", 0.5),
        ("0.1m", 6.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "90", "1x", "30m1h", "1h1h", "-5s", "1 h", "s", "1e3s", "5 m", "1H", "36501d"]
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (90.0, "1m30s"),
        (5400.0, "1h30m"),
        (86400.0, "1d"),
        (93784.0, "1d2h3m4s"),
        (0.5, "0.5s"),
        (90.3, "1m30.3s"),
        (-5.0, "-5s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16MiB", 16 * 1024**2),
        ("1GiB", 1024**3),
        ("1KiB", 1024),
        ("512", 512),
        ("512B", 512),
        ("10MB", 10_000_000),
        ("1 MiB", 1024**2),
        ("5mib", 5 * 1024**2),
        ("2TiB", 2 * 1024**4),
        ("0", 0),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1.5GiB", "16MiBs", "-1", "MiB", "1PB", "16  MiB", "1e6"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (16 * 1024**2, "16MiB"),
        (1024, "1KiB"),
        (512, "512"),
        (10_000_000, "10MB"),
        (1000, "1KB"),
        (1025, "1025"),
        (0, "0"),
        (5 * 1024**3, "5GiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "algorithm", "level"),
    [
        ("none", "none", None),
        ("gzip", "gzip", None),
        ("gzip:1", "gzip", 1),
        ("gzip:9", "gzip", 9),
        ("zstd", "zstd", None),
        ("zstd:1", "zstd", 1),
        ("zstd:19", "zstd", 19),
        ("lz4", "lz4", None),
        ("lz4:0", "lz4", 0),
        ("lz4:16", "lz4", 16),
    ],
)
def test_parse_compression(text: str, algorithm: str, level: int | None) -> None:
    compression = parse_compression(text)
    assert (compression.algorithm, compression.level) == (algorithm, level)
    assert compression.spec == text


@pytest.mark.parametrize(
    "text",
    ["zstd:0", "zstd:20", "gzip:0", "gzip:10", "none:1", "lz4:17", "brotli", "ZSTD", "zstd:", ""],
)
def test_parse_compression_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_compression(text)


# --- a whole config ------------------------------------------------------------------------


def test_spec_example_loads(tmp_path: Path) -> None:
    path = write(tmp_path, SPEC_EXAMPLE)
    cfg = load_config(path)

    assert cfg.path == str(path)
    d = cfg.daemon
    assert (d.socket, d.socket_mode, d.socket_group) == (
        "/run/backupd/control.sock",
        0o660,
        "backupd",
    )
    assert (d.http_listen, d.max_concurrent_jobs, d.shutdown_grace) == ("127.0.0.1:9187", 4, 300.0)
    assert (d.log_format, d.log_level, d.timezone) == ("json", "info", "UTC")

    assert cfg.sources == {
        "main": PostgresSource(
            name="main",
            dsn="postgresql://backup@db1:5432/app",
            password=Secret(file="/run/credentials/backupd.service/pg-main"),
        )
    }
    assert cfg.storages["offsite"] == S3Storage(
        name="offsite",
        bucket="db-backups",
        prefix="prod/",
        region="us-east-1",
        access_key_id=Secret(env="AWS_ACCESS_KEY_ID"),
        secret_access_key=Secret(file="/run/credentials/backupd.service/s3-secret"),
        part_size=16 * 1024 * 1024,
        upload_concurrency=4,
        abandoned_upload_grace=86400.0,
    )
    assert cfg.storages["local"] == FilesystemStorage(name="local", path="/var/backups/backupd")

    job = cfg.jobs["app-nightly"]
    assert (job.source, job.databases, job.storage) == ("main", ("app",), ("offsite", "local"))
    assert (job.schedule, job.timezone, job.jitter, job.catch_up) == (
        ("0 2 * * *",),
        "Europe/Berlin",
        0.0,
        True,
    )
    assert (job.kind, job.format, job.globals, job.min_size) == ("full", "custom", False, 1024)
    assert job.encryption == Encryption(recipients=(AGE_KEY,))
    assert job.retention == Retention(keep_last=3, keep_daily=7, keep_weekly=4, keep_monthly=12)
    assert job.verify == VerifyPolicy()
    assert job.notify == ("ops-webhook",)
    assert job.retry == RetryPolicy(4, 30.0, 900.0, 2.0)
    assert (job.timeout, job.compression) == (6 * 3600.0, Compression("zstd", 3))

    assert cfg.notifiers == {
        "ops-webhook": Notifier(
            name="ops-webhook",
            type="webhook",
            url=Secret(env="BACKUPD_WEBHOOK_URL"),
            on=("failure", "recovered"),
        )
    }


def test_minimal_config_gets_the_documented_defaults() -> None:
    cfg = parse_config(
        tomllib.loads(MINIMAL + '[job.app]\nsource = "main"\nstorage = "local"\n'), "x.toml"
    )
    job = cfg.jobs["app"]
    assert job.storage == ("local",)
    assert (job.schedule, job.databases, job.timezone) == ((), (), "UTC")
    assert (job.compression, job.retry, job.retention) == (
        Compression(),
        RetryPolicy(),
        Retention(),
    )
    assert cfg.daemon.socket == "/run/backupd/control.sock"
    assert cfg.path == "x.toml"


def test_every_error_is_reported_at_once_with_its_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + """
[job.x]
source = "main"
storage = ["nope"]
schedule = ["61 * * * *"]
timeout = "6 hours"
bogus = 1
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    errors = info.value.errors
    assert len(errors) == 4, errors
    assert errors[0].startswith('job.x.schedule: invalid cron expression "61 * * * *": ')
    assert errors[1] == (
        'job.x.timeout: expected a duration like "90s", "15m", "6h", "7d" or "1h30m", got "6 hours"'
    )
    assert errors[2] == 'job.x.storage: unknown storage "nope"'
    assert errors[3] == "job.x.bogus: unknown key"
    assert str(info.value) == "\n".join(errors)


def test_retention_error_message_matches_the_spec() -> None:
    errors = errors_of(
        MINIMAL
        + '[job.app-nightly]\nsource = "main"\nstorage = "local"\n'
        + 'retention = { keep_daily = "seven" }\n'
    )
    assert errors == ['job.app-nightly.retention.keep_daily: expected an integer >= 0, got "seven"']


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "max_concurrent_jobs = true",
            "daemon.max_concurrent_jobs: expected an integer >= 1, got true",
        ),
        ("max_concurrent_jobs = 0", "daemon.max_concurrent_jobs: expected an integer >= 1, got 0"),
        (
            "max_concurrent_jobs = 2.0",
            "daemon.max_concurrent_jobs: expected an integer >= 1, got 2.0",
        ),
        (
            'socket_mode = "999"',
            'daemon.socket_mode: expected an octal mode string like "0660", got "999"',
        ),
        (
            "socket_mode = 0o660",
            'daemon.socket_mode: expected an octal mode string like "0660", got 432',
        ),
        ('timezone = "Mars/Olympus"', 'daemon.timezone: unknown time zone "Mars/Olympus"'),
        (
            'log_level = "loud"',
            'daemon.log_level: expected one of "debug", "info", "warning", "error"',
        ),
        ('http_listen = "9187"', 'daemon.http_listen: expected "HOST:PORT"'),
        ('socket = "control.sock"', 'daemon.socket: expected an absolute path, got "control.sock"'),
        ("shutdown_grace = 300", 'daemon.shutdown_grace: expected a duration string like "90s"'),
        ('tiemzone = "UTC"', 'daemon.tiemzone: unknown key (did you mean "timezone"?)'),
    ],
)
def test_daemon_values_are_checked(snippet: str, expected: str) -> None:
    errors = errors_of(f"[daemon]\n{snippet}\n")
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_daemon_socket_mode_and_disabled_http() -> None:
    cfg = parse_config(tomllib.loads('[daemon]\nsocket_mode = "0600"\nhttp_listen = ""\n'))
    assert (cfg.daemon.socket_mode, cfg.daemon.http_listen) == (0o600, "")


# source and storage come from [defaults], so a test's own values override them.
JOB = MINIMAL + '[defaults]\nsource = "main"\nstorage = "local"\n[job.app]\n'


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("storage = []", "job.app.storage: expected at least one storage"),
        ('storage = ["local", "local"]', 'job.app.storage: "local" is listed more than once'),
        ('source = "other"', 'job.app.source: unknown source "other"'),
        ('notify = ["pager"]', 'job.app.notify: unknown notifier "pager"'),
        ('databases = ["*", "app"]', 'job.app.databases: "*" (every database) cannot be combined'),
        (
            'kind = "incremental"',
            'job.app.kind: expected one of "full", "schema-only", "data-only"',
        ),
        ('format = "tar"', 'job.app.format: expected one of "custom", "plain"'),
        (
            'compression = "zstd:22"',
            'job.app.compression: zstd levels go from 1 to 19, got "zstd:22"',
        ),
        ('min_size = "1 kilobyte"', 'job.app.min_size: expected a size like "16MiB"'),
        ('timeout = "0s"', 'job.app.timeout: expected a duration > 0, got "0s"'),
        ('jitter = "-1s"', "job.app.jitter: expected a duration like"),
        ('schedule = "@daily"', 'job.app.schedule: invalid cron expression "@daily"'),
        (
            'schedule = ["0 2 * * *", 5]',
            "job.app.schedule: expected a cron expression string, got 5",
        ),
        (
            'encryption = { recipients = ["ssh-ed25519 AAAA"] }',
            "job.app.encryption.recipients: expected an age public key",
        ),
        (
            'encryption = { recipients = ["age1nottherightlength"] }',
            "job.app.encryption.recipients: not a valid age public key",
        ),
        (
            "encryption = { recipients = [] }",
            "job.app.encryption.recipients: expected at least one age public key",
        ),
        ("encryption = {}", "job.app.encryption.recipients: missing required key"),
        ('retention = { max_age = "0s" }', "job.app.retention.max_age: expected a duration > 0"),
        (
            "retry = { max_attempts = 0 }",
            "job.app.retry.max_attempts: expected an integer >= 1, got 0",
        ),
        (
            "retry = { multiplier = 0.5 }",
            "job.app.retry.multiplier: expected a number >= 1.0, got 0.5",
        ),
        (
            'retry = { initial_delay = "1h", max_delay = "1m" }',
            "job.app.retry.max_delay: must be at least initial_delay (1h)",
        ),
        ("verify = { restore = true }", "job.app.verify.target: required when restore = true"),
        (
            'verify = { schedule = ["0 3 * * 0", "x"] }',
            'job.app.verify.schedule: invalid cron expression "x"',
        ),
        ("globals = 1", "job.app.globals: expected true or false, got 1"),
        ('tables = [""]', "job.app.tables: expected a non-empty string"),
    ],
)
def test_job_values_are_checked(snippet: str, expected: str) -> None:
    errors = errors_of(JOB + snippet + "\n")
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_job_schedule_forms_and_verify_policy() -> None:
    cfg = parse_config(
        tomllib.loads(
            JOB
            + 'schedule = "*/10 * * * * *"\ndatabases = ["*"]\n'
            + 'verify = { schedule = ["0 3 * * 0"], restore = true, '
            + 'target = "host=/tmp dbname=postgres" }\n'
        )
    )
    job = cfg.jobs["app"]
    assert job.schedule == ("*/10 * * * * *",)
    assert job.databases == ("*",)
    assert job.verify == VerifyPolicy(("0 3 * * 0",), True, "host=/tmp dbname=postgres")


def test_missing_required_keys_and_types() -> None:
    errors = errors_of(
        """
[source.a]
dsn = "host=x"
[storage.b]
type = "s3"
[storage.c]
type = "gcs"
bucket = "x"
[job.j]
kind = "full"
[notify.n]
type = "webhook"
[bogus]
"""
    )
    assert errors == [
        'source.a.type: missing required key (one of "postgres")',
        "storage.b.bucket: missing required key",
        'storage.c.type: expected one of "s3", "filesystem", got "gcs"',
        "job.j.source: missing required key",
        "job.j.storage: missing required key",
        "notify.n.url: missing required key",
        "bogus: unknown key",
    ]


def test_sections_and_names_must_be_tables_and_sane() -> None:
    errors = errors_of(
        'job = 5\n[storage."a/b"]\ntype = "filesystem"\npath = "/x"\n[source]\nx = 1\n'
    )
    assert errors == [
        "source.x: expected a table, got 1",
        "storage.\"a/b\": invalid name: use at most 64 letters, digits, '.', '_' and '-', "
        "starting with a letter or digit",
        "job: expected a table, got 5",
    ]


def test_storage_details() -> None:
    cfg = parse_config(
        tomllib.loads(
            """
[storage.s3]
type = "s3"
bucket = "b"
prefix = "prod"
endpoint_url = "http://127.0.0.1:9000"
addressing_style = "path"
part_size = 8388608
"""
        )
    )
    storage = cfg.storages["s3"]
    assert isinstance(storage, S3Storage)
    assert (storage.prefix, storage.endpoint_url, storage.part_size, storage.checksum) == (
        "prod/",
        "http://127.0.0.1:9000",
        8 * 1024**2,
        "crc32",
    )
    errors = errors_of(
        """
[storage.s3]
type = "s3"
bucket = "b"
part_size = "4MiB"
checksum = "sha1"
upload_concurrency = 65
access_key_id = { env = "KEY" }
[storage.fs]
type = "filesystem"
path = "relative/dir"
bucket = "b"
"""
    )
    assert errors == [
        'storage.s3.part_size: expected a size between 5MiB and 5GiB, got "4MiB"',
        "storage.s3.upload_concurrency: expected an integer between 1 and 64, got 65",
        'storage.s3.checksum: expected one of "crc32", "md5", got "sha1"',
        "storage.s3.secret_access_key: required when access_key_id is set (give both, or neither)",
        'storage.fs.path: expected an absolute path, got "relative/dir"',
        "storage.fs.bucket: unknown key",
    ]


# --- [defaults] ----------------------------------------------------------------------------


def test_defaults_apply_to_every_job_and_a_jobs_own_value_wins() -> None:
    cfg = parse_config(
        tomllib.loads(
            MINIMAL
            + """
[daemon]
timezone = "America/New_York"
[defaults]
source = "main"
storage = ["local"]
compression = "gzip:6"
retry = { max_attempts = 2 }
timeout = "2h"
[job.a]
[job.b]
compression = "none"
timezone = "Asia/Tokyo"
[job.c]
storage = "local"
"""
        )
    )
    a, b = cfg.jobs["a"], cfg.jobs["b"]
    assert (a.source, a.storage, a.compression.spec, a.timeout) == (
        "main",
        ("local",),
        "gzip:6",
        7200.0,
    )
    assert a.retry == RetryPolicy(max_attempts=2)
    assert a.timezone == "America/New_York"
    assert (b.compression.spec, b.timeout, b.timezone) == ("none", 7200.0, "Asia/Tokyo")
    assert cfg.jobs["c"].storage == ("local",)


def test_defaults_timezone_beats_the_daemons() -> None:
    text = MINIMAL + '[daemon]\ntimezone = "Asia/Tokyo"\n[defaults]\ntimezone = "Europe/Paris"\n'
    text += '[job.app]\nsource = "main"\nstorage = "local"\n'
    assert parse_config(tomllib.loads(text)).jobs["app"].timezone == "Europe/Paris"


def test_a_bad_default_is_reported_once_at_its_defaults_path() -> None:
    errors = errors_of(
        MINIMAL
        + """
[defaults]
timeout = "forever"
storage = ["missing"]
name = "x"
[job.a]
source = "main"
[job.b]
source = "main"
"""
    )
    assert errors == [
        'defaults.timeout: expected a duration like "90s", "15m", "6h", "7d" or "1h30m", '
        'got "forever"',
        'defaults.storage: unknown storage "missing"',
        "defaults.name: unknown key",
    ]


# --- secrets -------------------------------------------------------------------------------


def source_with(password: str) -> str:
    return f'[source.main]\ntype = "postgres"\ndsn = "host=db1"\npassword = {password}\n'


def test_secret_forms() -> None:
    for form, secret in [
        ('{ file = "/run/credentials/pg" }', Secret(file="/run/credentials/pg")),
        ('{ file = "pg-main" }', Secret(file="pg-main")),
        ('{ env = "PG_PASSWORD" }', Secret(env="PG_PASSWORD")),
    ]:
        cfg = parse_config(tomllib.loads(source_with(form)))
        assert cfg.sources["main"].password == secret


def test_a_plain_string_secret_is_refused_without_repeating_it() -> None:
    errors = errors_of(source_with('"hunter2"'))
    assert len(errors) == 1
    message = errors[0]
    assert message.startswith("source.main.password: secrets are not written in the config file")
    assert '{ file = "PATH" }' in message and '{ env = "NAME" }' in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ('{ file = "/a", env = "B" }', "expected exactly one key, file or env"),
        ('{ path = "/a" }', "expected exactly one key, file or env"),
        ('{ file = "" }', "file: expected a non-empty string"),
        ('{ env = "NOT-A-NAME" }', 'env: not a valid environment variable name: "NOT-A-NAME"'),
        ("12345", "expected { file"),
    ],
)
def test_malformed_secret_references(form: str, expected: str) -> None:
    errors = errors_of(source_with(form))
    assert len(errors) == 1 and errors[0].startswith(f"source.main.password: {expected}"), errors
    assert "12345" not in errors[0]


def test_s3_keys_must_be_references_but_a_notify_url_may_be_plain() -> None:
    errors = errors_of(
        '[storage.s3]\ntype = "s3"\nbucket = "b"\n'
        'access_key_id = "AKIAEXAMPLE"\nsecret_access_key = "wJalrXUtnFEMI"\n'
    )
    assert [e.split(":")[0] for e in errors] == [
        "storage.s3.access_key_id",
        "storage.s3.secret_access_key",
    ]
    assert "AKIAEXAMPLE" not in str(errors) and "wJalrXUtnFEMI" not in str(errors)

    cfg = parse_config(
        tomllib.loads(
            '[notify.hc]\ntype = "healthchecks"\nurl = "https://hc-ping.com/abc"\n'
            'on = ["start", "success", "failure"]\n'
        )
    )
    assert cfg.notifiers["hc"].url == "https://hc-ping.com/abc"
    errors = errors_of('[notify.n]\ntype = "slack"\nurl = "ftp://hooks.example/T0KEN"\n')
    assert errors == ["notify.n.url: expected an http:// or https:// URL"]
    errors = errors_of('[notify.n]\ntype = "slack"\nurl = "https://x.example"\non = ["boom"]\n')
    assert errors[0].startswith(
        'notify.n.on: expected one of "start", "success", "failure", "recovered", "retry"'
    )


def test_secret_resolve_reads_a_private_file_and_refuses_a_readable_one(tmp_path: Path) -> None:
    path = tmp_path / "pg-main"
    path.write_text("s3cret\n")
    path.chmod(0o600)
    assert Secret(file=str(path)).resolve() == "s3cret"
    path.chmod(0o644)
    with pytest.raises(SecretError, match=r"accessible by group or others \(mode 0644\)") as info:
        Secret(file=str(path)).resolve()
    assert "s3cret" not in str(info.value)


def test_secret_resolve_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKUPD_TEST_SECRET", "from-env")
    assert Secret(env="BACKUPD_TEST_SECRET").resolve() == "from-env"
    monkeypatch.delenv("BACKUPD_TEST_SECRET")
    with pytest.raises(SecretError, match="BACKUPD_TEST_SECRET is not set"):
        Secret(env="BACKUPD_TEST_SECRET").resolve()


# --- DSNs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://backup:Tr0ub4dor@db1:5432/app",
        "postgres://backup:Tr0ub4dor@db1/app",
        "postgresql://backup@db1/app?password=Tr0ub4dor",
        "host=db1 user=backup password=Tr0ub4dor dbname=app",
        "host=db1 password = 'Tr0ub4dor' dbname=app",
    ],
)
def test_a_dsn_with_a_password_is_refused_without_leaking_it(dsn: str) -> None:
    errors = errors_of(f'[source.main]\ntype = "postgres"\ndsn = "{dsn}"\n')
    assert len(errors) == 1
    assert errors[0].startswith("source.main.dsn: the DSN contains a password")
    assert 'password = { file = "..." }' in errors[0]
    assert "Tr0ub4dor" not in errors[0]


@pytest.mark.parametrize(
    "dsn",
    [
        "mysql://db1/app",
        "host=db1 dbname",
        "host='db1",
        "postgresql://db1:notaport/app",
        "postgresql://[::1/app",
        "",
    ],
)
def test_malformed_dsns_are_refused_without_being_quoted(dsn: str) -> None:
    errors = errors_of(f'[source.main]\ntype = "postgres"\ndsn = "{dsn}"\n')
    assert len(errors) == 1 and errors[0].startswith("source.main.dsn: "), errors
    if dsn:
        assert dsn not in errors[0]


@pytest.mark.parametrize(
    ("dsn", "redacted"),
    [
        ("postgresql://backup:pw@db1:5432/app", "postgresql://backup@db1:5432/app"),
        ("postgresql://:pw@db1/app", "postgresql://db1/app"),
        ("postgresql://u:p/w@d@db1/app?sslmode=require", "postgresql://u@db1/app?sslmode=require"),
        (
            "postgresql://db1/app?password=pw&sslmode=require",
            "postgresql://db1/app?sslmode=require",
        ),
        ("postgresql://db1/app", "postgresql://db1/app"),
        ("host=db1 password='p w' dbname=app", "host=db1 dbname=app"),
        ("host=db1 sslpassword=pw", "host=db1"),
        ("host=db1 password='unterminated", "host=db1 ..."),
    ],
)
def test_redact_dsn(dsn: str, redacted: str) -> None:
    assert redact_dsn(dsn) == redacted


@pytest.mark.parametrize(
    ("dsn", "database", "host"),
    [
        ("postgresql://backup@db1:5432/app", "app", "db1"),
        ("postgresql://h1:5432,h2:5433/app%20x", "app x", "h1,h2"),
        ("postgresql://[2001:db8::1]/d", "d", "2001:db8::1"),
        ("postgresql:///app?host=/var/run/postgresql", "app", "/var/run/postgresql"),
        ("postgresql://%2Ftmp/app", "app", "/tmp"),
        ("postgresql://db1", None, "db1"),
        ("host=/tmp port=5433 dbname='my db'", "my db", "/tmp"),
        ("hostaddr=10.0.0.1", None, "10.0.0.1"),
        ("dbname=app", "app", ""),
    ],
)
def test_dsn_database_and_host(dsn: str, database: str | None, host: str) -> None:
    assert (dsn_params(dsn).get("dbname") or None) == database
    assert dsn_host(dsn) == host


# --- check --show ----------------------------------------------------------------------------


def test_show_round_trips_and_prints_references_not_secrets(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SPEC_EXAMPLE))
    shown = config_to_toml(cfg)

    again = load_config(write(tmp_path, shown))  # same path, so the whole Config compares
    assert again == cfg
    doc = tomllib.loads(shown)
    assert "defaults" not in doc
    assert doc["daemon"]["socket_mode"] == "0660"
    assert doc["daemon"]["shutdown_grace"] == "5m"
    assert doc["storage"]["offsite"]["part_size"] == "16MiB"
    assert doc["storage"]["offsite"]["abandoned_upload_grace"] == "1d"
    assert doc["storage"]["offsite"]["secret_access_key"] == {
        "file": "/run/credentials/backupd.service/s3-secret"
    }
    job = doc["job"]["app-nightly"]
    assert (job["compression"], job["timeout"], job["min_size"]) == ("zstd:3", "6h", "1KiB")
    assert job["retry"]["initial_delay"] == "30s"
    assert "max_age" not in job["retention"]
    assert "target" not in job["verify"]


def test_show_inlines_defaults_and_round_trips_optional_values() -> None:
    cfg = parse_config(
        tomllib.loads(
            MINIMAL
            + """
[daemon]
allow_uids = [1000, 1001]
[defaults]
retention = { keep_daily = 7, max_age = "90d" }
jitter = "1.5s"
[job.a]
source = "main"
storage = "local"
verify = { schedule = "0 3 * * 0", restore = true, target = "postgresql://verify@scratch/postgres" }
[notify.n]
type = "webhook"
url = "https://example.com/hook"
timeout = "30s"
"""
        ),
        "same.toml",
    )
    shown = config_to_toml(cfg)
    assert "[defaults]" not in shown
    doc = tomllib.loads(shown)
    assert doc["job"]["a"]["retention"]["max_age"] == "90d"
    assert doc["job"]["a"]["jitter"] == "1.5s"
    assert "socket_group" not in doc["daemon"]
    assert parse_config(doc, "same.toml") == cfg


# --- the file ------------------------------------------------------------------------------


def test_load_config_names_the_file_and_line_of_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon]\nlog_level = "info"\nlog_format = json\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}:3:14: invalid TOML: Invalid value"]


def test_load_config_reports_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"{missing}: cannot read the config file: No such file"):
        load_config(missing)
    with pytest.raises(ConfigError, match="Is a directory"):
        load_config(tmp_path)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'[daemon]\nlog_level = "\xff"\n')
    with pytest.raises(ConfigError, match=f"{binary}:2: invalid TOML: the file is not UTF-8"):
        load_config(binary)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKUPD_CONFIG", raising=False)
    assert config_path(None) == DEFAULT_CONFIG_PATH
    monkeypatch.setenv("BACKUPD_CONFIG", "/srv/env.toml")
    assert config_path(None) == "/srv/env.toml"
    assert config_path("/srv/cli.toml") == "/srv/cli.toml"
    monkeypatch.setenv("BACKUPD_CONFIG", "")
    assert config_path(None) == DEFAULT_CONFIG_PATH


def test_an_empty_file_is_a_valid_config_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_config(path) == Config(
        daemon=DaemonConfig(), sources={}, storages={}, jobs={}, notifiers={}, path=str(path)
    )


def test_restore_drill_refused_on_an_encrypted_job() -> None:
    recipient = generate_identity()[1]
    data = {
        "source": {"main": {"type": "postgres", "dsn": "postgresql://u@h/db"}},
        "storage": {"local": {"type": "filesystem", "path": "/srv/b"}},
        "job": {
            "app": {
                "source": "main",
                "storage": ["local"],
                "encryption": {"recipients": [recipient]},
                "verify": {
                    "schedule": "0 5 * * 0",
                    "restore": True,
                    "target": "postgresql://u@h/postgres",
                },
            }
        },
    }
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert len(err.value.errors) == 1
    assert err.value.errors[0].startswith("job.app.verify: restore = true cannot work")
