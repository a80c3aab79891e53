"""Issue 17: several daemons sharing one schedule through the store's conditional writes.

The claim protocol's pure model (table tests of the interleavings), the
conditional-write primitives on moto and the filesystem, and real `backupd
run` subprocesses sharing one config's jobs.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from backupd.catalog.manifest import MANIFEST_SUFFIX
from backupd.config.file import parse_config
from backupd.config.model import FilesystemStorage
from backupd.daemon.claims import (
    LEASE_SLACK,
    ClaimRecord,
    Holder,
    HolderState,
    InvalidClaim,
    Seen,
    judge,
)
from backupd.daemon.ha import ConditionalWritesUnsupported, Coordinator
from backupd.errors import NotFound, NotSupported, PreconditionFailed
from backupd.storage import open_store
from backupd.storage.base import Store
from tests.daemon_proc import DaemonProcess
from tests.faultproxy import Delay, FaultProxy, Rule
from tests.helpers import moto_client, wrapped_bin_dir, write_config
from tests.pgcluster import PgCluster, free_port, wait_for
from tests.test_objstores import BUCKETS
from tests.test_storage_contract import NO_WAIT_RETRY, s3_config, target_config

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


# -- several real daemons ----------------------------------------------------------------


NodeConfig = Callable[..., Path]


@pytest.fixture
def node_config(
    tmp_path: Path, pg: PgCluster, sample_db: str, pg_password_file: Path
) -> NodeConfig:
    """`node_config(name, schedule=..., **keys)`: the config of HA node `name` (its own
    folder under tmp_path), backing up `sample_db` to the shared store `s3` or `fs`."""

    def write(
        name: str,
        *,
        s3: tuple[str, str] | None = None,
        fs: Path | None = None,
        schedule: str,
        lease: float = LEASE,
        bin_dir: Path | None = None,
        http_listen: str = "",
        catch_up: bool = True,
    ) -> Path:
        home = tmp_path / name
        home.mkdir()
        return write_config(
            home / "b.toml",
            pg,
            password_file=pg_password_file,
            database=sample_db,
            fs_path=fs,
            s3=s3,
            s3_extra={"addressing_style": "path"},
            extra_daemon={"node": name, "ha": {"enabled": True, "lease": f"{lease:g}s"}},
            extra_source={"pg_bin_dir": bin_dir} if bin_dir else None,
            extra_job={"schedule": schedule, "catch_up": catch_up},
            http_listen=http_listen,
        )

    return write


def _start_nodes(
    node_config: NodeConfig, daemons: list[DaemonProcess], tmp_path: Path, **keys: Any
) -> None:
    """Three HA daemons n0, n1, n2 with the same job; `http_listen` is n0's alone."""
    http_listen = keys.pop("http_listen", "")
    for i in range(3):
        cfg = node_config(f"n{i}", http_listen=http_listen if i == 0 else "", **keys)
        daemons.append(DaemonProcess(cfg, tmp_path / f"n{i}.log").start())


def _manifests_s3(endpoint: str, bucket: str) -> list[dict[str, Any]]:
    client = moto_client(endpoint)
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="prod/"):
        for item in page.get("Contents", []):
            if item["Key"].endswith(MANIFEST_SUFFIX):
                body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                out.append(json.loads(body))
    return out


def _manifests_fs(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_bytes()) for p in root.rglob(f"*{MANIFEST_SUFFIX}")]


def _per_slot(manifests: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(m["scheduled_for"] for m in manifests)


def _events(d: DaemonProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("event") == event]


def _at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _rfc3339(slot: str) -> str:
    return datetime.strptime(slot, "%Y%m%dT%H%M%SZ").strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["moto", "filesystem"])
