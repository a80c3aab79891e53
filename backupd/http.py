"""The HTTP endpoint: /metrics for Prometheus, /healthz and /readyz for supervisors.

Read-only by design: GET and HEAD only (aiohttp answers 405 to anything else
on a known path, 404 elsewhere), no config shown, nothing changes state.
/metrics is prometheus_client's aiohttp handler, so a scraper that asks for
OpenMetrics or gzip gets it; a plain GET gets the Prometheus text format.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

import structlog
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from backupd.errors import BackupdError, ConfigError
from backupd.metrics import Metrics

log = structlog.get_logger(__name__)


class HealthProbe(Protocol):
    """What the daemon tells the HTTP endpoint about itself."""

    def live(self) -> bool:
        """True while the event loop and the scheduler are alive."""
        ...

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether the config is loaded and the scheduler runs, with a JSON-able detail."""
        ...


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); the host must be an IP address.

    A literal address keeps the bind explicit: a name could resolve to
    several addresses, or to a public one.
    """
    host, sep, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    problem = None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        problem = "expected IP:PORT or [IPv6]:PORT"
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        problem = "expected IP:PORT or [IPv6]:PORT with a port in 0-65535"
    if problem is not None:
        raise ConfigError([f"daemon.http_listen: {problem}, got {listen!r}"])
    return host, int(port_text)


class HttpServer:
    """Serves /metrics, /healthz and /readyz on one TCP address."""

    def __init__(self, listen: str, metrics: Metrics, health: HealthProbe) -> None:
        self._host, self._port = parse_listen(listen)
        self._metrics = metrics
        self._health = health
        self._runner: web.AppRunner | None = None

    async def start(self) -> tuple[str, int]:
        """Listen, then return the bound (host, port); port 0 picks a free one."""
        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler(self._metrics.registry))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except OSError as exc:
            await runner.cleanup()
            raise BackupdError(
                f"cannot listen for HTTP on {self._host}:{self._port}: {exc.strerror}"
            ) from None
        self._runner = runner
        host, port = runner.addresses[0][:2]
        log.info("http listening", host=host, port=port)
        return host, port

    async def close(self) -> None:
        """Stop listening and finish in-flight requests; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            live = self._health.live()
        except Exception:
            log.exception("liveness probe failed")
            live = False
        if live:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not live\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ready, detail = self._health.ready()
        except Exception:
            log.exception("readiness probe failed")
            ready, detail = False, {"error": "readiness probe failed"}
        return web.json_response(detail, status=200 if ready else 503)
