"""A fault-injecting HTTP proxy between backupd and the moto S3 server, for tests.

It runs on loopback in a thread with its own event loop, so sync tests, async
tests and daemon subprocesses can all point `endpoint_url` at it (with
`addressing_style = "path"`, so the bucket is the first path segment). Every
request is named after the S3 operation it is (`operation()`), logged, and
checked against the rules in order; the first rule that matches and fires
applies its fault, otherwise the request is forwarded unchanged.

Faults model what S3 and the network really do: error replies (500, 503
SlowDown, 403...), a 200 reply whose body is an `<Error>` (S3's documented
CompleteMultipartUpload behaviour), a connection reset while the request body
is still arriving or while the response goes out, a response body cut short, a
request held (a slow or stuck store), and a store that silently keeps a short
part. Rules fire with a probability (drawn from a seeded RNG) and/or a count.

A held request whose client disconnects is cancelled and never forwarded
(`handler_cancellation`), as a real store never sees a request the client
never finished sending.
"""

from __future__ import annotations

import asyncio
import collections
import io
import random
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

import aiohttp
from aiohttp import web
from yarl import URL

# Hop-by-hop and framing headers that the proxy recomputes on each leg.
_DROP_REQUEST = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "expect",
    "keep-alive",
}
_DROP_RESPONSE = {
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "server",
    "date",
}


def operation(method: str, path: str, query: Mapping[str, str]) -> str:
    """The S3 operation a path-style request is, e.g. "UploadPart"."""
    segments = [s for s in path.split("/") if s]
    if not segments:
        return "ListBuckets"
    on_key = len(segments) > 1
    if "uploadId" in query:
        if method == "PUT":
            return "UploadPart"
        if method == "POST":
            return "CompleteMultipartUpload"
        if method == "DELETE":
            return "AbortMultipartUpload"
        return "ListParts"
    if "uploads" in query:
        return "CreateMultipartUpload" if method == "POST" else "ListMultipartUploads"
    if method == "POST" and "delete" in query:
        return "DeleteObjects"
    table = {
        ("PUT", True): "PutObject",
        ("GET", True): "GetObject",
        ("HEAD", True): "HeadObject",
        ("DELETE", True): "DeleteObject",
        ("PUT", False): "CreateBucket",
        ("HEAD", False): "HeadBucket",
        ("DELETE", False): "DeleteBucket",
    }
    if (method, on_key) in table:
        return table[(method, on_key)]
    if method == "GET" and not on_key:
        return "ListObjectsV2" if query.get("list-type") == "2" else "ListObjects"
    return f"{method} {'object' if on_key else 'bucket'}"


def error_body(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        "<RequestId>faultproxy</RequestId><HostId>faultproxy</HostId></Error>"
    ).encode()


# -- faults ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorReply:
    """Answer with an S3 error document; `status=200` is the "200 with <Error>" reply.

    `forward=True` sends the request upstream first, so the store did the work
    and only the reply is an error (a lost or garbled reply).
    """

    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    forward: bool = False

    @property
    def name(self) -> str:
        return f"{self.status} {self.code}" + (" after forwarding" if self.forward else "")


@dataclass(frozen=True)
class ResetRequest:
    """Read up to `after_bytes` of the request body, then reset the connection (never forwarded)."""

    after_bytes: int = 0

    @property
    def name(self) -> str:
        return f"reset after {self.after_bytes} request bytes"


@dataclass(frozen=True)
class ResetResponse:
    """Forward, send the status line, headers and `after_bytes` of the body, then reset.

    With `after_bytes=0`, or a body no longer than that, nothing at all is sent.
    """

    after_bytes: int = 0

    @property
    def name(self) -> str:
        return f"reset after {self.after_bytes} response bytes"


@dataclass(frozen=True)
class TruncateResponse:
    """Forward, announce the full Content-Length, send `keep_bytes`, then close cleanly.

    A body no longer than `keep_bytes` (an empty one included) is not sent at
    all, headers neither: a fault always reaches the client.
    """

    keep_bytes: int = 0

    @property
    def name(self) -> str:
        return f"response truncated to {self.keep_bytes} bytes"


@dataclass(frozen=True)
class Delay:
    """Hold the request `seconds` (or until `FaultProxy.release()`), then forward it,
    or apply `then` to it instead.

    `after_bytes` of the body are read first, so the client is caught mid-upload.
    A client that disconnects meanwhile cancels the request: it is never forwarded.
    """

    seconds: float = 3600.0
    after_bytes: int = 0
    then: Fault | None = None

    @property
    def name(self) -> str:
        then = f", then {self.then.name}" if self.then is not None else ""
        return f"held {self.seconds:g}s after {self.after_bytes} request bytes{then}"


@dataclass(frozen=True)
class TruncateUpstream:
    """Forward only the first `keep_bytes` of the body, without its checksum headers,
    and pass on the store's (successful) reply: a store that silently kept a short part."""

    keep_bytes: int = 0

    @property
    def name(self) -> str:
        return f"body cut to {self.keep_bytes} bytes upstream"


