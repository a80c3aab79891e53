"""`kind = "physical"` and its `wal` table in the config (issue 16)."""

from __future__ import annotations

import tomllib

import pytest

from backupd.config.file import config_to_toml, parse_config
from backupd.config.model import WalPolicy
from tests.test_config import MINIMAL, errors_of

JOB = """
[job.pitr]
source = "main"
storage = "local"
kind = "physical"
"""


def test_a_physical_job_gets_the_default_wal_policy_and_prints_back() -> None:
    config = parse_config(tomllib.loads(MINIMAL + JOB))
    assert config.jobs["pitr"].wal == WalPolicy()
    again = parse_config(tomllib.loads(config_to_toml(config)))
    assert again.jobs == config.jobs


def test_the_wal_table() -> None:
    text = MINIMAL + JOB + 'wal = { slot = "backupd_x", max_lag = "90s", spool = "/srv/spool" }\n'
    wal = parse_config(tomllib.loads(text)).jobs["pitr"].wal
    assert wal == WalPolicy(slot="backupd_x", max_lag=90.0, spool="/srv/spool")


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ('databases = ["app"]', 'job.pitr.databases: a kind = "physical" job backs up the whole'),
        ("globals = true", 'job.pitr.globals: a kind = "physical" job backs up the whole'),
        ('wal = { slot = "Bad-Name" }', "job.pitr.wal.slot: a replication slot name is 1-63"),
        ('wal = { spool = "relative/dir" }', "job.pitr.wal.spool:"),
        ('wal = { max_lag = "0s" }', "job.pitr.wal.max_lag:"),
        ("wal = { unknown = 1 }", "job.pitr.wal.unknown:"),
    ],
)
def test_what_a_physical_job_refuses(extra: str, error: str) -> None:
    errors = errors_of(MINIMAL + JOB + extra + "\n")
    assert any(e.startswith(error) for e in errors), errors


def test_wal_on_a_logical_job_is_an_error() -> None:
    text = MINIMAL + JOB.replace('kind = "physical"', 'kind = "full"') + 'wal = { slot = "s" }\n'
    assert any(e.startswith("job.pitr.wal: only a kind") for e in errors_of(text))


def test_a_physical_drill_needs_no_target_but_a_logical_one_does() -> None:
    drill = 'verify = { schedule = "0 6 * * 0", restore = true }\n'
    config = parse_config(tomllib.loads(MINIMAL + JOB + drill))
    assert config.jobs["pitr"].verify is not None and config.jobs["pitr"].verify.restore
    logical = MINIMAL + JOB.replace('kind = "physical"', 'kind = "full"') + drill
    assert any("verify.target: required when restore = true" in e for e in errors_of(logical))


def test_compression_at_server_is_for_physical_jobs_with_a_codec() -> None:
    text = MINIMAL + JOB + 'compression = "lz4:9"\ncompression_at = "server"\n'
    job = parse_config(tomllib.loads(text)).jobs["pitr"]
    assert job.compression_at == "server"
    assert (
        parse_config(tomllib.loads(config_to_toml(parse_config(tomllib.loads(text))))).jobs["pitr"]
        == job
    )
    logical = MINIMAL + JOB.replace('kind = "physical"', 'kind = "full"')
    assert any(
        e.startswith("job.pitr.compression_at: only the base backups")
        for e in errors_of(logical + 'compression_at = "server"\n')
    )
    assert any(
        e.startswith('job.pitr.compression_at: compression = "none"')
        for e in errors_of(MINIMAL + JOB + 'compression = "none"\ncompression_at = "server"\n')
    )
    assert any(
        e.startswith("job.pitr.compression: the server's lz4 levels go from 1 to 12")
        for e in errors_of(MINIMAL + JOB + 'compression = "lz4:16"\ncompression_at = "server"\n')
    )
    assert any(
        e.startswith("job.pitr.compression_at:")
        for e in errors_of(MINIMAL + JOB + 'compression_at = "both"\n')
    )


@pytest.mark.parametrize(
    ("algorithm", "version", "values", "reason"),
    [
        ("zstd", 150004, ["pglz", "lz4", "zstd", "on", "off"], None),
        ("gzip", 150004, ["pglz", "on", "off"], None),
        ("zstd", 150004, ["pglz", "lz4", "on", "off"], "the server was built without zstd"),
        ("lz4", 160001, ["pglz", "on", "off"], "the server was built without lz4"),
        ("zstd", 140011, None, "PostgreSQL 14 cannot (server-side compression needs 15)"),
    ],
)
def test_whether_the_server_can_compress(
    algorithm: str, version: int, values: list[str] | None, reason: str | None
) -> None:
    from backupd.operations.servercompress import reason_for

    assert reason_for(algorithm, version, values) == reason
