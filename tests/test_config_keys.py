"""A config key is declared once: the loader, its errors, `--show` and the secret walk follow.

The model here is a stand-in for a new kind of entry: its keys are declared
with `key()` and nothing else is written for them.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import tomli_w

from backupd.config import values as v
from backupd.config.file import config_to_toml, parse_config
from backupd.config.keys import Ctx, Table, key, load, model, secret_values, to_toml
from backupd.config.model import (
    Config,
    DaemonConfig,
    Secret,
    secret_reference,
    secret_references,
)
from tests.test_config import SPEC_EXAMPLE


@model
class Widget:
    name: str
    endpoint: str = key(v.http_url)  # required: no default
    grace: float = key(v.positive_duration, default=90.0)
    chunk: int = key(v.size(1024), default=1024**2)
    token: Secret | None = key(secret_reference, default=None, secret=True)

    @staticmethod
    def rules(values: Mapping[str, Any], given: Collection[str]) -> Iterator[tuple[str, str]]:
        if values["chunk"] > 64 * 1024**2 and "grace" not in given:
            yield "grace", "required when chunk is over 64MiB"


def load_widget(text: str) -> tuple[Widget | None, list[str]]:
    errors: list[str] = []
    widget = load(Widget, Table(tomllib.loads(text), Ctx("widget.w", errors)), name="w")
    return widget, errors


def test_a_new_key_is_read_checked_and_reported_at_its_path_from_its_declaration() -> None:
    widget, errors = load_widget('endpoint = "https://x.example/T0KEN"\ngrace = "2m"\n')
    assert errors == []
    assert widget == Widget(name="w", endpoint="https://x.example/T0KEN", grace=120.0)

    widget, errors = load_widget('grace = "0s"\nchunk = "1GiB"\ntoken = "hunter2"\ngrase = "1m"\n')
    assert widget is None  # the required key is missing
    assert errors == [
        'widget.w.grace: expected a duration > 0, got "0s"',
        "widget.w.token: secrets are not written in the config file; use "
        '{ file = "PATH" } (a file only backupd can read; relative paths are looked up in '
        '$CREDENTIALS_DIRECTORY) or { env = "NAME" } (an environment variable)',
        "widget.w.endpoint: missing required key",
        'widget.w.grase: unknown key (did you mean "grace"?)',
    ]
    assert "hunter2" not in str(errors)

    _, errors = load_widget('endpoint = "https://x.example"\nchunk = "128MiB"\n')
    assert errors == ["widget.w.grace: required when chunk is over 64MiB"]


def test_a_new_key_is_shown_as_declared_and_reads_back() -> None:
    widget = Widget(name="w", endpoint="https://x.example", chunk=16 * 1024**2)
    shown = to_toml(Widget(name="w", endpoint="https://x.example", token=Secret(env="TOKEN")))
    assert shown == {
        "endpoint": "https://x.example",
        "grace": "1m30s",
        "chunk": "1MiB",
        "token": {"env": "TOKEN"},
    }
    again, errors = load_widget(tomli_w.dumps(to_toml(widget)))
    assert (again, errors) == (widget, [])


def test_a_new_secret_key_is_walked_by_check() -> None:
    widget = Widget(name="w", endpoint="https://x.example", token=Secret(file="/run/t"))
    assert list(secret_values(widget, "widget.w")) == [("widget.w.token", Secret(file="/run/t"))]


def test_the_secret_walk_finds_every_reference_of_the_spec_example() -> None:
    cfg = parse_config(tomllib.loads(SPEC_EXAMPLE))
    assert secret_references(cfg) == [
        ("source.main.password", Secret(file="/run/credentials/backupd.service/pg-main")),
        ("storage.offsite.access_key_id", Secret(env="AWS_ACCESS_KEY_ID")),
        (
            "storage.offsite.secret_access_key",
            Secret(file="/run/credentials/backupd.service/s3-secret"),
        ),
        ("notify.ops-webhook.url", Secret(env="BACKUPD_WEBHOOK_URL")),
    ]


def test_show_of_an_empty_config_is_the_daemon_table_with_its_defaults() -> None:
    doc = tomllib.loads(config_to_toml(Config(DaemonConfig(), {}, {}, {}, {})))
    assert list(doc) == ["daemon"]  # empty named sections are left out
    assert (doc["daemon"]["socket_mode"], doc["daemon"]["shutdown_grace"]) == ("0660", "5m")
    assert "socket_group" not in doc["daemon"]  # None is left out
