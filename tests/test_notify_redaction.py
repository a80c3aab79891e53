"""Issue 12 finding 3: a secret notifier URL appears in no log line, at any level.

Each case sends to a real loopback endpoint that misbehaves (redirects, a
redirect loop, a closed port, a connect that never completes, an answer that
never comes, a dropped connection, 500, a URL aiohttp refuses) with the URL
given as a secret holding a path token and a query token. Every log line of
the process is captured: backupd's structlog output set up by `logs.setup` at
debug (the stamina retry warnings included) and stdlib logging of every
library at DEBUG. None may hold the URL, its path or its tokens, while the
failure is still named (notifier, status or what went wrong).
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog

from backupd.config import model as config
from backupd.observe import logs
from backupd.observe.metrics import Metrics
from backupd.observe.notify import Notifications, RunEvent
from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.pgcluster import free_port, wait_for
from tests.test_metrics import value
from tests.webhook_server import (
    WebhookServer,
    self_signed_tls,
    speaks_first_in_plain_http,
    unanswered_connects,
    webhook_server,
)

TOKEN = "T0K3N" + uuid.uuid4().hex[:12]
QUERY_TOKEN = "QT0K3N" + uuid.uuid4().hex[:12]
TIMEOUT = 0.3
PROBE = "capture probe"

FAILURE = RunEvent(
    event="failure", job="app", run_id="r-1", result="failure", error="boom", attempt=2
)


@pytest.fixture(autouse=True)
def _no_backoff(no_backoff: None) -> None:
    """Every test here retries notifications without their waits."""


@pytest.fixture
def server() -> Iterator[WebhookServer]:
    with webhook_server() as s:
        yield s


@pytest.fixture
async def made() -> AsyncIterator[list[Notifications]]:
    out: list[Notifications] = []
    yield out
    for n in out:
        await n.aclose()


@contextmanager
def every_log_line() -> Iterator[io.StringIO]:
    """backupd's log set-up at debug, then every stdlib logger opened to DEBUG as well."""
    out = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_root = list(root.handlers), root.level
    saved = {
        name: lg.level
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    logs.setup("debug", "json", out)
    root.setLevel(logging.DEBUG)
    for lg in logging.Logger.manager.loggerDict.values():
        if isinstance(lg, logging.Logger):
            lg.setLevel(logging.NOTSET)  # held-back libraries too: stricter than production
    try:
        logging.getLogger("aiohttp.client").debug(PROBE)  # shows library debug lines arrive
        yield out
    finally:
        structlog.reset_defaults()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_root)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def secret_notifier(monkeypatch: pytest.MonkeyPatch, url: str, kind: str) -> config.Notifier:
    monkeypatch.setenv("BACKUPD_TEST_SECRET_HOOK", url)
    return config.Notifier(
        "ops",
        kind,  # type: ignore[arg-type]
        config.Secret(env="BACKUPD_TEST_SECRET_HOOK"),
        on=("failure",),
        timeout=TIMEOUT,
    )


def events(output: str) -> list[dict[str, object]]:
    """The structlog (JSON) lines; stdlib logging lines are plain text."""
    out = []
    for line in output.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def assert_no_trace_of(output: str, url: str) -> None:
    path = url.split("://", 1)[1].partition("/")[2]
    for needle in (url, path, TOKEN, QUERY_TOKEN):
        assert needle not in output, f"{needle!r} is in the logs:\n{output}"


CASES = {
    # mode -> (what the failure must say, attempts the endpoint sees)
    "r301": ("HTTP 301", 1),
    "r302": ("HTTP 302", 1),
    "r307": ("HTTP 307", 1),
    "loop": ("HTTP 302", 1),
    "500": ("HTTP 500", 3),
    "hang": (f"no answer within {TIMEOUT:g}s", 3),
    "drop": ("closed the connection", 3),
}


@pytest.mark.parametrize("kind", ["webhook", "slack", "healthchecks"])
@pytest.mark.parametrize("mode", list(CASES))
async def test_a_misbehaving_endpoint_never_puts_the_secret_url_in_a_log_line(
    server: WebhookServer,
    made: list[Notifications],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    kind: str,
    record_property: Callable[[str, object], None],
) -> None:
    url = f"{server.url}/{mode}/{TOKEN}/?token={QUERY_TOKEN}"
    metrics = Metrics()
    n = Notifications({"ops": secret_notifier(monkeypatch, url, kind)}, metrics=metrics)
    made.append(n)
    with every_log_line() as out:
        n.notify("failure", ("ops",), FAILURE)
        assert await n.drain(10)
    output = out.getvalue()
    record_property("log_lines", len(output.splitlines()))
    assert f"DEBUG aiohttp.client: {PROBE}" in output

    assert_no_trace_of(output, url)
    said, attempts = CASES[mode]
    assert server.modes() == [mode] * attempts  # a redirect is never followed
    assert value(metrics, "backupd_notify_failures_total", notifier="ops") == 1
    [failed] = [e for e in events(output) if e["event"] == "notify_failed"]
    assert failed["notifier"] == "ops"
    assert failed["level"] == "warning"
    assert said in failed["error"]
    if attempts > 1:  # the retry library's own warnings name the notifier, not the URL
        retries = [e for e in events(output) if "retry" in str(e["event"])]
        assert len(retries) == attempts - 1
        assert {r["notifier"] for r in retries} == {"ops"}
        assert all(said in r["caused_by"] for r in retries)


