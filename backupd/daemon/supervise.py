"""Background tasks that cannot fail silently.

A bare `asyncio.create_task` keeps its exception until the task is garbage
collected, and then at most prints a warning: a crashed watchdog task would
quietly stop sending `WATCHDOG=1`, a crashed sweeper would stop sweeping.
`Supervisor.spawn` logs every failure the moment it happens (`task_failed`,
with the traceback at debug level), and a failed or returned *long-lived*
task makes `healthy()` false, so `/healthz` answers 503 and systemd or the
orchestrator restarts the daemon. Cancellation (shutdown) is not a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger("backupd.supervise")


class Supervisor:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failed: dict[str, str] = {}  # long-lived task name -> why it stopped

    def spawn(
        self, coro: Coroutine[Any, Any, Any], name: str, *, long_lived: bool = False
    ) -> asyncio.Task[Any]:
        """Start `coro` as a task; a long-lived one must run until cancelled."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, long_lived))
        return task

    def _done(self, task: asyncio.Task[Any], long_lived: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None and not long_lived:
            return
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "returned"
        if long_lived:
            self.failed[task.get_name()] = why
        log.error(
            "task_failed",
            task=task.get_name(),
            error=why,
            long_lived=long_lived,
            note="the daemon is unhealthy (/healthz 503) until restarted" if long_lived else None,
        )
        if exc is not None:
            log.debug("task_failed_traceback", task=task.get_name(), exc_info=exc)

    def healthy(self) -> bool:
        return not self.failed

    async def cancel_all(self) -> None:
        """Cancel every task still running and wait for them (shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
