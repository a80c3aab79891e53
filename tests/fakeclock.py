"""A fake `Clock` for tests: time moves only when the test says so.

`advance` moves wall and monotonic time together, waking sleepers one
deadline at a time and waiting until each woken coroutine has gone back to
sleep, so what a test observes after `await clock.advance(...)` does not
depend on event-loop scheduling. `jump` steps only the wall clock (an NTP
step); `stall` moves time without waking anyone (a blocked event loop).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import datetime, timedelta

SETTLE_TIMEOUT = 5.0  # real seconds; only reached when a woken task never sleeps again


class FakeClock:
    def __init__(self, start: datetime, monotonic: float = 1000.0) -> None:
        self._wall = start
        self._mono = monotonic
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._registrations = 0
        self._registered = asyncio.Event()

    def now(self) -> datetime:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self._mono + seconds, next(self._order), fut)
        heapq.heappush(self._sleepers, entry)
        self._registrations += 1
        self._registered.set()
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()

    def jump(self, seconds: float) -> None:
        """Step the wall clock only, as NTP or an operator would."""
        self._wall += timedelta(seconds=seconds)

    def stall(self, seconds: float) -> None:
        """Let time pass without waking anyone; the next `advance` wakes them late."""
        self._move(self._mono + seconds)

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Wait until `count` coroutines sleep on this clock (e.g. a started loop)."""
        async with asyncio.timeout(SETTLE_TIMEOUT):
            while self.sleepers < count:
                self._registered.clear()
                await self._registered.wait()

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline passes, in order."""
        target = self._mono + seconds
        while True:
            self._drop_cancelled()
            if not self._sleepers or self._sleepers[0][0] > target:
                break
            self._move(max(self._sleepers[0][0], self._mono))
            woken = 0
            while self._sleepers and self._sleepers[0][0] <= self._mono:
                _, _, fut = heapq.heappop(self._sleepers)
                if not fut.done():
                    fut.set_result(None)
                    woken += 1
            await self._settle(woken)
        self._move(max(target, self._mono))

    async def _settle(self, woken: int) -> None:
        """Wait until the `woken` sleepers have slept again."""
        goal = self._registrations + woken
        async with asyncio.timeout(SETTLE_TIMEOUT):
            while self._registrations < goal:
                self._registered.clear()
                await self._registered.wait()

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)

    def _move(self, mono: float) -> None:
        self._wall += timedelta(seconds=mono - self._mono)
        self._mono = mono
