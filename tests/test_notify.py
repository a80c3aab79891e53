"""Notifications against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from backupd import __version__
from backupd.config import model as config
from backupd.observe.metrics import Metrics
from backupd.observe.notify import Notifications, RunEvent, summary
from tests.test_metrics import value


@dataclass
class Received:
    method: str
    path: str
    body: bytes
    content_type: str


@dataclass
class Endpoint:
    """Records every request; `/hang...` paths never answer until released."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    statuses: dict[str, list[int]] = field(default_factory=dict)  # answers per path, then 200
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(
            Received(request.method, request.path, body, request.headers["Content-Type"])
        )
        if request.path.startswith("/hang"):
            await self.release.wait()
        planned = self.statuses.get(request.path)
        return web.Response(status=planned.pop(0) if planned else 200)

    def paths(self) -> list[str]:
        return [r.path for r in self.received]


@pytest.fixture(autouse=True)
def _no_backoff(no_backoff: None) -> None:
    """Every test here retries notifications without their waits."""


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ep.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    ep.url = str(server.make_url("")).rstrip("/")
    yield ep
    ep.release.set()
    await server.close()


@pytest.fixture
async def make() -> AsyncIterator[list[Notifications]]:
    """Notifications objects made by a test, closed after it."""
    made: list[Notifications] = []
    yield made
    for n in made:
        await n.aclose()


def notifications(
    made: list[Notifications], *notifiers: config.Notifier, metrics: Metrics | None = None
) -> Notifications:
    n = Notifications({cfg.name: cfg for cfg in notifiers}, metrics=metrics)
    made.append(n)
    return n


FAILURE = RunEvent(
    event="failure",
    job="app-nightly",
    run_id="r-1a2b",
    result="failure",
    error="pg_dump: error: connection refused\nis the server running?",
    size_bytes=None,
    duration_seconds=12.5,
    attempt=3,
    trigger="schedule",
)
SUCCESS = RunEvent(
    event="success",
    job="app-nightly",
    run_id="r-3c4d",
    result="success",
    size_bytes=3 * 1024 * 1024,
    duration_seconds=95.0,
    attempt=1,
    trigger="manual",
)
START = RunEvent(event="start", job="app-nightly", run_id="r-3c4d", trigger="manual")


async def test_webhook_posts_the_event_as_json(
    endpoint: Endpoint, make: list[Notifications]
) -> None:
    hook = config.Notifier("ops", "webhook", endpoint.url + "/hook", on=("failure",))
    n = notifications(make, hook)
    n.notify("failure", ("ops",), FAILURE)
    assert await n.drain(5)

    [req] = endpoint.received
    assert (req.method, req.path, req.content_type) == ("POST", "/hook", "application/json")
    assert json.loads(req.body) == {
        "event": "failure",
        "job": "app-nightly",
        "run_id": "r-1a2b",
        "result": "failure",
        "error": "pg_dump: error: connection refused\nis the server running?",
        "size_bytes": None,
        "duration_seconds": 12.5,
        "attempt": 3,
        "trigger": "schedule",
        "backupd_version": __version__,
    }


async def test_slack_gets_one_human_line(endpoint: Endpoint, make: list[Notifications]) -> None:
    slack = config.Notifier("chat", "slack", endpoint.url + "/slack", on=("failure", "success"))
    n = notifications(make, slack)
    n.notify("failure", ("chat",), FAILURE)
    n.notify("success", ("chat",), SUCCESS)
    assert await n.drain(5)

    texts = sorted(json.loads(r.body)["text"] for r in endpoint.received)
    assert texts == [
        "backupd: job app-nightly FAILED after 3 attempts (run r-1a2b, schedule): "
        "pg_dump: error: connection refused | is the server running?",
        "backupd: job app-nightly succeeded in 1m35s, 3.0 MiB (run r-3c4d, manual)",
    ]
    assert endpoint.paths() == ["/slack", "/slack"]


