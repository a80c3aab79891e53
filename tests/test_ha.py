"""Issue 17: several daemons sharing one schedule through the store's conditional writes.

The claim protocol's pure model (table tests of the interleavings), the
conditional-write primitives on moto and the filesystem, and real `backupd
run` subprocesses sharing one config's jobs.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import pytest

from backupd.claims import (
    LEASE_SLACK,
    ClaimRecord,
    Holder,
    HolderState,
    InvalidClaim,
    Seen,
    judge,
)
from backupd.config import FilesystemStorage
from backupd.errors import NotFound, PreconditionFailed
from backupd.storage import open_store
from backupd.storage.base import Store
from tests.daemon_proc import DaemonProcess
from tests.faultproxy import Delay, FaultProxy, Rule
from tests.helpers import wrapped_bin_dir, write_config
from tests.pgcluster import PgCluster, wait_for
from tests.test_storage_contract import NO_WAIT_RETRY, s3_config

LEASE = 6.0

# -- the pure model ----------------------------------------------------------------------


def _record(state: str = "running", node: str = "a") -> ClaimRecord:
    return ClaimRecord("app", "20261206T101500Z", node, "r1", state, "t1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("record", "age", "seen"),
    [
        (None, 0.0, Seen.SETTLED),  # gone
        (_record("done"), 999.0, Seen.SETTLED),  # the slot ran: never again
        (_record("released"), 0.0, Seen.TAKE_OVER),  # its holder let go
        (_record(), 0.0, Seen.WAIT),
        (_record(), LEASE, Seen.WAIT),  # whole-second dates: slack first
        (_record(), LEASE + LEASE_SLACK - 0.01, Seen.WAIT),
        (_record(), LEASE + LEASE_SLACK, Seen.TAKE_OVER),
        (_record(), -30.0, Seen.WAIT),  # a store clock oddity never means abandoned
    ],
)
def test_judge_table(record: ClaimRecord | None, age: float, seen: Seen) -> None:
    assert judge(record, age, LEASE) is seen


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'{"version": 2}',
        b"x" * 5000,
        _record().to_json().replace(b'"running"', b'"won"'),
        _record().to_json().replace(b'"a"', b'"../x"'),
    ],
)
def test_hostile_claims_are_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidClaim):
        ClaimRecord.from_json(raw)


def test_claim_round_trip() -> None:
    assert ClaimRecord.from_json(_record().to_json()) == _record()


@dataclass
class _Obj:
    record: ClaimRecord
    etag: int
    written: float  # the store's clock


@dataclass
class _SimStore:
    """The store's semantics for the model: conditional create and replace, its own clock."""

    objects: dict[str, _Obj] = field(default_factory=dict)
    etags: int = 0

    def create(self, key: str, record: ClaimRecord, now: float) -> int | None:
        if key in self.objects:
            return None
        self.etags += 1
        self.objects[key] = _Obj(record, self.etags, now)
        return self.etags

    def replace(self, key: str, record: ClaimRecord, etag: int, now: float) -> int | None:
        obj = self.objects.get(key)
        if obj is None or obj.etag != etag:
            return None
        self.etags += 1
        self.objects[key] = _Obj(record, self.etags, now)
        return self.etags


@dataclass
class _Node:
    name: str
    holder: Holder | None = None
    etag: int = 0
    acted: list[float] = field(default_factory=list)  # times it published/deleted under the claim


