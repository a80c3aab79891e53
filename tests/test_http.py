"""The HTTP endpoint, served on a real loopback port and queried with a real client."""

from __future__ import annotations

import gzip
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from backupd.daemon.http import HttpServer, parse_listen
from backupd.errors import BackupdError, ConfigError
from backupd.observe.metrics import Metrics


@dataclass
class Probe:
    """A HealthProbe whose answers the test sets."""

    is_live: bool = True
    is_ready: bool = True
    detail: dict[str, Any] = field(default_factory=lambda: {"config": "loaded", "jobs": 2})
    broken: bool = False

    def live(self) -> bool:
        if self.broken:
            raise RuntimeError("probe bug")
        return self.is_live

    def ready(self) -> tuple[bool, dict[str, Any]]:
        if self.broken:
            raise RuntimeError("probe bug")
        return self.is_ready, self.detail


@dataclass
class Served:
    url: str
    probe: Probe
    metrics: Metrics
    client: aiohttp.ClientSession


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    probe, metrics = Probe(), Metrics()
    server = HttpServer("127.0.0.1:0", metrics, probe)
    host, port = await server.start()
    assert host == "127.0.0.1" and port > 0
    async with aiohttp.ClientSession() as client:
        yield Served(f"http://{host}:{port}", probe, metrics, client)
    await server.close()


async def test_metrics_are_served_in_prometheus_text_format(served: Served) -> None:
    served.metrics.run_started("nightly")
    served.metrics.run_finished("nightly", "success", 5.0, 2048, 1_700_000_000.0)
    async with served.client.get(served.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
        text = await resp.text()
    assert 'backupd_job_runs_total{job="nightly",result="success"} 1.0' in text
    assert "backupd_build_info{" in text


async def test_a_scraper_asking_for_openmetrics_gets_the_text_format_gzipped(
    served: Served,
) -> None:
    """What Prometheus 2.x sends: OpenMetrics first, text/plain accepted, gzip."""
    served.metrics.jobs_configured(["nightly"])
    accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    headers = {"Accept": accept, "Accept-Encoding": "gzip"}
    async with served.client.get(
        served.url + "/metrics", headers=headers, auto_decompress=False
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
        assert resp.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(await resp.read()).decode()
    assert 'backupd_job_runs_total{job="nightly",result="failure"} 0.0' in text


async def test_head_is_allowed(served: Served) -> None:
    async with served.client.head(served.url + "/metrics") as resp:
        assert resp.status == 200
        assert await resp.read() == b""


async def test_healthz_follows_liveness(served: Served) -> None:
    async with served.client.get(served.url + "/healthz") as resp:
        assert (resp.status, await resp.text()) == (200, "ok\n")
    served.probe.is_live = False
    async with served.client.get(served.url + "/healthz") as resp:
        assert resp.status == 503


async def test_readyz_answers_with_the_probe_detail(served: Served) -> None:
    async with served.client.get(served.url + "/readyz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"config": "loaded", "jobs": 2}
    served.probe.is_ready = False
    served.probe.detail = {"config": "loading", "jobs": 0}
    async with served.client.get(served.url + "/readyz") as resp:
        assert resp.status == 503
        assert await resp.json() == {"config": "loading", "jobs": 0}


async def test_a_failing_probe_reads_as_unhealthy_and_the_server_survives(
    served: Served,
) -> None:
    served.probe.broken = True
    async with served.client.get(served.url + "/healthz") as resp:
        assert resp.status == 503
    async with served.client.get(served.url + "/readyz") as resp:
        assert resp.status == 503
        assert await resp.json() == {"error": "readiness probe failed"}
    async with served.client.get(served.url + "/metrics") as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/metrics"), ("PUT", "/healthz"), ("DELETE", "/readyz")]
)
async def test_only_get_and_head_are_allowed(served: Served, method: str, path: str) -> None:
    async with served.client.request(method, served.url + path) as resp:
        assert resp.status == 405


@pytest.mark.parametrize("path", ["/", "/config", "/metrics/extra", "/reload"])
async def test_unknown_paths_are_not_found(served: Served, path: str) -> None:
    async with served.client.get(served.url + path) as resp:
        assert resp.status == 404


async def test_requests_are_not_access_logged(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        async with served.client.get(served.url + "/metrics") as resp:
            assert resp.status == 200
    assert [r for r in caplog.records if r.name == "aiohttp.access"] == []


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback in this environment")
async def test_listens_on_ipv6() -> None:
    server = HttpServer("[::1]:0", Metrics(), Probe())
    host, port = await server.start()
    try:
        assert host == "::1"
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://[::1]:{port}/healthz") as resp,
        ):
            assert resp.status == 200
    finally:
        await server.close()


async def test_close_stops_listening() -> None:
    server = HttpServer("127.0.0.1:0", Metrics(), Probe())
    host, port = await server.start()
    await server.close()
    await server.close()  # idempotent
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.get(f"http://{host}:{port}/healthz")


async def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer(f"127.0.0.1:{port}", Metrics(), Probe())
        with pytest.raises(BackupdError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
            await server.start()


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9187", ("127.0.0.1", 9187)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:9187", ("::1", 9187)),
        ("[::]:80", ("::", 80)),
        ("localhost:9187", ("localhost", 9187)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    "listen",
    ["127.0.0.1", "127.0.0.1:70000", ":9187", "[]:80", "[::1]", "::1:9187", "1.2.3.4:x", "h:²"],
)
def test_parse_listen_rejects_with_the_key_path(listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen(listen)
    assert info.value.errors[0].startswith('daemon.http_listen: expected "HOST:PORT"')
    assert repr(listen) in info.value.errors[0]
