"""`backupd run`: start-up order, signals, reload, shutdown. Composes; holds no domain logic.

Start-up: load and validate the config (exit 2 if invalid), set up logging and
metrics, bind the control socket and the HTTP listener, start the scheduler,
and only then tell systemd READY=1. Storage is scanned in the background
(metrics of existing backups, catch-up runs, the sweeper), so a slow bucket
never delays readiness.

Signals enter in one place: SIGTERM/SIGINT set the stop event (a second one
stops running jobs at once), SIGHUP reloads. Shutdown stops scheduling, lets
running jobs finish within `shutdown_grace`, stops what is left (pg_dump
killed, uploads aborted within `CLEANUP_DEADLINE`, runs recorded as failed:
"interrupted by daemon shutdown"), removes the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import structlog

from backupd import __version__
from backupd.catalog.manifest import now_utc, rfc3339
from backupd.config.file import load_config
from backupd.config.model import Config, Job, node_name
from backupd.daemon.control import CommandError, ControlServer, Peer
from backupd.daemon.events import RunChange, notification
from backupd.daemon.ha import Claim, Coordinator, slot_of
from backupd.daemon.http import HttpServer
from backupd.daemon.maintenance import Maintenance
from backupd.daemon.runner import JobBusy, Run, Runner, StorePool
from backupd.daemon.scheduler import Schedule, ScheduleLoop, SystemClock
from backupd.daemon.supervise import Supervisor
from backupd.errors import BackupdError, ConfigError
from backupd.observe import logs
from backupd.observe.metrics import Metrics
from backupd.observe.notify import Notifications, RunEvent
from backupd.observe.overview import Inventory, one_line
from backupd.observe.systemd import Notifier as SystemdNotifier
from backupd.observe.systemd import watchdog_interval
from backupd.operations.backup import Trigger
from backupd.operations.prune import prune_after_success
from backupd.operations.walarchiver import Archivers, Duty

log = structlog.get_logger("backupd.daemon")

BACKUP, VERIFY = "backup:", "verify:"  # scheduler keys: one loop fires both kinds
PROGRESS_INTERVAL = 1.0  # seconds without an event before `trigger --wait` gets a "progress" one


class _Notify:
    """Observes the runner's changes and sends their notifications (the notifier set
    changes on reload)."""

    def __init__(self, notifications: Notifications, inventory: Inventory) -> None:
        self.notifications = notifications
        self.inventory = inventory

    def __call__(self, change: RunChange) -> None:
        event = notification(change)
        if event is None:
            return
        job, run = change.job, change.run
        if event == "failure" and run.manifest is not None:  # a partial backup was published
            self.inventory.record_backup(job.name, job.storage[0], run.manifest)
        self.notifications.notify(
            event,
            job.notify,
            RunEvent(
                event=event,
                job=job.name,
                run_id=run.run_id,
                result=run.state if run.done else None,
                error=run.error,
                size_bytes=run.size_bytes,
                duration_seconds=run.duration_seconds,
                attempt=max(run.attempts, 1),
                trigger=run.trigger.kind,
            ),
        )

    def verify_failed(self, job: Job, error: str) -> None:
        """A failed scheduled verification goes to the job's notifiers as a failure."""
        self.notifications.notify(
            "failure",
            job.notify,
            RunEvent(event="failure", job=job.name, run_id="verify", error=error, trigger="verify"),
        )


def schedule_entries(config: Config) -> dict[str, tuple[Schedule, float]]:
    entries: dict[str, tuple[Schedule, float]] = {}
    for job in config.jobs.values():
        if job.schedule:
            entries[BACKUP + job.name] = (Schedule(job.schedule, job.timezone), job.jitter)
        if job.verify is not None and job.verify.schedule:
            entries[VERIFY + job.name] = (Schedule(job.verify.schedule, job.timezone), 0.0)
    return entries


