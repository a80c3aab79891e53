"""Background tasks fail loudly (issue 15, item 5): logged at once, and a long-lived
task that stops makes the daemon unhealthy."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from backupd.daemon.supervise import Supervisor


async def crash() -> None:
    await asyncio.sleep(0)
    raise RuntimeError("watchdog broke")


async def forever() -> None:
    await asyncio.Event().wait()


async def test_a_crashed_long_lived_task_is_logged_and_unhealthy() -> None:
    tasks = Supervisor()
    with capture_logs() as logs:
        task = tasks.spawn(crash(), "watchdog", long_lived=True)
        await asyncio.wait([task])
    assert not tasks.healthy()
    assert tasks.failed == {"watchdog": "RuntimeError: watchdog broke"}
    (event,) = [e for e in logs if e["event"] == "task_failed"]
    assert event["task"] == "watchdog" and event["log_level"] == "error"


async def test_a_long_lived_task_that_returns_is_a_failure_too() -> None:
    tasks = Supervisor()

    async def returns() -> None:
        await asyncio.sleep(0)

    await asyncio.wait([tasks.spawn(returns(), "sweeper", long_lived=True)])
    assert tasks.failed == {"sweeper": "returned"}


async def test_a_one_off_task_failure_is_logged_but_health_stays() -> None:
    tasks = Supervisor()
    with capture_logs() as logs:
        await asyncio.wait([tasks.spawn(crash(), "reload")])
    assert tasks.healthy()
    assert [e["task"] for e in logs if e["event"] == "task_failed"] == ["reload"]


async def test_cancellation_at_shutdown_is_not_a_failure() -> None:
    tasks = Supervisor()
    with capture_logs() as logs:
        tasks.spawn(forever(), "watchdog", long_lived=True)
        tasks.spawn(forever(), "sweeper", long_lived=True)
        await asyncio.sleep(0)
        await tasks.cancel_all()
    assert tasks.healthy()
    assert not [e for e in logs if e["event"] == "task_failed"]