# Each scenario: A wins at t=0, B lost and watches; what A does (its renewals take `lag`
# seconds to reach the store, it stops renewing at `dies`, pauses between `pause`), and what
# must come of it. Time runs in steps of 0.1 s for 10 leases.
@pytest.mark.parametrize(
    ("scenario", "lag", "dies", "pause", "release_at", "a_final", "b_takes_over"),
    [
        ("renews on time", 0.0, None, None, None, HolderState.HELD, False),
        ("slow renewals under the lease", LEASE * 0.3, None, None, None, HolderState.HELD, False),
        ("dies (kill -9)", 0.0, 2.0, None, None, HolderState.HELD, True),
        ("renewals delayed past the lease", LEASE * 2, None, None, None, HolderState.EXPIRED, True),
        # A paused process knows on waking that its deadline passed: it stops (expired)
        # before it would send a renewal, which would be refused anyway.
        ("paused past the lease", 0.0, None, (1.0, 20.0), None, HolderState.EXPIRED, True),
        ("releases", 0.0, None, None, 3.0, HolderState.FINISHED, True),
    ],
)
def test_interleavings_never_two_holders(
    scenario: str,
    lag: float,
    dies: float | None,
    pause: tuple[float, float] | None,
    release_at: float | None,
    a_final: HolderState,
    b_takes_over: bool,
) -> None:
    store = _SimStore()
    key = "app/slot"
    a, b = _Node("a"), _Node("b")
    etag = store.create(key, _record(node="a"), 0.0)
    assert etag is not None and store.create(key, _record(node="b"), 0.0) is None  # B lost
    a.holder, a.etag = Holder(LEASE, 0.0), etag
    in_flight: list[tuple[float, float, int]] = []  # (lands at, sent at, etag it holds)
    sent_pending = False
    step, t = 0.1, 0.0
    takeover_at: float | None = None
    while t < LEASE * 10:
        t = round(t + step, 6)
        alive = dies is None or t < dies
        paused = pause is not None and pause[0] <= t < pause[1]
        # A: renew every lease/3; a write lands `lag` later (or never, once A is dead).
        if a.holder is not None and alive and not paused:
            if release_at is not None and t >= release_at and a.holder.state is HolderState.HELD:
                obj = store.objects[key]
                if obj.etag == a.etag:
                    store.replace(key, obj.record.with_(state="released"), a.etag, t)
                a.holder.finished()
            elif not sent_pending and t >= a.holder.renew_at():
                in_flight.append((t + lag, t, a.etag))
                sent_pending = True
            if a.holder.may_act(t):
                a.acted.append(t)
        for landing in [f for f in in_flight if f[0] <= t]:
            in_flight.remove(landing)
            sent_pending = False
            new = store.replace(key, _record(node="a"), landing[2], t)
            if a.holder is None or not alive:
                continue
            if new is None:
                a.holder.refused()
            else:
                a.etag = new
                a.holder.renewed(landing[1])
        # B: watches every lease/3; takes over an abandoned or released claim.
        if b.holder is None and round(t / (LEASE / 3), 6) % 1 == 0:
            obj = store.objects[key]
            if judge(obj.record, t - obj.written, LEASE) is Seen.TAKE_OVER:
                new = store.replace(key, obj.record.with_(node="b"), obj.etag, t)
                if new is not None:
                    b.holder, b.etag, takeover_at = Holder(LEASE, t), new, t
        if b.holder is not None and b.holder.may_act(t):
            b.acted.append(t)
        # The invariant: never two nodes acting under the claim at the same time.
        assert not (a.acted and b.acted and a.acted[-1] == t == b.acted[-1]), scenario
    assert a.holder is not None
    assert a.holder.state is a_final, scenario
    assert (takeover_at is not None) is b_takes_over, scenario
    if takeover_at is not None and a.acted:
        # A stopped acting before B could take over: the old holder always stops first.
        assert max(a.acted) < takeover_at, scenario


def test_refused_renewal_loses_at_once() -> None:
    holder = Holder(LEASE, 0.0)
    assert holder.may_act(1.0)
    holder.refused()
    assert holder.state is HolderState.LOST and not holder.may_act(1.1)
    holder.renewed(1.2)  # a late success after a refusal changes nothing
    assert holder.state is HolderState.LOST


# -- conditional writes on real stores ---------------------------------------------------


async def _conditional_contract(store: Store) -> None:
    key = ".backupd-claims/app/20261206T101500Z"
    first = await store.create_if_absent(key, b"one")
    with pytest.raises(PreconditionFailed):
        await store.create_if_absent(key, b"two")
    found = await store.read_versioned(key)
    assert found.data == b"one" and found.etag.strip('"') == first.strip('"')
    assert -5.0 < found.age < 30.0  # by the store's clock
    second = await store.replace_if_match(key, b"three", first)
    assert second != first
    with pytest.raises(PreconditionFailed):
        await store.replace_if_match(key, b"four", first)  # a stale etag
    assert (await store.read_versioned(key)).data == b"three"
    with pytest.raises(PreconditionFailed):
        await store.replace_if_match(".backupd-claims/app/none", b"x", second)  # gone
    with pytest.raises(NotFound):
        await store.read_versioned(".backupd-claims/app/none")
    # Two creates at once: exactly one wins.
    results = await asyncio.gather(
        *(store.create_if_absent(".backupd-claims/race", b"%d" % i) for i in range(8)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, str) for r in results) == 1, results
    assert all(isinstance(r, str | PreconditionFailed) for r in results)


async def test_conditional_writes_filesystem(tmp_path: Path) -> None:
    store = await open_store(FilesystemStorage(name="local", path=str(tmp_path / "s")))
    try:
        await _conditional_contract(store)
        # Claims are not backups: listings of the job's folders never see them.
        assert await store.list("app/") == []
    finally:
        await store.aclose()


async def test_conditional_writes_moto(s3_server: str, s3_bucket: str) -> None:
    """The pinned moto (5.2.5) honours If-None-Match: * and If-Match on PutObject."""
    store = await open_store(s3_config(s3_server, s3_bucket), s3_retry=NO_WAIT_RETRY)
    try:
        await _conditional_contract(store)
    finally:
        await store.aclose()
