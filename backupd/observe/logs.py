"""structlog set-up: JSON lines by default, the console renderer on a terminal.

Runs bind `job` and `run_id` with `bind_contextvars`, so every event of a run
carries them without being passed around.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def setup(level: str = "info", fmt: str | None = "json", stream: Any = None) -> None:
    """Configure structlog (and stdlib logging for libraries) once per process.

    `fmt=None` picks the console renderer on a terminal and JSON otherwise.
    botocore and aiobotocore stay at WARNING whatever the level: their debug
    output includes request headers, which carry credentials.
    """
    stream = stream or sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    numeric = _LEVELS.get(level, logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            _exc_info_at_debug(numeric),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(
        level=max(numeric, logging.INFO),
        stream=stream,
        format="%(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("botocore", "aiobotocore", "urllib3", "asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _exc_info_at_debug(level: int) -> Any:
    """Tracebacks only at debug level: errors are logged as their message."""
    formatter = structlog.processors.format_exc_info

    def process(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
        if level <= logging.DEBUG:
            return dict(formatter(logger, name, event))
        event.pop("exc_info", None)
        return event

    return process