async def test_healthchecks_pings_start_success_and_fail(
    endpoint: Endpoint, make: list[Notifications]
) -> None:
    hc = config.Notifier(
        "hc",
        "healthchecks",
        endpoint.url + "/ping/abc/",
        on=("start", "success", "failure", "retry"),
    )
    n = notifications(make, hc)
    for event, payload in (("start", START), ("success", SUCCESS), ("retry", FAILURE)):
        n.notify(event, ("hc",), payload)  # type: ignore[arg-type]
        assert await n.drain(5)
    n.notify("failure", ("hc",), FAILURE)
    assert await n.drain(5)

    # Healthchecks has no "retry" ping: the run is still in progress.
    assert endpoint.paths() == ["/ping/abc/start", "/ping/abc", "/ping/abc/fail"]
    assert endpoint.received[2].body == FAILURE.error.encode()  # type: ignore[union-attr]


async def test_recovered_reaches_success_subscribers_once(
    endpoint: Endpoint, make: list[Notifications]
) -> None:
    n = notifications(
        make,
        config.Notifier("hc", "healthchecks", endpoint.url + "/hc", on=("success",)),
        config.Notifier("both", "webhook", endpoint.url + "/both", on=("success", "recovered")),
        config.Notifier("rec", "webhook", endpoint.url + "/rec", on=("recovered",)),
    )
    n.notify("recovered", ("hc", "both", "rec"), SUCCESS)
    assert await n.drain(5)
    assert sorted(endpoint.paths()) == ["/both", "/hc", "/rec"]
    assert json.loads(next(r.body for r in endpoint.received if r.path == "/rec"))["event"] == (
        "recovered"
    )

    endpoint.received.clear()
    n.notify("success", ("hc", "both", "rec"), SUCCESS)
    assert await n.drain(5)
    # A notifier that asked only for recoveries does not hear routine successes.
    assert sorted(endpoint.paths()) == ["/both", "/hc"]


async def test_events_not_subscribed_and_notifiers_not_named_are_not_sent(
    endpoint: Endpoint, make: list[Notifications]
) -> None:
    n = notifications(
        make,
        config.Notifier("ops", "webhook", endpoint.url + "/ops", on=("failure",)),
        config.Notifier("other", "webhook", endpoint.url + "/other", on=("failure",)),
    )
    n.notify("start", ("ops",), START)
    n.notify("success", ("ops",), SUCCESS)
    n.notify("retry", ("ops",), FAILURE)
    n.notify("failure", ("ops", "no-such-notifier"), FAILURE)
    assert await n.drain(5)
    assert endpoint.paths() == ["/ops"]


async def test_server_errors_are_retried(endpoint: Endpoint, make: list[Notifications]) -> None:
    metrics = Metrics()
    endpoint.statuses["/flaky"] = [500, 503]
    n = notifications(
        make,
        config.Notifier("ops", "webhook", endpoint.url + "/flaky", on=("failure",)),
        metrics=metrics,
    )
    n.notify("failure", ("ops",), FAILURE)
    assert await n.drain(5)
    assert endpoint.paths() == ["/flaky"] * 3
    assert value(metrics, "backupd_notify_failures_total", notifier="ops") == 0


