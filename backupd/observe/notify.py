"""Notifications about runs: webhook (JSON), Slack-compatible text, healthchecks pings.

`Notifications.notify()` only schedules: the sends run in background tasks so
a slow or dead endpoint never delays a backup, and a failed notification
never fails a run. Each send is bounded: `timeout` per attempt, at most
`attempts` attempts (connection errors, timeouts, 429 and 5xx are retried
with a short jittered backoff by stamina), so a send ends within about
`attempts * timeout + 10 s`. A send given up on is logged (with the URL's
origin only when the URL is a plain string, nothing of it when it is a
secret: webhook paths are often tokens) and counted in
`backupd_notify_failures_total{notifier}`. Redirects are not followed: a 3xx
answer is a failure naming its status. aiohttp's errors carry the URL, so each
attempt converts them into backupd errors that name only what went wrong
before the retry library (which logs what it retries) sees them.

Events: `start`, `success`, `failure`, `recovered`, `retry`. Deciding that a
success is a recovery (the previous run failed) is the runner's job; it then
passes `recovered` instead of `success`. A recovery is a success, so it goes
to notifiers subscribed to `success` or to `recovered` (once, as
`recovered`): a healthchecks check that only hears `success` must still be
told the job is healthy again, and a notifier that only wants `recovered`
does not hear every routine success.

Payloads:

- webhook: POST of the `RunEvent` fields as JSON, plus `backupd_version`;
- slack: POST of `{"text": "<one line>"}`;
- healthchecks: POST to `URL/start` (start), `URL` (success, recovered) or
  `URL/fail` (failure, the error text as body); `retry` sends nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import stamina
import structlog

from backupd import __version__
from backupd.config import model as config
from backupd.errors import BackupdError, TransientError

if TYPE_CHECKING:
    import aiohttp

    from backupd.observe.metrics import Metrics  # prometheus_client: not for one-shot runs

log = structlog.get_logger(__name__)

Event = Literal["start", "success", "failure", "recovered", "retry"]

MAX_BODY_ERROR_CHARS = 10_000  # healthchecks keeps 100 kB; pg_dump stderr can be longer
MAX_LINE_ERROR_CHARS = 500  # a chat line, not a log file


@dataclass(frozen=True, slots=True)
class RunEvent:
    """What a notification says about a run; also the webhook's JSON body."""

    event: Event
    job: str
    run_id: str
    result: str | None = None  # success | failure | cancelled once the run ended
    error: str | None = None
    size_bytes: int | None = None
    duration_seconds: float | None = None
    attempt: int = 1
    trigger: str = "schedule"


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request a notifier wants sent."""

    method: str
    url: str = dataclasses.field(repr=False)  # may be a secret
    body: bytes
    content_type: str


class Notifier:
    """One `[notify.NAME]` entry: which events it wants and what it sends for them."""

    def __init__(self, cfg: config.Notifier) -> None:
        self.name = cfg.name
        self.type = cfg.type
        self.on = cfg.on
        self.timeout = cfg.timeout
        self._url = cfg.url

    def wants(self, event: str) -> bool:
        return event in self.on or (event == "recovered" and "success" in self.on)

    @property
    def target(self) -> str:
        """Where this notifier sends, safe for logs."""
        if isinstance(self._url, config.Secret):
            return "secret url"
        parts = urlsplit(self._url)
        return f"{parts.scheme}://{parts.hostname}"

    def request(self, event: RunEvent) -> Request | None:
        """The request for `event`, or None when this type has nothing to say about it.

        Resolves a secret URL now, so a rotated secret is picked up; raises
        `SecretError` when it cannot be read.
        """
        url = self._url.resolve() if isinstance(self._url, config.Secret) else self._url
        if self.type == "webhook":
            body = dataclasses.asdict(event) | {"backupd_version": __version__}
            return Request("POST", url, json.dumps(body).encode(), "application/json")
        if self.type == "slack":
            body = {"text": summary(event)}
            return Request("POST", url, json.dumps(body).encode(), "application/json")
        base = url.rstrip("/")
        text = "text/plain; charset=utf-8"
        if event.event == "start":
            return Request("POST", f"{base}/start", b"", text)
        if event.event in ("success", "recovered"):
            return Request("POST", base, summary(event).encode(), text)
        if event.event == "failure":
            error = (event.error or summary(event))[:MAX_BODY_ERROR_CHARS]
            return Request("POST", f"{base}/fail", error.encode(), text)
        return None


def summary(event: RunEvent) -> str:
    """One human line about the event, e.g. for Slack."""
    head = f"backupd: job {event.job}"
    tail = f"(run {event.run_id}, {event.trigger})"
    error = _one_line(event.error or "unknown error")
    if event.event == "start":
        return f"{head} started {tail}"
    if event.event == "retry":
        return f"{head} attempt {event.attempt} failed, retrying {tail}: {error}"
    if event.event == "failure":
        return f"{head} FAILED after {_attempts(event.attempt)} {tail}: {error}"
    done = f"in {_duration(event.duration_seconds)}, {_size(event.size_bytes)}"
    if event.event == "recovered":
        return f"{head} recovered: succeeded {done} after earlier failures {tail}"
    return f"{head} succeeded {done} {tail}"


def _one_line(text: str) -> str:
    line = " | ".join(part.strip() for part in text.splitlines() if part.strip())
    if len(line) > MAX_LINE_ERROR_CHARS:
        line = line[: MAX_LINE_ERROR_CHARS - 3] + "..."
    return line


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown time"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _size(n: int | None) -> str:
    if n is None:
        return "unknown size"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _redact(exc: Exception, timeout: float) -> BackupdError:
    """`exc` as a backupd error whose message holds nothing of the URL.

    aiohttp's exceptions carry the URL (`request_info`, `history`, their str
    and repr, a redirect's Location), and the retry library logs the repr of
    what it retries: nothing of them may leave `_post`. Only the kind of
    failure is kept; the caller's log line adds the notifier's name.
    """
    import aiohttp  # imported with the first webhook: a run that sends none does not pay

    if isinstance(exc, BackupdError):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert = exc.certificate_error
        reason = getattr(cert, "verify_message", None) or type(cert).__name__
        return BackupdError(f"TLS certificate not accepted: {reason}")
    if isinstance(exc, aiohttp.ClientSSLError):
        ssl_error = exc.os_error
        reason = getattr(ssl_error, "reason", None) or type(ssl_error).__name__
        return TransientError(f"TLS handshake failed: {reason}")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TransientError(f"cannot connect within {timeout:g}s")
    if isinstance(exc, TimeoutError):
        return TransientError(f"no answer within {timeout:g}s")
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError | ValueError):
        return BackupdError("unsupported or invalid URL (http or https with a host is needed)")
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        reason = os.strerror(os_error.errno) if os_error.errno else type(os_error).__name__
        return TransientError(f"cannot connect: {reason}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return TransientError("the server closed the connection without answering")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return TransientError(f"request failed: {type(exc).__name__}")
    return BackupdError(f"request failed: {type(exc).__name__}")


class Notifications:
    """Sends run events to the configured notifiers, in the background."""

    WAIT_INITIAL = 0.5
    WAIT_MAX = 5.0

    def __init__(
        self,
        notifiers: Mapping[str, config.Notifier],
        *,
        metrics: Metrics | None = None,
        attempts: int = 3,
    ) -> None:
        self._notifiers = {name: Notifier(cfg) for name, cfg in notifiers.items()}
        self._metrics = metrics
        self._attempts = attempts
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        if metrics is not None:
            metrics.notifiers_configured(self._notifiers)

    def notify(self, event: Event, notifiers: Sequence[str], payload: RunEvent) -> None:
        """Schedule `event` to each of `notifiers` (a job's `notify`) that wants it.

        Returns at once and never raises. `event` wins over `payload.event`.
        """
        try:
            if self._closed:
                log.warning("notify_dropped_after_close", run_event=event, job=payload.job)
                return
            payload = dataclasses.replace(payload, event=event)
            for name in notifiers:
                notifier = self._notifiers.get(name)
                if notifier is None:
                    log.warning("notify_unknown_notifier", notifier=name, job=payload.job)
                elif notifier.wants(event):
                    task = asyncio.get_running_loop().create_task(
                        self._send(notifier, payload), name=f"notify {name} {event}"
                    )
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except Exception:
            log.exception("notify_schedule_failed", run_event=event, job=payload.job)

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to `timeout` s for sends in flight; True if none is left.

        A parameter rather than `asyncio.timeout()` around the call: running
        out of time is an answer here (False), not an error, and the sends
        keep going until `aclose()`.
        """
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        return not self._tasks

    async def aclose(self) -> None:
        """Cancel sends still in flight (drain first to let them finish) and close the session."""
        self._closed = True
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _send(self, notifier: Notifier, event: RunEvent) -> None:
        try:
            request = notifier.request(event)
            if request is None:
                return
            # The retry library logs each retry with the error's repr: `_post`
            # raises only redacted errors, and the context names the notifier.
            structlog.contextvars.bind_contextvars(notifier=notifier.name)
            async for attempt in stamina.retry_context(
                on=lambda exc: isinstance(exc, BackupdError) and exc.transient,
                attempts=self._attempts,
                timeout=None,
                wait_initial=self.WAIT_INITIAL,
                wait_max=self.WAIT_MAX,
            ):
                with attempt:
                    await self._post(notifier, request)
        except Exception as exc:  # a background send must end here, whatever happened
            log.warning(
                "notify_failed",
                notifier=notifier.name,
                target=notifier.target,
                run_event=event.event,
                job=event.job,
                error=str(exc) if isinstance(exc, BackupdError) else type(exc).__name__,
            )
            if self._metrics is not None:
                self._metrics.notify_failed(notifier.name)
        else:
            log.debug("notify_sent", notifier=notifier.name, run_event=event.event)

    async def _post(self, notifier: Notifier, request: Request) -> None:
        """One attempt; raises only `BackupdError`s that carry nothing of the URL.

        Redirects are not followed: a 3xx is a failure naming its status (see
        README, Notifications). The aiohttp exception is converted outside its
        `except` block, so it is not even kept as the new error's context.
        """
        import aiohttp

        if self._session is None:
            # trust_env: honour HTTPS_PROXY/NO_PROXY from the service's environment.
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": f"backupd/{__version__}"}, trust_env=True
            )
        status = 0
        failure: Exception | None = None
        try:
            async with self._session.request(
                request.method,
                request.url,
                data=request.body,
                headers={"Content-Type": request.content_type},
                timeout=aiohttp.ClientTimeout(total=notifier.timeout),
                allow_redirects=False,
            ) as response:
                status = response.status
        except Exception as exc:  # converted below, outside this block
            failure = exc
        if failure is not None:
            error = _redact(failure, notifier.timeout)
            del failure  # the original holds the URL; only the redacted error goes on
            raise error
        if status == 429 or status >= 500:
            raise TransientError(f"HTTP {status}")
        if 300 <= status < 400:
            raise BackupdError(f"HTTP {status}: redirects are not followed, set the final URL")
        if status >= 400:
            raise BackupdError(f"HTTP {status}")
