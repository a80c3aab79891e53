"""Several daemons, one schedule (SPEC "Several daemons (high availability)").

The I/O around `claims`: winning, renewing, watching and taking over claims in
the HA storage through its conditional writes, and the start-up self-test.
Nothing here runs when `[daemon] ha.enabled` is false: single-daemon mode
makes no claim traffic.

WAL archiving of a physical job runs under a duty claim of its own,
`wal-JOB` (`Archivers` in operations/walarchiver.py, wired by the daemon's
lifecycle): one pg_receivewal per job's slot across the nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Literal, Protocol

import structlog

from backupd.config.model import Config, Job, Storage, node_name
from backupd.daemon.claims import (
    LEASE_SLACK,
    ClaimRecord,
    ClaimState,
    Holder,
    HolderState,
    InvalidClaim,
    Seen,
    judge,
)
from backupd.errors import (
    BackupdError,
    NotFound,
    NotSupported,
    PreconditionFailed,
    StorageError,
)
from backupd.storage.base import ObjectInfo, Store, Versioned

log = structlog.get_logger("backupd.ha")

PREFIX = ".backupd-claims/"
CLAIM_KEEP = 7 * 86400.0  # seconds a finished slot's claim is kept (then the sweeper deletes it)
_SLOT = re.compile(r"\d{8}T\d{6}Z|manual-[0-9a-f]{1,32}")


def _slot_claim(config: Config, key: str) -> bool:
    """Whether `key` is the claim of a (job, slot) of a configured job (not a duty's)."""
    parts = key[len(PREFIX) :].split("/") if key.startswith(PREFIX) else []
    return len(parts) == 2 and parts[0] in config.jobs and _SLOT.fullmatch(parts[1]) is not None


WRITE_TIMEOUT_FLOOR = 1.0


class ClaimMetrics(Protocol):
    def claim(self, job: str, result: str) -> None: ...


class StorePool(Protocol):
    async def get(self, cfg: Storage) -> Store: ...


class ClaimLost(BackupdError):
    """The run's claim was taken over or could not be renewed in time: it stops."""


class ConditionalWritesUnsupported(BackupdError):
    """The HA storage ignores conditional writes: HA cannot run on it."""


def slot_of(when: datetime) -> str:
    return when.strftime("%Y%m%dT%H%M%SZ")


def claim_key(job: str, slot: str) -> str:
    return f"{PREFIX}{job}/{slot}"


def storage_for(config: Config, job: Job | None) -> str:
    """The storage that holds claims: `ha.storage`, else the job's first (else the first)."""
    if config.daemon.ha.storage:
        return config.daemon.ha.storage
    if job is not None:
        return job.storage[0]
    return next(iter(config.storages))


class Claim:
    """A claim this daemon holds; `keep()` renews it until the work ends."""

    def __init__(
        self, store: Store, key: str, record: ClaimRecord, etag: str, lease: float, sent_at: float
    ) -> None:
        self.store = store
        self.key = key
        self.record = record
        self.etag = etag
        self.lease = lease
        self.holder = Holder(lease, sent_at)
        self._lock = asyncio.Lock()  # one write at a time
        self.lost_reason: str | None = None

    @property
    def node(self) -> str:
        return self.record.node

    async def _write(self, state: ClaimState) -> bool:
        """One conditional rewrite; True if the store accepted it. Bounded by the deadline."""
        async with self._lock:
            if self.holder.tick(time.monotonic()) is not HolderState.HELD:
                return False
            record = self.record.with_(state=state, token=secrets.token_hex(8))
            sent = time.monotonic()
            remaining = max(self.holder.deadline() - sent, WRITE_TIMEOUT_FLOOR / 10)
            try:
                etag = await asyncio.wait_for(
                    _replace(self.store, self.key, record, self.etag), remaining
                )
            except PreconditionFailed:
                self.holder.refused()
                self.lost_reason = f"claim {self.key} was taken over by another node"
                return False
            except (TimeoutError, StorageError) as exc:
                log.warning("claim_renew_failed", key=self.key, error=str(exc) or "timed out")
                return False
            self.etag, self.record = etag, record
            self.holder.renewed(sent)
            return True

    async def renew(self) -> bool:
        return await self._write("running")

    async def confirm(self) -> None:
        """Before publishing: renew now; raise ClaimLost unless the claim is surely still ours."""
        if not await self.renew() or not self.holder.may_act(time.monotonic()):
            raise ClaimLost(self.lost_reason or f"claim {self.key} could not be confirmed")

    async def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew every lease/3 (retrying failures) until cancelled; `on_lost` when lost."""
        while True:
            now = time.monotonic()
            wait = self.holder.renew_at() - now
            if self.holder.tick(now) is not HolderState.HELD:
                break
            if wait > 0:
                await asyncio.sleep(min(wait, max(self.holder.deadline() - now, 0.01)))
                continue
            if not await self.renew():
                if self.holder.state is HolderState.LOST:
                    break
                await asyncio.sleep(min(1.0, self.lease / 12))
        if self.holder.state is HolderState.EXPIRED:
            self.lost_reason = (
                f"claim {self.key} could not be renewed within {STOP_NOTE} of its lease"
            )
        log.error("claim_lost", key=self.key, reason=self.lost_reason)
        on_lost(self.lost_reason or f"claim {self.key} lost")

    async def finish(self, state: ClaimState = "done") -> None:
        """Mark the claim done (the slot ran) or released (another node may take it now)."""
        if self.holder.state is not HolderState.HELD:
            return
        try:
            await asyncio.wait_for(self._write(state), max(self.lease / 3, 1.0))
        except TimeoutError:
            log.warning("claim_finish_failed", key=self.key, state=state)
        self.holder.finished()


STOP_NOTE = "80%"


async def _replace(store: Store, key: str, record: ClaimRecord, etag: str) -> str:
    data = record.to_json()
    try:
        return await store.replace_if_match(key, data, etag)
    except PreconditionFailed:
        # A retried request whose first try landed is refused by its own write.
        return await _ours_or_raise(store, key, data)


async def _ours_or_raise(store: Store, key: str, data: bytes) -> str:
    try:
        current = await store.read_versioned(key)
    except NotFound:
        raise PreconditionFailed(f"{key} is gone") from None
    if current.data != data:
        raise PreconditionFailed(f"{key} is held by another write")
    return current.etag


def _parse(found: Versioned) -> ClaimRecord | None:
    try:
        return ClaimRecord.from_json(found.data)
    except InvalidClaim:
        return None


class Coordinator:
    """Claims of this daemon (node) in the HA storage."""

    def __init__(self, pool: StorePool, metrics: ClaimMetrics | None, node: str) -> None:
        self.pool = pool
        self.metrics = metrics
        self.node = node
        self.watching: dict[str, asyncio.Task[None]] = {}

    @classmethod
    def for_config(
        cls, config: Config, pool: StorePool, metrics: ClaimMetrics | None
    ) -> Coordinator:
        return cls(pool, metrics, node_name(config.daemon))

    async def _store(self, config: Config, job: Job | None) -> Store:
        return await self.pool.get(config.storages[storage_for(config, job)])

    def _count(self, job: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.claim(job, result)

    # -- start-up self-test --------------------------------------------------------------

    async def self_test(self, config: Config) -> None:
        """Prove every HA storage refuses a second conditional create, or raise."""
        names = {storage_for(config, job) for job in config.jobs.values()}
        names.add(storage_for(config, None))
        for name in sorted(names):
            store = await self.pool.get(config.storages[name])
            key = f"{PREFIX}_probe/{self.node}-{secrets.token_hex(6)}"
            try:
                await self._probe(name, store, key)
            except NotSupported as exc:
                raise ConditionalWritesUnsupported(
                    f"HA needs conditional writes, and storage {name} does not support them "
                    f"({exc}); refusing to start in HA mode"
                ) from None
            finally:
                with contextlib.suppress(StorageError):
                    await store.delete([key])
            log.info("ha_self_test_passed", storage=name, node=self.node)

    async def _probe(self, name: str, store: Store, key: str) -> None:
        """Create twice (the second must fail), replace on the ETag (must work), then on a
        wrong one (must fail)."""
        etag = await store.create_if_absent(key, b"backupd ha probe 1\n")
        try:
            await store.create_if_absent(key, b"backupd ha probe 2\n")
        except PreconditionFailed:
            pass
        else:
            raise ConditionalWritesUnsupported(
                f"HA needs conditional writes, and storage {name} ignores them: a "
                f"second create of {key} with If-None-Match: * succeeded (the store, or "
                "a proxy in front of it, drops the header); refusing to start in HA mode"
            )
        try:
            etag = await store.replace_if_match(key, b"backupd ha probe 3\n", etag)
        except PreconditionFailed:
            raise ConditionalWritesUnsupported(
                f"HA needs conditional writes, and storage {name} refused a replace of "
                f"{key} with If-Match on its current ETag; refusing to start in HA mode"
            ) from None
        try:
            await store.replace_if_match(key, b"backupd ha probe 4\n", "0" + etag)
        except PreconditionFailed:
            pass
        else:
            raise ConditionalWritesUnsupported(
                f"HA needs conditional writes, and storage {name} ignores them: a "
                f"replace of {key} with a wrong If-Match succeeded; refusing to start "
                "in HA mode"
            )

    # -- claims for runs -----------------------------------------------------------------

    async def claim_slot(
        self, config: Config, job: Job, slot: str, run_id: str, *, watch: bool = True
    ) -> Claim | None:
        """Win the claim for (job, slot); None if another node holds or finished it.

        A loser watches the claim (`watch`) and takes it over if its holder
        stops renewing; `on_takeover` then runs it (set by the daemon).
        """
        store = await self._store(config, job)
        key = claim_key(job.name, slot)
        record = ClaimRecord(job.name, slot, self.node, run_id, "running", secrets.token_hex(8))
        data = record.to_json()
        sent = time.monotonic()
        try:
            try:
                etag = await store.create_if_absent(key, data)
            except PreconditionFailed:
                etag = await _ours_or_raise(store, key, data)
        except PreconditionFailed:
            self._count(job.name, "lost")
            log.info("claim_lost_to_other", job=job.name, slot=slot, node=self.node)
            if watch:
                self._watch(config, job, slot, store, key)
            return None
        self._count(job.name, "won")
        log.info("claim_won", job=job.name, slot=slot, node=self.node)
        return Claim(store, key, record, etag, config.daemon.ha.lease, sent)

    on_takeover: Callable[[Job, str, Claim], None] | None = None

    def _watch(self, config: Config, job: Job, slot: str, store: Store, key: str) -> None:
        if key in self.watching:
            return
        task = asyncio.create_task(self._watch_claim(config, job, slot, store, key))
        self.watching[key] = task
        task.add_done_callback(lambda _: self.watching.pop(key, None))

    async def _watch_claim(
        self, config: Config, job: Job, slot: str, store: Store, key: str
    ) -> None:
        lease = config.daemon.ha.lease
        with structlog.contextvars.bound_contextvars(job=job.name, slot=slot):
            while True:
                await asyncio.sleep(lease / 3)
                claim = await self._try_take_over(config, store, key, lease)
                if claim == "settled":
                    return
                if not isinstance(claim, Claim):
                    continue
                self._count(job.name, "taken_over")
                log.warning("claim_taken_over", key=key, node=self.node)
                if self.on_takeover is not None:
                    self.on_takeover(job, slot, claim)
                return

    async def _try_take_over(
        self, config: Config, store: Store, key: str, lease: float
    ) -> Claim | Literal["wait", "settled"]:
        """A Claim if taken over now, else whether to watch on or the claim is settled."""
        try:
            found = await store.read_versioned(key)
        except NotFound:
            return "settled"
        except StorageError as exc:
            log.warning("claim_read_failed", key=key, error=str(exc))
            return "wait"
        record = _parse(found)
        if record is None:
            log.warning("claim_invalid", key=key)
            return "settled"  # not ours to judge: never taken over, never deleted here
        seen = judge(record, found.age, lease)
        if seen is Seen.SETTLED:
            return "settled"
        if seen is Seen.WAIT:
            return "wait"
        mine = record.with_(
            node=self.node, state="running", token=secrets.token_hex(8), run_id="takeover"
        )
        sent = time.monotonic()
        try:
            etag = await _replace(store, key, mine, found.etag)
        except PreconditionFailed:
            return "wait"  # someone else took it, or its holder renewed: watch the new one
        except StorageError as exc:
            log.warning("claim_take_over_failed", key=key, error=str(exc))
            return "wait"
        if record.state == "running":
            log.warning(
                "claim_abandoned", key=key, previous_node=record.node, age_seconds=found.age
            )
        return Claim(store, key, mine, etag, lease, sent)

    # -- duties: retention, sweeper, WAL archiving -------------------------------------

    @contextlib.asynccontextmanager
    async def duty(self, config: Config, job: Job | None, name: str) -> AsyncIterator[Claim | None]:
        """Hold the claim of a recurring duty while the block runs; yields None if another
        node holds it now (the caller skips this round). Released at the end."""
        store = await self._store(config, job)
        key = f"{PREFIX}{name}"
        lease = config.daemon.ha.lease
        record = ClaimRecord(
            job.name if job else "sweeper",
            "duty",
            self.node,
            "duty",
            "running",
            secrets.token_hex(8),
        )
        sent = time.monotonic()
        claim: Claim | None = None
        try:
            etag = await store.create_if_absent(key, record.to_json())
            claim = Claim(store, key, record, etag, lease, sent)
        except PreconditionFailed:
            # A duty's claim is reused: released (or abandoned) ones are taken over.
            taken = await self._try_take_over(config, store, key, lease)
            claim = taken if isinstance(taken, Claim) else None
        if claim is None:
            yield None
            return
        work = asyncio.current_task()

        def stop(_: str) -> None:
            if work is not None:
                work.cancel()

        keeper = asyncio.create_task(claim.keep(stop))
        try:
            yield claim
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await claim.finish("released")

    async def _slot_claims(
        self, config: Config
    ) -> AsyncIterator[tuple[Store, list[ObjectInfo], ObjectInfo]]:
        """Per storage that holds claims: the store, its slot claims and the newest of them
        (whose store clock dates the others); storages without a slot claim are passed."""
        for name in sorted({storage_for(config, job) for job in config.jobs.values()}):
            store = await self.pool.get(config.storages[name])
            listed = [i for i in await store.list(PREFIX) if _slot_claim(config, i.key)]
            if listed:
                yield store, listed, max(listed, key=lambda i: i.modified)

    async def live_claims(self, config: Config) -> list[ClaimRecord]:
        """Claims of runs in progress on any node (for `status` and the sweeper).

        Only claims written within the lease (by the store's clock, read from the
        newest claim) are read: finished slots' claims pile up and are skipped.
        """
        out: list[ClaimRecord] = []
        lease = config.daemon.ha.lease
        async for store, listed, newest in self._slot_claims(config):
            try:
                now = (await store.read_versioned(newest.key)).store_now
            except StorageError:
                continue
            recent = now - timedelta(seconds=lease + LEASE_SLACK)
            for info in listed:
                if info.modified < recent:
                    continue
                try:
                    found = await store.read_versioned(info.key)
                except StorageError:
                    continue
                record = _parse(found)
                if record is not None and judge(record, found.age, lease) is Seen.WAIT:
                    out.append(record)
        return out

    async def forget_old_claims(self, config: Config) -> int:
        """Delete slot claims last written more than CLAIM_KEEP ago (store clock); under
        the sweeper's claim. Catch-up looks at manifests, never at old claims."""
        deleted = 0
        async for store, listed, newest in self._slot_claims(config):
            now = (await store.read_versioned(newest.key)).store_now
            old = [i.key for i in listed if i.modified < now - timedelta(seconds=CLAIM_KEEP)]
            if old:
                failed = await store.delete(old)
                deleted += len(old) - len(failed)
        if deleted:
            log.info("old_claims_deleted", count=deleted)
        return deleted

    async def shutdown(self) -> None:
        for task in list(self.watching.values()):
            task.cancel()
        for task in list(self.watching.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