async def test_giving_up_is_logged_without_a_secret_url_and_counted(
    endpoint: Endpoint, make: list[Notifications], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_url = endpoint.url + "/down/T0K3N"
    monkeypatch.setenv("BACKUPD_TEST_HOOK", secret_url)
    endpoint.statuses["/down/T0K3N"] = [500, 500, 500]
    metrics = Metrics()
    hook = config.Notifier(
        "ops", "webhook", config.Secret(env="BACKUPD_TEST_HOOK"), on=("failure",)
    )
    n = notifications(make, hook, metrics=metrics)
    with capture_logs() as logs:
        n.notify("failure", ("ops",), FAILURE)
        assert await n.drain(5)

    assert endpoint.paths() == ["/down/T0K3N"] * 3
    assert value(metrics, "backupd_notify_failures_total", notifier="ops") == 1
    [failed] = [e for e in logs if e["event"] == "notify_failed"]
    assert failed["notifier"] == "ops"
    assert failed["error"] == "HTTP 500"
    assert "T0K3N" not in repr(logs)


async def test_client_errors_are_not_retried(endpoint: Endpoint, make: list[Notifications]) -> None:
    metrics = Metrics()
    endpoint.statuses["/gone"] = [404]
    n = notifications(
        make,
        config.Notifier("ops", "slack", endpoint.url + "/gone", on=("failure",)),
        metrics=metrics,
    )
    n.notify("failure", ("ops",), FAILURE)
    assert await n.drain(5)
    assert endpoint.paths() == ["/gone"]
    assert value(metrics, "backupd_notify_failures_total", notifier="ops") == 1


async def test_a_hanging_endpoint_is_bounded_and_never_blocks_the_caller(
    endpoint: Endpoint, make: list[Notifications]
) -> None:
    metrics = Metrics()
    hook = config.Notifier("ops", "webhook", endpoint.url + "/hang", on=("failure",), timeout=0.2)
    n = notifications(make, hook, metrics=metrics)

    started = time.monotonic()
    n.notify("failure", ("ops",), FAILURE)
    assert time.monotonic() - started < 0.05
    assert endpoint.received == []  # nothing was sent while the caller waited

    with capture_logs() as logs:
        assert await n.drain(10)
    assert time.monotonic() - started < 3  # 3 attempts of 0.2 s, not forever
    assert endpoint.paths() == ["/hang"] * 3
    assert value(metrics, "backupd_notify_failures_total", notifier="ops") == 1
    assert [e["error"] for e in logs if e["event"] == "notify_failed"] == ["no answer within 0.2s"]


async def test_an_unreachable_endpoint_is_a_logged_failure(make: list[Notifications]) -> None:
    metrics = Metrics()
    hook = config.Notifier("ops", "webhook", "http://127.0.0.1:9/x", on=("failure",))
    n = notifications(make, hook, metrics=metrics)
    with capture_logs() as logs:
        n.notify("failure", ("ops",), FAILURE)
        assert await n.drain(10)
    [failed] = [e for e in logs if e["event"] == "notify_failed"]
    assert failed["error"].startswith("cannot connect")
    assert failed["target"] == "http://127.0.0.1"
    assert value(metrics, "backupd_notify_failures_total", notifier="ops") == 1


async def test_an_unreadable_secret_url_is_a_failure_not_a_crash(
    make: list[Notifications], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BACKUPD_TEST_MISSING", raising=False)
    metrics = Metrics()
    hook = config.Notifier(
        "ops", "webhook", config.Secret(env="BACKUPD_TEST_MISSING"), on=("failure",)
    )
    n = notifications(make, hook, metrics=metrics)
    with capture_logs() as logs:
        n.notify("failure", ("ops",), FAILURE)
        assert await n.drain(5)
    [failed] = [e for e in logs if e["event"] == "notify_failed"]
    assert "BACKUPD_TEST_MISSING is not set" in failed["error"]
    assert value(metrics, "backupd_notify_failures_total", notifier="ops") == 1


async def test_drain_reports_sends_still_in_flight_and_aclose_ends_them(
    endpoint: Endpoint,
) -> None:
    hook = config.Notifier("ops", "webhook", endpoint.url + "/hang", on=("failure",), timeout=30)
    n = Notifications({"ops": hook})
    n.notify("failure", ("ops",), FAILURE)
    assert not await n.drain(0.2)
    await asyncio.wait_for(n.aclose(), 5)
    assert await n.drain(0)
    # After close nothing new starts (and no session is left unclosed).
    n.notify("failure", ("ops",), FAILURE)
    assert await n.drain(0)


def test_summary_lines() -> None:
    assert summary(START) == "backupd: job app-nightly started (run r-3c4d, manual)"
    retry = RunEvent("retry", "db", "r9", error="timeout", attempt=1)
    assert (
        summary(retry) == "backupd: job db attempt 1 failed, retrying (run r9, schedule): timeout"
    )
    recovered = RunEvent("recovered", "db", "r9", "success", size_bytes=512, duration_seconds=4000)
    assert summary(recovered) == (
        "backupd: job db recovered: succeeded in 1h06m40s, 512 B after earlier failures "
        "(run r9, schedule)"
    )
    assert "\n" not in summary(RunEvent("failure", "db", "r9", error="x\n" * 1000))