def test_three_daemons_one_backup_per_slot(
    kind: str,
    tmp_path: Path,
    node_config: NodeConfig,
    s3_server: str,
    s3_bucket: str,
    daemons: list[DaemonProcess],
) -> None:
    """Three daemons, one config's jobs, a slot every 3 s: each slot is backed up once."""
    fs = tmp_path / "shared-store" if kind == "filesystem" else None
    s3 = (s3_server, s3_bucket) if kind == "moto" else None
    port = free_port()
    keys = {"s3": s3, "fs": fs, "http_listen": f"127.0.0.1:{port}"}
    _start_nodes(node_config, daemons, tmp_path, schedule="*/3 * * * * *", **keys)

    def manifests() -> list[dict[str, Any]]:
        return _manifests_s3(s3_server, s3_bucket) if s3 else _manifests_fs(fs)  # type: ignore[arg-type]

    # Slots before all three were up may be skipped as in single-daemon mode (overlap).
    all_up = datetime.now(UTC)
    wanted = 8 if kind == "moto" else 6

    def after_all_up() -> int:
        return sum(1 for slot in _per_slot(manifests()) if _parse_time(slot) > all_up)

    wait_for(lambda: after_all_up() >= wanted, 75, what=f"{wanted} slots backed up")
    status = daemons[1].status()
    assert status["node"] == "n1"
    for d in daemons:
        d.stop(20)
    found = manifests()
    per_slot = _per_slot(found)
    duplicates = {slot: n for slot, n in per_slot.items() if n > 1}
    assert not duplicates, f"slots published twice: {duplicates}"
    # Every slot between the first and the last one published was run (by some node).
    times = sorted(t for t in map(_parse_time, per_slot) if t > all_up)
    gaps = [
        (a.isoformat(), b.isoformat())
        for a, b in itertools.pairwise(times)
        if (b - a).total_seconds() != 3
    ]
    assert not gaps, f"slots missed between {gaps}"
    assert {m["node"] for m in found} <= {"n0", "n1", "n2"}
    assert all(m["trigger"] in ("schedule", "catch-up") for m in found)
    logs = "".join(d.logs() for d in daemons)
    won = logs.count('"claim_won"')
    lost = logs.count('"claim_lost_to_other"')
    print(
        f"\nHA {kind}: {len(per_slot)} slots, {len(found)} backups, duplicates 0, "
        f"claims won {won}, lost {lost}, by node "
        f"{dict(collections.Counter(m['node'] for m in found))}"
    )
    assert won >= len(per_slot) and lost >= len(per_slot)


@pytest.mark.slow
def test_kill_holder_another_node_publishes_the_slot(
    tmp_path: Path,
    node_config: NodeConfig,
    s3_server: str,
    s3_bucket: str,
    daemons: list[DaemonProcess],
) -> None:
    """kill -9 the daemon running a slot: another takes it over within lease + dump time."""
    dump_seconds = 5
    bin_dir = wrapped_bin_dir(tmp_path / "bin", f'sleep {dump_seconds}\nexec "$REAL" "$@"')
    keys = {"s3": (s3_server, s3_bucket), "bin_dir": bin_dir, "catch_up": False}
    _start_nodes(node_config, daemons, tmp_path, schedule="*/20 * * * * *", **keys)

    def holder() -> tuple[DaemonProcess, str] | None:
        """The node with a run in progress, and the slot it claimed for it."""
        for d in daemons:
            won = _events(d, "claim_won")
            if won and len(_events(d, "run_started")) > len(_events(d, "run_finished")):
                return d, str(won[-1]["slot"])
        return None

    found: list[tuple[DaemonProcess, str]] = []
    wait_for(
        lambda: bool(found.append(h) if (h := holder()) else None) or bool(found),
        40,
        what="a node running the first slot",
    )
    victim, slot = found[0]
    assert victim.proc is not None
    # `status` on any node shows which node holds the running slot.
    other = next(d for d in daemons if d is not victim)

    def holders() -> list[tuple[str, str]]:
        return [
            (c["slot"], c["node"]) for job in other.status()["jobs"] for c in job.get("claims", [])
        ]

    # polled, not asserted once: under heavy load one status read came back without it
    wait_for(lambda: (slot, victim.config.parent.name) in holders(), 15, what="the holder shown")
    victim.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    victim.wait(10)
    want = _rfc3339(slot)
    wait_for(
        lambda: want in _per_slot(_manifests_s3(s3_server, s3_bucket)),
        LEASE + LEASE_SLACK + LEASE / 3 + dump_seconds + 20,
        what=f"slot {want} published by another node",
    )
    takeover = time.monotonic() - killed
    manifests = _manifests_s3(s3_server, s3_bucket)
    (published,) = [m for m in manifests if m["scheduled_for"] == want]
    assert published["node"] != victim.config.parent.name
    duplicates = {s: n for s, n in _per_slot(manifests).items() if n > 1}
    assert not duplicates
    taken = [d for d in daemons if d is not victim and _events(d, "claim_taken_over")]
    assert taken, "no node logged claim_taken_over"
    print(
        f"\nHA kill -9: slot {want} published by {published['node']} {takeover:.1f}s after "
        f"the kill (lease {LEASE:g}s, dump {dump_seconds}s)"
    )
    assert takeover <= LEASE + LEASE_SLACK + LEASE / 3 + dump_seconds + 10


def test_store_ignoring_conditional_writes_fails_ha_startup(
    tmp_path: Path,
    node_config: NodeConfig,
    s3_server: str,
    s3_bucket: str,
) -> None:
    with FaultProxy(s3_server) as proxy:
        proxy.strip_conditions = True
        cfg = node_config(
            "n0",
            s3=(proxy.url, s3_bucket),
            schedule="0 0 * * *",
        )
        d = DaemonProcess(cfg, tmp_path / "n0.log")
        with pytest.raises(RuntimeError, match="exited 1") as failed:
            d.start(30)
        d._log.close()
    assert "conditional writes" in str(failed.value)
    assert "storage offsite" in str(failed.value)


