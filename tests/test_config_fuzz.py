"""Whatever an operator writes, the loader answers with a Config or a ConfigError, never a crash.

And whatever it accepts, `check --show` prints in a form that loads back to the same Config.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.config.file import (
    MAX_DURATION,
    config_to_toml,
    format_duration,
    format_size,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from backupd.config.model import Config
from backupd.errors import ConfigError
from tests.test_config import AGE_KEY, SPEC_EXAMPLE

FUZZ = settings(max_examples=300, deadline=None, database=None)

KEYS = [
    # sections and names
    *("daemon", "defaults", "source", "storage", "job", "notify", "main", "local", "offsite"),
    # daemon
    *("socket", "socket_mode", "socket_group", "allow_uids", "http_listen", "max_concurrent_jobs"),
    *("timezone", "shutdown_grace", "log_format", "log_level"),
    # sources and storages
    *("type", "dsn", "password", "pg_bin_dir", "max_concurrent", "bucket", "prefix", "path"),
    *("endpoint_url", "region", "access_key_id", "secret_access_key", "part_size"),
    *("upload_concurrency", "storage_class", "addressing_style", "abandoned_upload_grace"),
    # jobs and their tables
    *("databases", "globals", "schedule", "jitter", "catch_up", "kind", "format", "tables"),
    *("exclude_tables", "exclude_table_data", "encryption", "recipients", "min_size"),
    *("retention", "keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"),
    *("max_age", "verify", "restore", "target", "notify", "retry", "max_attempts"),
    *("initial_delay", "max_delay", "multiplier", "timeout", "compression"),
    # notifiers and secrets
    *("url", "on", "file", "env"),
]

WORDS = [
    *("", "postgres", "s3", "filesystem", "webhook", "slack", "healthchecks", "main", "local"),
    *("offsite", "*", "app", "failure", "recovered", "start", "retry", "full", "plain", "custom"),
    *("schema-only", "auto", "path", "json", "console", "debug", "UTC", "Europe/Berlin", "Mars/X"),
    *("0 2 * * *", "*/10 * * * * *", "61 * * * *", "@daily", "0s", "30s", "1h30m", "7d", "-1s"),
    *("0.5s", "99999999d", "16MiB", "4MiB", "1KiB", "512", "10MB", "1.5GiB", "zstd:3", "gzip"),
    *("lz4:16", "zstd:22", "none:1", "0660", "0999", "127.0.0.1:9187", "[::1]:0", "::1:80"),
    *("/var/backups", "relative/dir", "/run/backupd/control.sock", "prod", "/prod"),
    *("postgresql://backup@db1:5432/app", "postgresql://u:Tr0ub4dor@db1/app", "host=/tmp"),
    *("host=db1 password=Tr0ub4dor", "host='db1", "postgresql://[::1/x", "postgresql://h:0/x"),
    *("https://example.com/hook", "ftp://example.com", "http://127.0.0.1:9000", "AWS_KEY"),
    AGE_KEY,
    "age1nope",
]

scalars = st.one_of(
    st.sampled_from(WORDS),
    st.text(max_size=12),
    st.integers(min_value=-2, max_value=70),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.datetimes(),
    st.dates(),
    st.times(),
)
keys = st.sampled_from(KEYS) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=10,
)
documents = st.dictionaries(keys, values, max_size=4)

# Mostly values some key accepts, so that mutations often still load and get round-tripped.
plausible_values = st.one_of(
    st.sampled_from(WORDS), st.lists(st.sampled_from(WORDS), max_size=3), values
)

EXAMPLE = tomllib.loads(SPEC_EXAMPLE)


@st.composite
def mutated_example(draw: st.DrawFn) -> dict[str, Any]:
    """The SPEC's valid example with a few values replaced, removed or added, at any depth."""
    doc = tomllib.loads(SPEC_EXAMPLE)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        table = doc
        while True:
            key = draw(st.sampled_from(sorted(table)) | keys) if table else draw(keys)
            child = table.get(key)
            if isinstance(child, dict) and child and draw(st.booleans()):
                table = child
                continue
            action = draw(st.sampled_from(["replace", "replace", "delete"]))
            if action == "delete":
                table.pop(key, None)
            else:
                table[key] = draw(plausible_values)
            break
    return doc


def loads_or_refuses(parse: Callable[[], Config]) -> None:
    """The property: a Config that survives --show, or a ConfigError of "path: message" lines."""
    try:
        cfg = parse()
    except ConfigError as exc:
        assert exc.errors
        assert all(isinstance(e, str) and e.strip() for e in exc.errors)
        return
    assert parse_config(tomllib.loads(config_to_toml(cfg)), cfg.path) == cfg


@FUZZ
@given(documents)
def test_parse_config_on_random_documents(doc: dict[str, Any]) -> None:
    loads_or_refuses(lambda: parse_config(doc, "fuzz.toml"))


@FUZZ
@given(mutated_example())
def test_parse_config_on_mutations_of_a_valid_config(doc: dict[str, Any]) -> None:
    loads_or_refuses(lambda: parse_config(doc, "fuzz.toml"))


def test_the_unmutated_example_is_valid() -> None:
    """Guards the mutation test: its starting point must load."""
    assert parse_config(EXAMPLE).jobs


toml_lines = st.lists(
    st.sampled_from(
        [
            "[daemon]",
            "[job.a]",
            "[source.main]",
            "[[job]]",
            'type = "postgres"',
            'dsn = "host=/tmp"',
            "x = 1",
            "x = ",
            'timeout = "6h"',
            "retry = { max_attempts = 2 }",
            "a.b.c = true",
            '"quoted key" = 1979-05-27T07:32:00Z',
            "schedule = [",
            "]",
            "# comment",
            "",
        ]
    )
    | st.text(max_size=20),
    max_size=8,
).map("\n".join)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(st.one_of(toml_lines.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary()))
def test_load_config_on_random_files(fuzz_dir: Path, content: bytes) -> None:
    path = fuzz_dir / "backupd.toml"
    path.write_bytes(content)
    loads_or_refuses(lambda: load_config(path))


spelled_durations = st.builds(
    "{}d{}h{}m{}.{:09d}s".format,
    st.integers(0, 36499),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
    st.integers(0, 999_999_999),
)


@FUZZ
@given(spelled_durations)
def test_durations_from_a_config_read_back_exactly(text: str) -> None:
    seconds = parse_duration(text)
    assert parse_duration(format_duration(seconds)) == seconds


@FUZZ
@given(st.floats(min_value=0, max_value=MAX_DURATION))
def test_any_duration_reads_back_to_the_nanosecond(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


@FUZZ
@given(st.integers(min_value=0, max_value=2**62))
def test_sizes_read_back_exactly(size: int) -> None:
    assert parse_size(format_size(size)) == size