class Daemon:
    def __init__(self, config_path: str, log_level: str | None = None) -> None:
        self.config_path = config_path
        self.log_level = log_level
        self.config: Config
        self.metrics = Metrics()
        self.inventory = Inventory()
        self.systemd = SystemdNotifier()
        self.stop = asyncio.Event()
        self.tasks = Supervisor()
        self._started = time.monotonic()
        self._scheduler_task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._signals = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        self.config = load_config(self.config_path)  # ConfigError -> exit 2, nothing started
        daemon_cfg = self.config.daemon
        logs.setup(self.log_level or daemon_cfg.log_level, daemon_cfg.log_format)
        self.metrics.jobs_configured(self.config.jobs)
        self.node = node_name(daemon_cfg)
        structlog.contextvars.bind_contextvars(node=self.node)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self._cleanup_log, "stop", self.systemd.stopping)
            self.pool = StorePool()
            stack.push_async_callback(self._cleanup_log, "storage", self.pool.aclose)
            self.ha: Coordinator | None = None
            if daemon_cfg.ha.enabled:  # HA (issue 17): prove conditional writes first
                self.ha = Coordinator(self.pool, self.metrics, self.node)
                self.ha.on_takeover = self._taken_over
                await self.ha.self_test(self.config)
                stack.push_async_callback(self._cleanup_log, "claims", self.ha.shutdown)
            self.notifications = Notifications(self.config.notifiers, metrics=self.metrics)
            self._notify = _Notify(self.notifications, self.inventory)
            stack.push_async_callback(self._close_notifications)
            self.runner = Runner(
                self.config,
                self.pool,
                metrics=self.metrics,
                observers=[self._notify],
                after_success=self._after_success,
                node=self.node,
            )
            self.maintenance = Maintenance(
                self.runner,
                self.pool,
                self.metrics,
                on_verify_failed=self._notify.verify_failed,
                inventory=self.inventory,
                start_run=self._start_run,
                ha=self.ha,
            )
            self.control = ControlServer(
                daemon_cfg.socket,
                self.handle,
                mode=daemon_cfg.socket_mode,
                group=daemon_cfg.socket_group,
                allow_uids=daemon_cfg.allow_uids,
            )
            await self.control.start()
            stack.push_async_callback(self._cleanup_log, "socket", self.control.close)
            if daemon_cfg.http_listen:
                self.http = HttpServer(
                    daemon_cfg.http_listen, self.metrics, self, page=self.status_page
                )
                await self.http.start()
                stack.push_async_callback(self._cleanup_log, "http", self.http.close)
            self.scheduler = ScheduleLoop(
                SystemClock(),
                schedule_entries(self.config),
                self._fire,
                skipped=self._missed,
                on_next=self._next_changed,
            )
            self._scheduler_task = asyncio.create_task(self.scheduler.run(), name="scheduler")
            stack.push_async_callback(self._stop_scheduler)
            stack.push_async_callback(self._drain_runs)
            self._install_signals()
            stack.callback(self._remove_signals)
            self.tasks.spawn(self.maintenance.startup(self.config), "startup-scan")
            self.tasks.spawn(
                self.maintenance.sweep_forever(lambda: self.config), "sweeper", long_lived=True
            )
            self.tasks.spawn(self._watchdog(), "watchdog", long_lived=True)
            stack.push_async_callback(self.tasks.cancel_all)
            # issue 16: continuous WAL archiving of physical jobs (operations/walarchiver.py)
            self.archivers = Archivers(
                lambda job: self.pool.for_job(self.config, job),
                metrics=self.metrics,
                duty=self._wal_duty() if self.ha is not None else None,
                duty_retry=self.config.daemon.ha.lease / 3,
            )
            self.archivers.update(self.config.jobs, self.config.sources)
            stack.push_async_callback(self._cleanup_log, "wal", self.archivers.aclose)
            self.systemd.ready(self._status_line())
            log.info(
                "daemon_ready",
                version=__version__,
                jobs=len(self.config.jobs),
                socket=daemon_cfg.socket,
            )
            await self.stop.wait()
            log.info("daemon_stopping", grace_seconds=self.config.daemon.shutdown_grace)
            self.systemd.stopping()
        log.info("daemon_stopped")
        return 0

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _on_stop_signal(self, name: str) -> None:
        self._signals += 1
        log.info("signal_received", signal=name, count=self._signals)
        if self._signals > 1:
            self._grace_override = 0.0  # a second signal: stop running jobs now
            self.runner.interrupt(f"interrupted by daemon shutdown (second {name})")
        self.stop.set()

    def _on_reload_signal(self) -> None:
        log.info("signal_received", signal="SIGHUP")
        self.tasks.spawn(self.reload(), "reload")

    async def _stop_scheduler(self) -> None:
        if self._scheduler_task is not None:
            self._scheduler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler_task

    async def _drain_runs(self) -> None:
        grace = getattr(self, "_grace_override", self.config.daemon.shutdown_grace)
        await self.runner.shutdown(grace)
        await self.maintenance.shutdown()

    async def _close_notifications(self) -> None:
        await self.notifications.drain(5.0)
        await self.notifications.aclose()

    async def _cleanup_log(self, what: str, fn: Any) -> None:
        try:
            result = fn()
            if asyncio.iscoroutine(result):
                await result
        except Exception as exc:  # cleanup failures are logged, never raised
            log.warning("cleanup_failed", what=what, error=str(exc))

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        while True:
            if interval is not None and self.live():
                self.systemd.watchdog()
            self.systemd.status(self._status_line())
            await asyncio.sleep(interval if interval is not None else 30.0)

    def _status_line(self) -> str:
        running = len(self.runner.active())
        return f"{len(self.config.jobs)} jobs, {running} running"

    # -- scheduling ----------------------------------------------------------------------

    async def _fire(self, key: str, scheduled_at: Any) -> None:
        name = key.split(":", 1)[1]
        if key.startswith(VERIFY):
            self.maintenance.start_verify(self.config, name)
            return
        self._start_run(name, Trigger("schedule"), scheduled_at)

    def _start_run(self, name: str, trigger: Trigger, slot: datetime | None) -> None:
        """Start a scheduled or catch-up run of `slot`; in HA mode only once it is claimed."""
        slot = slot.astimezone(UTC) if slot is not None else None
        if self.ha is None or slot is None:
            try:
                self.runner.submit(name, trigger, scheduled_for=slot)
            except JobBusy:
                pass  # counted and logged by the runner
            except BackupdError as exc:
                log.warning("fire_failed", job=name, error=str(exc))
            return
        if self.runner.busy(name):  # as in single-daemon mode: never claim a slot it would skip
            with contextlib.suppress(BackupdError):
                self.runner.submit(name, trigger, scheduled_for=slot)  # JobBusy: counted, logged
            return
        self.tasks.spawn(self._claim_and_run(name, trigger, slot), f"claim-{name}")

    async def _claim_and_run(self, name: str, trigger: Trigger, slot: datetime) -> None:
        assert self.ha is not None
        config, job = self.config, self.config.jobs.get(name)
        if job is None:
            return
        run_id = secrets.token_hex(6)
        try:
            claim = await self.ha.claim_slot(config, job, slot_of(slot), run_id)
        except BackupdError as exc:
            log.error("claim_failed", job=name, slot=rfc3339(slot), error=str(exc))
            return
        if claim is None:
            return  # another node runs it; this one watches it (takes over if it stops)
        self._submit_claimed(name, trigger, slot, claim, run_id)

    def _submit_claimed(
        self, name: str, trigger: Trigger, slot: datetime | None, claim: Claim, run_id: str
    ) -> Run | None:
        try:
            return self.runner.submit(name, trigger, scheduled_for=slot, claim=claim, run_id=run_id)
        except BackupdError as exc:
            log.warning("fire_failed", job=name, error=str(exc))
            self.tasks.spawn(claim.finish("released"), "release-claim")
            return None

    def _wal_duty(self) -> Duty:
        """HA: a physical job's WAL archiver (pg_receivewal on its slot, which one consumer
        only can stream from) runs on the node holding the claim `wal-JOB`."""
        ha = self.ha
        assert ha is not None

        def duty(job: Job) -> contextlib.AbstractAsyncContextManager[Claim | None]:
            return ha.duty(self.config, job, f"wal-{job.name}")

        return duty

    def _taken_over(self, job: Job, slot: str, claim: Claim) -> None:
        """HA: the holder of (job, slot) stopped renewing; this node runs the slot now."""
        when = datetime.strptime(slot, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        self._submit_claimed(job.name, Trigger("schedule"), when, claim, secrets.token_hex(6))

    def _missed(self, key: str, reason: str, count: int) -> None:
        if key.startswith(BACKUP):
            self.metrics.skipped(key.split(":", 1)[1], reason, count)

    def _next_changed(self, key: str, when: Any) -> None:
        if key.startswith(BACKUP):
            self.metrics.next_run(key.split(":", 1)[1], when.timestamp() if when else None)

    async def _after_success(self, config: Config, job: Job, manifest: Any, stores: Any) -> None:
        self.inventory.record_backup(job.name, job.storage[0], manifest)
        if self.ha is None:
            outcomes = await prune_after_success(
                config, job, manifest, stores, metrics=self.metrics
            )
        else:
            async with self.ha.duty(config, job, f"{job.name}/retention") as claim:
                if claim is None:  # another node prunes this job now; the next run prunes again
                    log.info("retention_skipped", job=job.name, reason="claimed by another node")
                    return
                outcomes = await prune_after_success(
                    config, job, manifest, stores, metrics=self.metrics
                )
        for outcome in outcomes:
            if not outcome.dry_run:
                self.inventory.replace_storage(job.name, outcome.storage, outcome.remaining)

    # -- reload --------------------------------------------------------------------------

    async def reload(self) -> list[str]:
        """Load the config again; swap it whole if valid, else keep the old one. Returns errors."""
        async with self._reload_lock:
            self.systemd.reloading()
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as exc:
                self.metrics.config_reloaded("failure")
                log.error("reload_rejected", errors=exc.errors)
                self.systemd.ready(self._status_line())
                return exc.errors
            old = self.config
            for key in ("socket", "socket_mode", "socket_group", "http_listen", "node", "ha"):
                if getattr(old.daemon, key) != getattr(new.daemon, key):
                    log.warning("reload_needs_restart", key=f"daemon.{key}")
            for name in set(old.jobs) - set(new.jobs):
                self.metrics.forget_job(name)
                self.inventory.forget(name)
            self.config = new
            self.runner.update_config(new)
            self.archivers.update(new.jobs, new.sources)  # issue 16
            self.scheduler.replace(schedule_entries(new))
            self.metrics.jobs_configured(new.jobs)
            if new.notifiers != old.notifiers:
                previous = self.notifications
                self.notifications = Notifications(new.notifiers, metrics=self.metrics)
                self._notify.notifications = self.notifications
                self.tasks.spawn(_retire(previous), "retire-notifiers")
            self.metrics.config_reloaded("success")
            log.info("config_reloaded", jobs=len(new.jobs))
            self.systemd.ready(self._status_line())
            return []

    # -- health (http.HealthProbe) -------------------------------------------------------

    def live(self) -> bool:
        task = self._scheduler_task
        return (
            task is not None and not task.done() and self.scheduler.alive() and self.tasks.healthy()
        )

    def ready(self) -> tuple[bool, dict[str, Any]]:
        ok = self.live() and not self.stop.is_set()
        nexts = self.scheduler.next_runs() if self._scheduler_task else {}
        jobs = {}
        for name in self.config.jobs:
            last = self.runner.last_run(name)
            when = nexts.get(BACKUP + name)
            jobs[name] = {
                "next_run": rfc3339(when) if when else None,
                "last_result": last.state if last else None,
                "running": any(r.job == name for r in self.runner.active()),
            }
        return ok, {"ready": ok, "jobs": jobs}

    def status_page(self) -> str:
        """The HTML status page: what `status` shows, and the recent backups per job."""
        from backupd.observe import statuspage

        now = now_utc()
        recent = {
            name: [b.to_dict(now) for b in self.inventory.recent(name)] for name in self.config.jobs
        }
        return statuspage.render(self._status(), recent, now)

    # -- control socket ------------------------------------------------------------------

    async def handle(self, request: dict[str, Any], peer: Peer) -> AsyncIterator[dict[str, Any]]:
        cmd = request["cmd"]
        if cmd == "ping":
            yield {"ok": True, "version": __version__}
        elif cmd == "status":
            yield {
                "ok": True,
                "node": self.node,
                "ha": self.ha is not None,
                "jobs": await self._status_ha(),
            }
        elif cmd == "trigger":
            async for reply in self._trigger(request, peer):
                yield reply
        elif cmd == "cancel":
            run_id = request.get("run_id")
            if not isinstance(run_id, str):
                raise CommandError("bad_request", "cancel needs a string run_id")
            try:
                self.runner.cancel(run_id)
            except BackupdError as exc:
                raise CommandError("unknown_run", str(exc)) from None
            log.info("run_cancel_requested", run_id=run_id, uid=peer.uid)
            yield {"ok": True}
        elif cmd == "reload":
            errors = await self.reload()
            if errors:
                yield {
                    "ok": False,
                    "error": {
                        "code": "config_invalid",
                        "message": f"{len(errors)} config error(s); the old config stays",
                        "errors": errors,
                    },
                }
            else:
                yield {"ok": True}
        elif cmd == "history":
            job = request.get("job")
            limit = request.get("limit", 20)
            if job is not None and not isinstance(job, str):
                raise CommandError("bad_request", "job must be a string")
            if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
                raise CommandError("bad_request", "limit must be an integer from 1 to 1000")
            yield {"ok": True, "runs": [r.to_dict() for r in self.runner.history(job, limit)]}
        else:
            raise CommandError("unknown_command", f"unknown command {cmd!r}")

    async def _status_ha(self) -> list[dict[str, Any]]:
        """`status`; in HA mode each job also lists the live claims of every node."""
        jobs = self._status()
        if self.ha is None:
            return jobs
        try:
            live = await asyncio.wait_for(self.ha.live_claims(self.config), 5.0)
        except (TimeoutError, BackupdError) as exc:
            log.warning("status_claims_failed", error=str(exc) or "timed out")
            return jobs
        for entry in jobs:
            entry["claims"] = [
                {"slot": c.slot, "node": c.node, "run_id": c.run_id}
                for c in live
                if c.job == entry["name"]
            ]
        return jobs

    def _status(self) -> list[dict[str, Any]]:
        """Per job: next fire, last run (its error on one line), the newest backup in
        storage, runs in progress with their bytes, rate and elapsed time."""
        nexts = self.scheduler.next_runs()
        now = now_utc()
        out = []
        for name in sorted(self.config.jobs):
            when = nexts.get(BACKUP + name)
            wal = (
                {"wal_lag_seconds": round(self.metrics.wal_lags[name], 1)}
                if name in self.metrics.wal_lags
                else {}
            )
            last = self.runner.last_run(name)
            newest = self.inventory.latest(name)
            out.append(
                {
                    "name": name,
                    "next_run": rfc3339(when) if when else None,
                    "last_run": last.to_dict() if last else None,
                    "last_error": one_line(last.error) if last else None,
                    "last_backup": newest.to_dict(now) if newest else None,
                    "running": [r.to_dict() for r in self.runner.active() if r.job == name],
                }
                | wal
            )
        return out

    async def _trigger(self, request: dict[str, Any], peer: Peer) -> AsyncIterator[dict[str, Any]]:
        job = request.get("job")
        if not isinstance(job, str):
            raise CommandError("bad_request", "trigger needs a string job")
        if job not in self.config.jobs:
            raise CommandError("unknown_job", f"unknown job {job!r}")
        wait = request.get("wait", False)
        if not isinstance(wait, bool):
            raise CommandError("bad_request", "wait must be true or false")
        trigger = Trigger("manual", peer.uid, _user(peer.uid))
        claim = None
        run_id = secrets.token_hex(6)
        if self.ha is not None:  # a manual run is claimed too (its own slot)
            if self.runner.busy(job):
                raise CommandError("already_running", f"job {job} is already running")
            try:
                claim = await self.ha.claim_slot(
                    self.config, self.config.jobs[job], f"manual-{run_id}", run_id, watch=False
                )
            except BackupdError as exc:
                raise CommandError("claim_failed", str(exc)) from None
        try:
            run = self.runner.submit(job, trigger, claim=claim, run_id=run_id)
        except JobBusy as exc:
            if claim is not None:
                self.tasks.spawn(claim.finish("released"), "release-claim")
            raise CommandError("already_running", str(exc)) from None
        if not wait:
            yield {"ok": True, "run_id": run.run_id}
            return
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        run.listeners.append(queue)
        try:
            yield {"event": "queued", "run_id": run.run_id, "job": job}
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), PROGRESS_INTERVAL)
                except TimeoutError:  # nothing happened for a while: bytes, rate, elapsed
                    if run.state == "running":
                        yield {"event": "progress", "run_id": run.run_id, "job": job} | (
                            run.progress()
                        )
                    continue
                yield item
                if "ok" in item:
                    return
        finally:
            run.listeners.remove(queue)


def _user(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


async def _retire(notifications: Notifications) -> None:
    await notifications.drain(10.0)
    await notifications.aclose()
