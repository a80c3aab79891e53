"""The HTTP endpoint: /metrics for Prometheus, /healthz and /readyz for supervisors,
and `/` the read-only HTML status page (`backupd.observe.statuspage`).

Read-only by design: GET and HEAD only (aiohttp answers 405 to anything else
on a known path, 404 elsewhere), no config shown, nothing changes state.
/metrics is always the Prometheus text format (0.0.4), which every Prometheus
accepts whatever else its Accept header offers: backupd renders it itself, fast
(see `backupd.observe.exposition`); OpenMetrics would add nothing backupd uses. It is
gzipped (level 1, off the event loop) when the scraper asks, as Prometheus does.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from aiohttp import web

from backupd.errors import BackupdError, ConfigError
from backupd.observe.exposition import CONTENT_TYPE
from backupd.observe.metrics import Metrics
from backupd.observe.statuspage import CSP

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
    """`host:port` or `[v6]:port` -> (host, port), as `daemon.http_listen` spells it.

    A name (`localhost:9187`) binds every address it resolves to.
    """
    host, sep, port = listen.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if (
        not sep
        or not host.strip("[]")
        or (":" in host and not bracketed)
        or not (port.isascii() and port.isdigit())
        or int(port) > 65535
    ):
        raise ConfigError(
            [f'daemon.http_listen: expected "HOST:PORT" or "[IPv6]:PORT", got {listen!r}']
        )
    return (host[1:-1] if bracketed else host), int(port)


class HttpServer:
    """Serves /metrics, /healthz, /readyz and (given `page`) the status page at `/`."""

    def __init__(
        self,
        listen: str,
        metrics: Metrics,
        health: HealthProbe,
        page: Callable[[], str] | None = None,
    ) -> None:
        self._host, self._port = parse_listen(listen)
        self._metrics = metrics
        self._health = health
        self._page = page
        self._runner: web.AppRunner | None = None

    async def start(self) -> tuple[str, int]:
        """Listen, then return the bound (host, port); port 0 picks a free one."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if self._page is not None:
            app.router.add_get("/", self._status_page)
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
        return host, port

    async def close(self) -> None:
        """Stop listening and finish in-flight requests; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body = self._metrics.exposition()
        headers = {"Content-Type": CONTENT_TYPE}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = await asyncio.to_thread(gzip.compress, body, 1)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            live = self._health.live()
        except Exception:
            log.exception("liveness_probe_failed")
            live = False
        if live:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not live\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ready, detail = self._health.ready()
        except Exception:
            log.exception("readiness_probe_failed")
            ready, detail = False, {"error": "readiness probe failed"}
        return web.json_response(detail, status=200 if ready else 503)

    async def _status_page(self, request: web.Request) -> web.Response:
        assert self._page is not None
        try:
            body = self._page()
        except Exception:
            log.exception("status_page_failed")
            return web.Response(status=500, text="the status page failed; see the daemon's log\n")
        return web.Response(
            text=body,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": CSP,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY",
            },
        )
