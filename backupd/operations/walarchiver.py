"""Continuous WAL archiving of a physical job, supervised by the daemon.

Two loops per job, under one task:

- the receiver runs `pg_receivewal --slot S --synchronous` into a spool
  directory (created along with the physical replication slot if missing),
  and restarts it with capped exponential backoff whenever it exits (server
  restart, network, a promoted server on a new timeline). The slot holds the
  WAL on the server while backupd is down, so nothing is lost across a daemon
  restart; pg_receivewal continues from the spool, or from the slot when the
  spool is empty.
- the uploader stores every completed segment and `.history` file of the spool
  in every storage of the job (`wal.push`: compressed, encrypted, checked,
  never overwritten with other bytes) and only then deletes it from the spool.
  Every PARTIAL_EVERY seconds it also stores a copy of the growing segment as
  `{segment}.partial` (the one object that is replaced: a later copy holds the
  same WAL and more), so the recovery point stays seconds behind the server
  even when a quiet server takes hours to fill a segment.

Spool disk: a 16 MiB growing segment, plus completed ones while storage is
unreachable (each 16 MiB; nothing is dropped, the spool grows until storage
comes back). The lag metric measures how old the oldest WAL that is on the
server but not in storage can be.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol

import asyncpg
import structlog

from backupd.catalog import walindex
from backupd.catalog.listing import scan_backups
from backupd.config.model import Job, PostgresSource
from backupd.errors import BackupdError, NotFound
from backupd.operations import wal, walchain
from backupd.sources import postgres
from backupd.storage.base import Store

log = structlog.get_logger("backupd.walarchiver")

POLL = 0.5  # seconds between looks at the spool
PARTIAL_EVERY = 5.0  # seconds between copies of the growing segment
LAG_EVERY = 2.0  # seconds between lag measurements
WINDOW_EVERY = 60.0  # seconds between computations of the restorable window (a listing)
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
STABLE_AFTER = 60.0  # a receiver that ran this long resets the backoff
DEFAULT_STATE_DIR = "/var/lib/backupd"


class WalMetrics(Protocol):
    def wal_archived(self, job: str, segments: int, ts: float) -> None: ...
    def wal_configured(self, job: str, max_lag: float) -> None: ...
    def wal_lag(self, job: str, seconds: float) -> None: ...
    def restorable_window(self, job: str, earliest: float | None, latest: float | None) -> None: ...


def slot_name(job: Job) -> str:
    if job.wal is not None and job.wal.slot:
        return job.wal.slot
    return ("backupd_" + re.sub(r"[^a-z0-9_]", "_", job.name.lower()))[:63]


def spool_dir(job: Job) -> Path:
    """The job's spool: `wal.spool`, else {$STATE_DIRECTORY or /var/lib/backupd}/wal/{job}."""
    if job.wal is not None and job.wal.spool:
        return Path(job.wal.spool)
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0] or DEFAULT_STATE_DIR
    return Path(state) / "wal" / job.name