@dataclass(frozen=True)
class OneOf:
    """One of `faults`, picked per request with the proxy's seeded RNG."""

    faults: tuple[Fault, ...]

    @property
    def name(self) -> str:
        return "one of " + ", ".join(f.name for f in self.faults)


Fault = (
    ErrorReply | ResetRequest | ResetResponse | TruncateResponse | Delay | TruncateUpstream | OneOf
)

TRANSIENT_FAULTS = OneOf(
    (
        ErrorReply(500, "InternalError", "We encountered an internal error. Please try again."),
        ErrorReply(503, "SlowDown"),
        ErrorReply(503, "ServiceUnavailable", "Please reduce your request rate.", forward=True),
        ResetRequest(after_bytes=4096),
        ResetResponse(after_bytes=0),
        TruncateResponse(keep_bytes=20),
    )
)
"""What a flaky store or network does, each worth retrying (S3 docs: 500, 503, resets)."""


@dataclass
class Rule:
    """Which requests get `fault`: one of `ops` (any if empty), with `key_suffix`,
    `method` and every `query` parameter value given.

    The first `after` matching requests pass; then each fires with
    `probability`, at most `times` times (None: no limit).
    """

    fault: Fault
    ops: tuple[str, ...] = ()
    key_suffix: str | None = None
    method: str | None = None
    query: dict[str, str] = field(default_factory=dict)
    header: str | None = None  # only requests carrying this header (e.g. "If-Match")
    probability: float = 1.0
    times: int | None = None
    after: int = 0
    matched: int = 0
    injected: int = 0

    def matches(
        self,
        op: str,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        if self.ops and op not in self.ops:
            return False
        if self.header is not None and self.header not in (headers or {}):
            return False
        if self.method is not None and method != self.method:
            return False
        if any(query.get(k) != v for k, v in self.query.items()):
            return False
        return self.key_suffix is None or path.endswith(self.key_suffix)


@dataclass(frozen=True)
class Seen:
    """One request as the proxy handled it.

    A held request is logged when it arrives (not forwarded, no status yet), so
    a test can tell from the log which stage a client is held at, and once more
    when it goes on.
    """

    op: str
    method: str
    path: str
    query: dict[str, str]
    fault: str | None  # None: forwarded untouched
    forwarded: bool  # whether the store received it (whole or cut short)
    status: int | None  # what the client was sent; None when the connection was reset


class FaultProxy:
    """The proxy; `start()` returns its URL, `stop()` ends it. Thread-safe API."""

    def __init__(
        self, upstream: str, *, seed: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.upstream = URL(upstream)
        self._ssl_context = ssl_context  # given: the proxy serves https with it
        self.url = ""
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._log: list[Seen] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._release: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._session: aiohttp.ClientSession | None = None
        # A store (or a proxy) that ignores conditional writes: these never reach it.
        self.strip_conditions = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> str:
        self._thread = threading.Thread(target=self._main, name="faultproxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"fault proxy failed to start: {self._error}") from self._error
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._release = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=["User-Agent"]
        ) as session:
            self._session = session
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(
                app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0
            )
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self._ssl_context)
            await site.start()
            host, port = runner.addresses[0][:2]
            scheme = "https" if self._ssl_context is not None else "http"
            self.url = f"{scheme}://{host}:{port}"
            self._ready.set()
            try:
                await self._stopping.wait()
            finally:
                await runner.cleanup()

    # -- rules and what happened ----------------------------------------------------------

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule (requests held now stay held until `release()`)."""
        with self._lock:
            self._rules.clear()

    def release(self) -> None:
        """Let every request held by a `Delay` go on now."""
        if self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    def log(self) -> list[Seen]:
        with self._lock:
            return list(self._log)

    def requests(self, *ops: str) -> list[Seen]:
        return [s for s in self.log() if not ops or s.op in ops]

    def seen(self) -> collections.Counter[str]:
        """Requests received, by operation."""
        return collections.Counter(s.op for s in self.log())

    def injected(self) -> collections.Counter[str]:
        """Faults applied, by fault name."""
        return collections.Counter(s.fault for s in self.log() if s.fault is not None)

    def _decide(self, request: web.Request, op: str) -> Fault | None:
        """The fault the first firing rule applies to this request, or None."""
        with self._lock:
            for rule in self._rules:
                if not rule.matches(
                    op, request.method, request.path, request.query, request.headers
                ):
                    continue
                rule.matched += 1
                if rule.matched <= rule.after:
                    continue
                if rule.times is not None and rule.injected >= rule.times:
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                rule.injected += 1
                fault: Fault = rule.fault
                while isinstance(fault, OneOf):
                    fault = self._rng.choice(fault.faults)
                return fault
        return None

    def _record(self, request: web.Request, op: str, fault: Fault | None, **kw: Any) -> None:
        with self._lock:
            self._log.append(
                Seen(
                    op=op,
                    method=request.method,
                    path=request.path,
                    query=dict(request.query),
                    fault=fault.name if fault is not None else None,
                    **kw,
                )
            )

    # -- the handler ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        op = operation(request.method, request.path, request.query)
        fault = self._decide(request, op)
        prefix = b""
        if isinstance(fault, Delay):
            prefix = await _read_some(request, fault.after_bytes)
            self._record(request, op, fault, forwarded=False, status=None)
            if not await self._hold(fault.seconds):
                return _reset(request)  # the proxy stops: drop what it still holds
            fault = fault.then
        if isinstance(fault, ResetRequest):
            await _read_some(request, fault.after_bytes)
            self._record(request, op, fault, forwarded=False, status=None)
            return _reset(request)
        if isinstance(fault, ErrorReply) and not fault.forward:
            await request.read()
            self._record(request, op, fault, forwarded=False, status=fault.status)
            return _error(fault)
        body = prefix + await request.read()
        if isinstance(fault, TruncateUpstream):
            status, headers, upstream_body = await self._forward(
                request, body[: fault.keep_bytes], strip_checksums=True
            )
            self._record(request, op, fault, forwarded=True, status=status)
            return _reply(request, status, headers, upstream_body)
        status, headers, upstream_body = await self._forward(request, body)
        if fault is None:
            self._record(request, op, None, forwarded=True, status=status)
            return _reply(request, status, headers, upstream_body)
        if isinstance(fault, ErrorReply):
            self._record(request, op, fault, forwarded=True, status=fault.status)
            return _error(fault)
        if isinstance(fault, ResetResponse):
            self._record(request, op, fault, forwarded=True, status=None)
            return await _partial(request, status, headers, upstream_body, fault.after_bytes, True)
        assert isinstance(fault, TruncateResponse)
        self._record(request, op, fault, forwarded=True, status=status)
        return await _partial(request, status, headers, upstream_body, fault.keep_bytes, False)

    async def _hold(self, seconds: float) -> bool:
        """Wait `seconds` or until released; False if the proxy stops meanwhile.

        A client that vanished while its request body was only half read is not
        noticed here (reading is paused), hence the explicit stop.
        """
        assert self._release is not None and self._stopping is not None
        waiters = [
            asyncio.ensure_future(self._release.wait()),
            asyncio.ensure_future(self._stopping.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return not self._stopping.is_set()

    async def _forward(
        self, request: web.Request, body: bytes, *, strip_checksums: bool = False
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        url = self.upstream.with_path(request.raw_path.split("?", 1)[0], encoded=True)
        if request.query_string:
            url = URL(f"{url}?{request.raw_path.split('?', 1)[1]}", encoded=True)
        assert self._session is not None
        dropped = set(_DROP_REQUEST)
        if strip_checksums:
            dropped |= {"content-md5", "x-amz-content-sha256", "x-amz-checksum-crc32"}
        if self.strip_conditions:
            dropped |= {"if-none-match", "if-match"}
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in dropped]
        async with self._session.request(
            request.method, url, headers=headers, data=io.BytesIO(body), allow_redirects=False
        ) as upstream:
            payload = await upstream.read()
            kept = [
                (k, v)
                for k, v in upstream.headers.items()
                if k.lower() not in _DROP_RESPONSE
                or (request.method == "HEAD" and k.lower() == "content-length")
            ]
            return upstream.status, kept, payload


async def _read_some(request: web.Request, n: int) -> bytes:
    """Up to `n` bytes of the request body (fewer if it is shorter)."""
    data = b""
    while len(data) < n:
        chunk = await request.content.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _reply(
    request: web.Request, status: int, headers: Sequence[tuple[str, str]], body: bytes
) -> web.Response:
    response = web.Response(status=status, body=body if request.method != "HEAD" else None)
    for key, value in headers:
        response.headers.add(key, value)
    return response


def _error(fault: ErrorReply) -> web.Response:
    return web.Response(
        status=fault.status,
        body=error_body(fault.code, fault.message),
        content_type="application/xml",
    )


def _reset(request: web.Request) -> web.Response:
    """Reset the connection (RST, not FIN); aiohttp then finds nowhere to write the reply."""
    _end(request.transport, reset=True)
    return web.Response(status=500)


async def _partial(
    request: web.Request,
    status: int,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    keep: int,
    reset: bool,
) -> web.StreamResponse:
    """Send the headers with the full length and `keep` body bytes, then reset or close."""
    transport = request.transport
    if not 0 < keep < len(body):  # nothing to cut short: send nothing at all
        _end(transport, reset)
        return web.Response(status=500)
    response = web.StreamResponse(status=status)
    for key, value in headers:
        if key.lower() != "content-length":
            response.headers.add(key, value)
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[:keep])
    _end(transport, reset)
    return response


def _end(transport: asyncio.Transport | None, reset: bool) -> None:
    """Reset the connection (RST) or close it (FIN)."""
    if transport is None:
        return
    if reset:
        transport.abort()
    else:
        transport.close()


__all__ = [
    "TRANSIENT_FAULTS",
    "Delay",
    "ErrorReply",
    "Fault",
    "FaultProxy",
    "OneOf",
    "ResetRequest",
    "ResetResponse",
    "Rule",
    "Seen",
    "TruncateResponse",
    "TruncateUpstream",
    "error_body",
    "operation",
]