@contextmanager
def closed_port() -> Iterator[int]:
    yield free_port()


@contextmanager
def tls_port(tmp_path: Path) -> Iterator[int]:
    with webhook_server(self_signed_tls(tmp_path)) as tls_server:
        yield int(tls_server.server_address[1])


@pytest.mark.parametrize(
    ("where", "said"),
    [
        ("closed port", "cannot connect: Connection refused"),
        ("connect never completes", f"no answer within {TIMEOUT:g}s"),
        ("not http", "unsupported or invalid URL"),
        ("self-signed certificate", "TLS certificate not accepted: self"),
        ("https to plain http", "TLS handshake failed"),
    ],
)
async def test_an_unreachable_or_invalid_secret_url_is_named_but_never_logged(
    made: list[Notifications],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    where: str,
    said: str,
) -> None:
    openers = {
        "connect never completes": unanswered_connects,
        "self-signed certificate": lambda: tls_port(tmp_path),
        "https to plain http": speaks_first_in_plain_http,
    }
    with openers.get(where, closed_port)() as port:
        scheme = {"not http": "ftp", "self-signed certificate": "https"}.get(where, "http")
        scheme = "https" if where == "https to plain http" else scheme
        url = f"{scheme}://127.0.0.1:{port}/hooks/{TOKEN}?token={QUERY_TOKEN}"
        n = Notifications({"ops": secret_notifier(monkeypatch, url, "webhook")})
        made.append(n)
        with every_log_line() as out:
            n.notify("failure", ("ops",), FAILURE)
            assert await n.drain(10)
    output = out.getvalue()
    assert f"DEBUG aiohttp.client: {PROBE}" in output
    assert_no_trace_of(output, url)
    [failed] = [e for e in events(output) if e["event"] == "notify_failed"]
    assert (failed["notifier"], failed["target"]) == ("ops", "secret url")
    assert said in failed["error"]


@pytest.mark.slow
def test_a_daemon_at_debug_level_never_logs_its_secret_notifier_urls(
    tmp_path: Path,
    config_file: ConfigFile,
    sample_db: str,
    server: WebhookServer,
    record_property: Callable[[str, object], None],
) -> None:
    """End to end: a real `backupd run` at debug level, four secret notifiers that fail
    four ways and one that works, a triggered backup; its whole output holds no URL,
    path or token."""
    dead = free_port()
    urls = {
        "loop": f"{server.url}/loop/{TOKEN}?token={QUERY_TOKEN}",
        "refused": f"http://127.0.0.1:{dead}/hooks/{TOKEN}?token={QUERY_TOKEN}",
        "error": f"{server.url}/500/{TOKEN}?token={QUERY_TOKEN}",
        "hang": f"{server.url}/hang/{TOKEN}?token={QUERY_TOKEN}",
        "fine": f"{server.url}/landing/{TOKEN}?token={QUERY_TOKEN}",
    }
    kinds = {
        "loop": "webhook",
        "refused": "slack",
        "error": "healthchecks",
        "hang": "webhook",
        "fine": "slack",
    }
    notifiers = "".join(
        f'[notify.{name}]\ntype = "{kinds[name]}"\nurl = {{ env = "HOOK_{name.upper()}" }}\n'
        f'on = ["start", "success", "failure"]\ntimeout = "1s"\n\n'
        for name in urls
    )
    cfg = config_file(
        sample_db,
        path=tmp_path / "backupd.toml",
        extra_daemon={"log_level": "debug"},
        extra_job=f"notify = {json.dumps(list(urls))}\n",
        extra=notifiers,
    )
    env = {f"HOOK_{name.upper()}": url for name, url in urls.items()}
    d = DaemonProcess(cfg, tmp_path / "daemon.log", env=env).start()
    try:
        triggered = d.cli("trigger", "app", "--wait")
        assert triggered.returncode == 0, triggered.stdout + triggered.stderr + d.logs()

        def failed_sends() -> dict[str, str]:
            return {
                str(e["notifier"]): str(e["error"])
                for e in d.events()
                if e.get("event") == "notify_failed" and e.get("run_event") == "success"
            }

        wait_for(lambda: len(failed_sends()) == 4, 30, what="every notifier to give up")
    finally:
        d.stop()
    output = d.logs() + triggered.stdout + triggered.stderr
    record_property("log_lines", len(output.splitlines()))
    record_property("retry_lines", output.count("stamina.retry_scheduled"))
    record_property("failed_sends", sum(e.get("event") == "notify_failed" for e in d.events()))
    sent = [e for e in d.events() if e.get("event") == "notify_sent"]
    assert {(e["notifier"], e["level"]) for e in sent} == {("fine", "debug")}  # debug is on
    for url in urls.values():
        assert_no_trace_of(output, url)
    errors = failed_sends()
    assert errors["loop"].startswith("HTTP 302")
    assert errors["refused"] == "cannot connect: Connection refused"
    assert errors["error"] == "HTTP 500"
    assert errors["hang"] == "no answer within 1s"
    assert "stamina.retry_scheduled" in output  # retries happened and were logged, redacted