class WalArchiver:
    def __init__(
        self,
        job: Job,
        source: PostgresSource,
        stores: Callable[[], Awaitable[Mapping[str, Store]]],
        metrics: WalMetrics | None = None,
    ) -> None:
        self.job = job
        self.source = source
        self._stores = stores
        self.metrics = metrics
        self.spool = spool_dir(job)
        self.slot = slot_name(job)
        self.stored_end: int | None = None  # LSN up to which storage holds the WAL
        self.caught_up_at = time.time()  # when storage last held all the server wrote
        self._partial_sent: tuple[str, int, float] | None = None  # name, size, mtime
        self._partial_at = 0.0
        self._conn: asyncpg.Connection | None = None
        self._positions: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)

    async def run(self) -> None:
        """Archive until cancelled."""
        await asyncio.to_thread(self.spool.mkdir, mode=0o700, parents=True, exist_ok=True)
        log.info("wal_archiver_started", job=self.job.name, slot=self.slot, spool=str(self.spool))
        if self.metrics is not None and self.job.wal is not None:
            self.metrics.wal_configured(self.job.name, self.job.wal.max_lag)
        await self._warn_if_unbounded()
        try:
            await asyncio.gather(self._receive_forever(), self._upload_forever())
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._conn.close(timeout=2))

    async def drop_stale_partials(self) -> list[str]:
        """HA: before streaming again after another node archived, delete each growing
        segment of the spool whose completed segment the archive already holds.

        pg_receivewal resumes from the newest segment of its spool; a `.partial` left
        when this node last streamed (it died or lost the claim) may be far behind the
        slot, and the server may have removed that WAL by now: pg_receivewal would fail
        on every restart. Without it, pg_receivewal starts from the slot."""
        stores = await self._stores()
        store = next(iter(stores.values()))
        dropped = []
        for path in sorted(await asyncio.to_thread(lambda: list(self.spool.iterdir()))):
            segment = path.name[:24]
            if path.name != segment + ".partial" or not walindex.SEGMENT_RE.fullmatch(segment):
                continue
            try:
                await walindex.read_entry(store, self.job.name, segment)
            except NotFound:
                continue
            await asyncio.to_thread(path.unlink, True)
            dropped.append(path.name)
        if dropped:
            log.info("wal_stale_partial_dropped", job=self.job.name, files=dropped)
        return dropped

    async def _warn_if_unbounded(self) -> None:
        """Say so when the slot may fill the server's disk while backupd is away."""
        from backupd.operations import physical

        try:
            password = self.source.password.resolve() if self.source.password else None
            server = await physical.preflight(self.source, password)
        except BackupdError as exc:
            log.warning("wal_source_not_ready", job=self.job.name, error=str(exc))
            return
        if server.max_slot_wal_keep_size < 0:
            log.warning(
                "wal_slot_unbounded",
                job=self.job.name,
                slot=self.slot,
                note="max_slot_wal_keep_size is unlimited: while backupd is down the slot "
                "keeps WAL on the server until its disk fills; set a limit",
            )

    # -- the receiver --------------------------------------------------------------------

    async def _receive_forever(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            started = time.monotonic()
            try:
                await self._receive_once()
                error = "pg_receivewal exited"
            except BackupdError as exc:
                error = str(exc)
            if time.monotonic() - started > STABLE_AFTER:
                delay = BACKOFF_FIRST
            log.warning("wal_receiver_stopped", job=self.job.name, error=error, retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _receive_once(self) -> None:
        password = self.source.password.resolve() if self.source.password else None
        tool = postgres.find_tool("pg_receivewal", self.source.pg_bin_dir, 0)
        common = [str(tool.path), "--no-password", f"--dbname={self.source.dsn}"]
        with postgres.passfile_env(password, self.source.dsn) as env:
            await self._tool(
                [*common, "--create-slot", "--if-not-exists", f"--slot={self.slot}"], env
            )
            argv = [
                *common,
                f"--directory={self.spool}",
                f"--slot={self.slot}",
                "--synchronous",  # flushed at once, and the slot advances only past that
                "--no-loop",  # backupd restarts it, with backoff and a log line
            ]
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            async with postgres.spawn(argv, env, devnull, "pg_receivewal") as proc:
                log.info("wal_receiver_running", job=self.job.name, pid=proc.proc.pid)
                rc = await proc.wait()
                raise BackupdError(postgres.exit_error(proc, rc))

    async def _tool(self, argv: list[str], env: dict[str, str]) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        async with postgres.spawn(argv, env, devnull, "pg_receivewal") as proc:
            rc = await proc.wait()
            if rc != 0:
                raise BackupdError(postgres.exit_error(proc, rc))

    # -- the uploader --------------------------------------------------------------------

    async def _upload_forever(self) -> None:
        last_lag = last_window = 0.0
        await self._first_lag()
        while True:
            try:
                await self.upload_ready()
            except BackupdError as exc:
                log.warning("wal_upload_failed", job=self.job.name, error=str(exc))
            if time.monotonic() - last_lag >= LAG_EVERY:
                last_lag = time.monotonic()
                await self._measure_lag()
            if time.monotonic() - last_window >= WINDOW_EVERY:
                last_window = time.monotonic()
                await self._report_window()
            await asyncio.sleep(POLL)

    async def _first_lag(self) -> None:
        """Until the first upload, storage holds WAL up to its newest segment, archived when
        its index says: the lag counts from there (the daemon may have been down)."""
        try:
            stores = await self._stores()
            store = next(iter(stores.values()))
            archive = await walchain.scan(store, self.job.name)
            newest = archive.newest
            if newest is None:
                return
            segno, tli = newest
            entry = await walindex.read_entry(store, self.job.name, archive.name_of(segno, tli))
            partial = archive.partials.get(segno + 1)
            end = (segno + 1) * walindex.SEGMENT_SIZE
            if partial is not None:
                entry = await walindex.read_entry(store, self.job.name, partial)
            self.stored_end = end
            self.caught_up_at = entry.archived.timestamp()
        except (BackupdError, StopIteration) as exc:
            log.debug("first_lag_unknown", error=str(exc))

    async def _report_window(self) -> None:
        if self.metrics is None:
            return
        try:
            stores = await self._stores()
            store = next(iter(stores.values()))
            listing = await scan_backups(store, self.job.name)
            window = await walchain.window(store, self.job.name, listing.current)
        except (BackupdError, StopIteration) as exc:
            log.warning("restorable_window_unknown", job=self.job.name, error=str(exc))
            return
        self.metrics.restorable_window(
            self.job.name,
            window.earliest.timestamp() if window.earliest else None,
            window.latest.timestamp() if window.latest else None,
        )

    def _ready(self) -> tuple[list[Path], Path | None]:
        done, partial = [], None
        for path in sorted(self.spool.iterdir()):
            if walindex.SEGMENT_RE.fullmatch(path.name) or walindex.HISTORY_RE.fullmatch(path.name):
                done.append(path)
            elif path.name.endswith(".partial") and walindex.SEGMENT_RE.fullmatch(path.name[:24]):
                partial = path  # the newest one (sorted)
        return done, partial

    async def upload_ready(self) -> int:
        """Store every completed file of the spool, then the growing one; files stored."""
        done, partial = await asyncio.to_thread(self._ready)
        stores = await self._stores()
        for path in done:
            await wal.push(self.job, stores, path)
            await self._drop_partial_copy(stores, path.name)
            if walindex.SEGMENT_RE.fullmatch(path.name):
                _, segno = walindex.segment_number(path.name)
                self._advance((segno + 1) * walindex.SEGMENT_SIZE)
            await asyncio.to_thread(path.unlink)
            log.info("wal_archived", job=self.job.name, segment=path.name)
        if done and self.metrics is not None:
            self.metrics.wal_archived(self.job.name, len(done), time.time())
        if partial is not None and time.monotonic() - self._partial_at >= PARTIAL_EVERY:
            await self._push_partial(stores, partial)
        return len(done)

    def _advance(self, lsn: int) -> None:
        if self.stored_end is None or lsn > self.stored_end:
            self.stored_end = lsn

    async def _push_partial(self, stores: Mapping[str, Store], path: Path) -> None:
        try:
            st = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            return  # completed meanwhile: the next round stores it
        seen = (path.name, st.st_size, st.st_mtime)
        if seen == self._partial_sent:
            return
        # What the server confirmed flushed is in the file before we read it.
        flushed = await self._slot_position()
        raw = await asyncio.to_thread(_read_partial, path)
        if raw is None:
            return
        name = path.name  # {segment}.partial
        await wal.push_bytes(self.job, stores, name, raw, replace=True)
        self._partial_sent = seen
        self._partial_at = time.monotonic()
        if flushed is not None:
            _, segno = walindex.segment_number(name[:24])
            self._advance(min(flushed, (segno + 1) * walindex.SEGMENT_SIZE))
        if self.metrics is not None:
            self.metrics.wal_archived(self.job.name, 0, time.time())

    async def _drop_partial_copy(self, stores: Mapping[str, Store], name: str) -> None:
        """A completed segment supersedes its growing copy."""
        if not walindex.SEGMENT_RE.fullmatch(name):
            return
        for store in stores.values():
            await wal.delete_partial(store, self.job.name, name)

    # -- lag -----------------------------------------------------------------------------

    async def _sql(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            password = self.source.password.resolve() if self.source.password else None
            self._conn = await postgres.connect(self.source.dsn, password)
        return self._conn

    async def _slot_position(self) -> int | None:
        try:
            conn = await self._sql()
            value = await conn.fetchval(
                "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                self.slot,
            )
        except (BackupdError, OSError, asyncpg.PostgresError) as exc:
            log.debug("slot_position_unknown", error=str(exc))
            self._conn = None
            return None
        return walindex.parse_lsn(value) if value else None

    async def _measure_lag(self) -> None:
        """The lag: how old the oldest WAL on the server but not in storage can be.

        Every measurement notes (time, the server's written position). Storage
        holding WAL up to `stored_end` holds everything the server had written at
        the latest noted time whose position is <= stored_end, so whatever is
        missing was written after it: the lag is the time since then (0 when the
        server's position now is stored). Under sustained writes the server is
        never "caught up", yet the lag stays the few seconds storage trails by.
        """
        try:
            conn = await self._sql()
            server = walindex.parse_lsn(
                str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
            )
        except (BackupdError, OSError, asyncpg.PostgresError) as exc:
            log.debug("server_position_unknown", error=str(exc))
            self._conn = None
            server = None
        now = time.time()
        if server is not None:
            self._positions.append((now, server))
        if self.stored_end is not None:
            while self._positions and self._positions[0][1] <= self.stored_end:
                self.caught_up_at = max(self.caught_up_at, self._positions.popleft()[0])
        if self.metrics is not None:
            self.metrics.wal_lag(self.job.name, now - self.caught_up_at)


def _read_partial(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(walindex.SEGMENT_SIZE + 1)
    except FileNotFoundError:
        return None


__all__ = ["Archivers", "Duty", "WalArchiver", "slot_name", "spool_dir"]


class Duty(Protocol):
    """`Coordinator.duty` bound to the config: the job's WAL claim (HA), yields None if
    another node holds it."""

    def __call__(self, job: Job) -> contextlib.AbstractAsyncContextManager[object | None]: ...


class Archivers:
    """The daemon's archivers: one task per physical job, replaced when its config changes.

    With `duty` (HA, several daemons on one config) a job's archiver runs only on the
    node holding the job's claim `.backupd-claims/wal-JOB`; the others retry the claim
    every `duty_retry` seconds and take it over once its holder stops renewing it."""

    def __init__(
        self,
        stores: Callable[[Job], Awaitable[Mapping[str, Store]]],
        metrics: WalMetrics | None,
        duty: Duty | None = None,
        duty_retry: float = 5.0,
    ) -> None:
        self._stores = stores
        self._metrics = metrics
        self._duty = duty
        self._duty_retry = duty_retry
        self._tasks: dict[str, tuple[tuple[Job, PostgresSource], asyncio.Task[None]]] = {}

    def update(self, jobs: Mapping[str, Job], sources: Mapping[str, PostgresSource]) -> None:
        wanted = {
            name: (job, sources[job.source]) for name, job in jobs.items() if job.kind == "physical"
        }
        for name in list(self._tasks):
            key, task = self._tasks[name]
            if wanted.get(name) != key:
                task.cancel()
                del self._tasks[name]
        for name, key in wanted.items():
            if name not in self._tasks:
                job, source = key
                archiver = WalArchiver(
                    job, source, functools.partial(self._stores, job), self._metrics
                )
                task = asyncio.create_task(self._supervise(archiver), name=f"wal-{name}")
                self._tasks[name] = (key, task)

    async def _supervise(self, archiver: WalArchiver) -> None:
        """Keep an archiver running: a crash is logged and it starts again after a pause."""
        delay = BACKOFF_FIRST
        while True:
            try:
                if self._duty is None:
                    await archiver.run()
                elif not await self._run_under_claim(archiver):
                    await asyncio.sleep(self._duty_retry)  # another node archives this job
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error(
                    "wal_archiver_crashed", job=archiver.job.name, error=str(exc), exc_info=True
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _run_under_claim(self, archiver: WalArchiver) -> bool:
        """HA: archive while this node holds the job's WAL claim; False if another node does.

        The claim's keeper cancels the task that entered it when a renewal is refused
        or overdue: that is an inner task here, so a lost claim stops pg_receivewal and
        the uploader (the slot is free for the node that took the claim over) and this
        supervisor goes back to watching the claim."""
        assert self._duty is not None
        duty = self._duty

        async def hold() -> bool:
            async with duty(archiver.job) as claim:
                if claim is None:
                    return False
                log.info("wal_claim_held", job=archiver.job.name)
                await asyncio.to_thread(
                    archiver.spool.mkdir, mode=0o700, parents=True, exist_ok=True
                )
                await archiver.drop_stale_partials()
                await archiver.run()
            return True

        inner = asyncio.create_task(hold(), name=f"wal-claim-{archiver.job.name}")
        try:
            return await inner
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this supervisor is being stopped (config change, shutdown)
            log.warning("wal_claim_lost", job=archiver.job.name)
            return True

    async def aclose(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