@pytest.mark.slow
def test_delayed_renewals_old_holder_stops_before_new_one_publishes(
    tmp_path: Path,
    node_config: NodeConfig,
    s3_server: str,
    s3_bucket: str,
    daemons: list[DaemonProcess],
) -> None:
    """Renewals held past the lease: the holder stops (its deadline) before another node
    can take the slot over, and only the new holder publishes it."""
    bin_dir = wrapped_bin_dir(tmp_path / "bin", 'sleep 8\nexec "$REAL" "$@"')
    with FaultProxy(s3_server) as proxy:
        # Every renewal (a PutObject with If-Match) of node a is held for 3 leases.
        # (The first two are the start-up self-test's probes: they pass.)
        proxy.add(Rule(Delay(seconds=3 * LEASE), ops=("PutObject",), header="If-Match", after=2))
        cfg_a = node_config(
            "a",
            s3=(proxy.url, s3_bucket),
            schedule="*/30 * * * * *",
            bin_dir=bin_dir,
        )
        a = DaemonProcess(cfg_a, tmp_path / "a.log").start()
        daemons.append(a)

        def fresh_claim() -> str | None:
            """A slot a won no more than 10 s after its time: b then starts long before
            the next slot (30 s later) would make its catch-up pick that one instead."""
            for event in _events(a, "claim_won"):
                slot_at = datetime.strptime(str(event["slot"]), "%Y%m%dT%H%M%SZ")
                if (_at(event) - slot_at.replace(tzinfo=UTC)).total_seconds() <= 10:
                    return str(event["slot"])
            return None

        slot = wait_for(fresh_claim, 75, what="node a claiming a slot at its time")
        wait_for(lambda: bool(_events(a, "run_started")), 45, what="node a running a slot")
        # b starts now: its catch-up finds the slot claimed by a and watches it.
        cfg_b = node_config(
            "b",
            s3=(s3_server, s3_bucket),
            schedule="*/30 * * * * *",
            bin_dir=bin_dir,
        )
        b = DaemonProcess(cfg_b, tmp_path / "b.log").start()
        daemons.append(b)
        want = _rfc3339(slot)
        wait_for(
            lambda: want in _per_slot(_manifests_s3(s3_server, s3_bucket)),
            60,
            what=f"slot {want} published by node b",
        )
        a_lost = _events(a, "claim_lost")
        assert a_lost, a.logs()
        (a_run,) = [e for e in _events(a, "run_finished") if e.get("result") == "failure"][:1]
        assert "claim" in a_run["error"]
        taken = _events(b, "claim_taken_over")
        published = _events(b, "backup_published")
        assert taken and published
        assert _at(a_lost[0]) < _at(taken[0]) < _at(published[0])
        assert _at(a_run) < _at(published[0])
        before = (_at(taken[0]) - _at(a_lost[0])).total_seconds()
        after = (_at(published[0]) - _at(a_lost[0])).total_seconds()
        print(
            f"\nHA delayed renewals: a stopped {before:.1f}s before b took over; "
            f"b published {after:.1f}s after a stopped"
        )
    manifests = _manifests_s3(s3_server, s3_bucket)
    assert [m["node"] for m in manifests if m["scheduled_for"] == want] == ["b"]


@pytest.mark.slow
@pytest.mark.timeout(360)
@pytest.mark.parametrize("kind", ["rgw", "swift"])
async def test_real_stores_conditional_writes_or_ha_refuses(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """On the real stores of tests/objstores.py: either conditional writes work as on
    moto, or the HA self-test refuses the store (never HA silently without them)."""
    target = request.getfixturevalue(BUCKETS[kind])
    cfg = target_config(target)
    store = await open_store(cfg, s3_retry=NO_WAIT_RETRY)

    class Pool:
        async def get(self, _: object) -> Store:
            return store

    try:
        key = f".backupd-claims/probe-{kind}"
        try:
            await store.create_if_absent(key, b"one")
            await store.create_if_absent(key, b"two")
            honoured = False
        except PreconditionFailed:
            honoured = True
        except NotSupported as exc:  # Swift's s3api answers 501 NotImplemented
            print(f"\n{kind}: {exc}")
            honoured = False
        await store.delete([key])
        print(f"\n{kind}: If-None-Match honoured: {honoured}")
        if honoured:
            await _conditional_contract(store)
        else:
            config = parse_config(
                {"storage": {"offsite": {"type": "s3", "bucket": cfg.bucket}}},
            )
            with pytest.raises(ConditionalWritesUnsupported, match="conditional writes"):
                await Coordinator(Pool(), None, "n0").self_test(config)  # type: ignore[arg-type]
    finally:
        await store.aclose()
