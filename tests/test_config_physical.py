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
