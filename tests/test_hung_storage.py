"""Issue 12, finding 4: an S3 store that accepts connections but stops answering.

A real `backupd run` daemon backs up through `tests/faultproxy.py`, which holds
part 2 of the upload after its first MiB and, from then on, every request
(the multipart abort included): the store is hung, not down. A job timeout, a
`backupd cancel` and a SIGTERM must each end the run within the documented
bound (`CLEANUP_DEADLINE`), record it as what it is, and leave the job free
for its next run; what the abort could not remove is left to the sweeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backupd.errors import TransientStorageError
from backupd.storage import open_store
from backupd.storage.base import CLEANUP_DEADLINE
from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.faultproxy import Delay, FaultProxy, Rule
from tests.helpers import no_wait_retry
from tests.pgcluster import wait_for
from tests.test_faults import listed, uploads
from tests.test_storage_contract import s3_config

MiB = 1024 * 1024
# What a run may take beyond the cleanup deadline to be recorded (a loaded 2-core machine).
SLACK = 5.0


HungDaemon = Callable[..., tuple[DaemonProcess, Path, Rule]]


@pytest.fixture
def hung_daemon(
    tmp_path: Path,
    big_db: str,
    proxy: FaultProxy,
    proxied_config: ConfigFile,
    daemons: list[DaemonProcess],
) -> HungDaemon:
    """`hung_daemon(**keys)`: a daemon whose job uploads `big_db` through the proxy, with
    `keys` (`extra_job`, `extra_daemon`) in its config; the returned rule holds part 2."""

    def start(
        *, extra_job: dict[str, Any] | None = None, **keys: Any
    ) -> tuple[DaemonProcess, Path, Rule]:
        job = {"compression": "none", **(extra_job or {})}
        cfg = proxied_config(big_db, endpoint=proxy.url, extra_job=job, **keys)
        stall = proxy.add(
            Rule(Delay(3600, after_bytes=MiB), ops=("UploadPart",), query={"partNumber": "2"})
        )
        d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        daemons.append(d)
        return d, cfg, stall

    return start


def connections_to(url: str) -> list[str]:
    """This process's TCP sockets to the proxy (from /proc/net/tcp: remote port, any state)."""
    port = f"{int(url.rsplit(':', 1)[1]):04X}"
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return [row[2] for row in rows if row[2].endswith(":" + port) and row[9] in inodes]


def trigger(d: DaemonProcess) -> str:
    out = d.cli("trigger", "app")
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()[1]  # "run ID started"


def hang_store(proxy: FaultProxy, stall: Rule) -> float:
    """Once part 2 is held, hold every request after it too; returns when (monotonic)."""
    wait_for(lambda: stall.injected >= 1, 60, what="the upload to reach part 2")
    proxy.add(Rule(Delay(3600)))
    return time.monotonic()


def finished(d: DaemonProcess, run_id: str) -> dict[str, Any] | None:
    """The run's `run_finished` log event, once it is logged."""
    for event in d.events():
        if event.get("event") == "run_finished" and event.get("run_id") == run_id:
            return event
    return None


def last_run(d: DaemonProcess) -> dict[str, Any]:
    """The job's last finished run, as `backupd status` shows it."""
    (job,) = d.status()["jobs"]
    assert job["running"] == [], "the job still has a run in progress"
    return job["last_run"]  # type: ignore[no-any-return]


def abort_abandoned(d: DaemonProcess) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("event") == "upload_abort_abandoned"]


@pytest.mark.parametrize(
    ("where", "rule"),
    [
        # 32 MiB: more than the loopback socket buffers hold, so the sender is stuck mid-body.
        ("mid-body", Rule(Delay(3600, after_bytes=MiB), ops=("UploadPart", "PutObject"))),
        ("no reply", Rule(Delay(3600), ops=("ListObjectsV2",))),
    ],
)
async def test_a_store_that_stops_answering_fails_each_request_after_read_timeout(
    proxy: FaultProxy,
    s3_bucket: str,
    where: str,
    rule: Rule,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    """aiohttp's read timeout only starts once the body is sent: a store that stops
    reading mid-body must still fail the request after `read_timeout`."""
    cfg = s3_config(
        proxy.url, s3_bucket, addressing_style="path", part_size=32 * MiB, read_timeout=1.0
    )
    store = await open_store(cfg, s3_retry=no_wait_retry(attempts=2))
    proxy.add(rule)
    t0 = time.monotonic()
    try:
        with pytest.raises(TransientStorageError) as failed:
            if where == "mid-body":
                await store.put_bytes("big", bytes(32 * MiB))
            else:
                await store.list()
    finally:
        await store.aclose()
    took = time.monotonic() - t0
    assert rule.injected == 2  # both attempts held, each given up after ~1 s
    assert took < 10
    if where == "mid-body":
        assert "no progress for 1s sending" in str(failed.value)
    # A connection stuck with an unsent body cannot close cleanly; the kernel drops
    # it (TCP_USER_TIMEOUT = read_timeout), so a hung store leaks no sockets.
    deadline = time.monotonic() + 10
    while connections_to(proxy.url) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert connections_to(proxy.url) == []
    record_testsuite_property(f"read_timeout_1s_{where.replace(' ', '_')}_seconds", round(took, 1))


@pytest.mark.slow
def test_job_timeout_on_a_hung_store_fails_the_run_in_bounded_time(
    hung_daemon: HungDaemon,
    proxy: FaultProxy,
    s3_bucket: str,
    s3_client: Any,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    timeout = 6.0
    d, cfg, stall = hung_daemon(extra_job={"timeout": f"{timeout:g}s"})
    t0 = time.monotonic()
    run_id = trigger(d)
    hang_store(proxy, stall)
    event = wait_for(
        lambda: finished(d, run_id),
        timeout + CLEANUP_DEADLINE + SLACK,
        what="the timed-out run to be recorded",
    )
    took = time.monotonic() - t0
    assert event["result"] == "failure"
    assert event["error"] == f"timed out after {timeout:g}s (job timeout)"
    assert last_run(d)["run_id"] == run_id
    assert last_run(d)["state"] == "failure"
    assert took < timeout + CLEANUP_DEADLINE + SLACK
    # The abort could not reach the store: it is logged, and the upload is left
    # for the sweeper (moto, asked directly, still has it).
    assert abort_abandoned(d)
    assert len(uploads(s3_client, s3_bucket)) == 1
    record_testsuite_property("hung_timeout_run_seconds", round(took, 1))

    # The job is free: once the store answers again the next run succeeds.
    proxy.clear()
    proxy.release()
    out = d.cli("trigger", "app", "--wait")
    assert out.returncode == 0, out.stdout + out.stderr + d.logs()
    assert len(listed(cfg)) == 1


@pytest.mark.slow
def test_cancel_on_a_hung_store_ends_the_run_in_bounded_time(
    hung_daemon: HungDaemon,
    proxy: FaultProxy,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    d, _, stall = hung_daemon()
    run_id = trigger(d)
    hang_store(proxy, stall)
    t0 = time.monotonic()
    out = d.cli("cancel", run_id)
    assert out.returncode == 0, out.stderr
    event = wait_for(
        lambda: finished(d, run_id), CLEANUP_DEADLINE + SLACK, what="the cancelled run to end"
    )
    took = time.monotonic() - t0
    assert event["result"] == "cancelled"
    assert last_run(d)["run_id"] == run_id
    assert last_run(d)["state"] == "cancelled"
    assert abort_abandoned(d)
    record_testsuite_property("hung_cancel_seconds", round(took, 1))


@pytest.mark.slow
def test_sigterm_on_a_hung_store_exits_after_the_grace_and_records_a_failure(
    hung_daemon: HungDaemon,
    proxy: FaultProxy,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    grace = 2.0
    d, _, stall = hung_daemon(extra_daemon={"shutdown_grace": f"{grace:g}s"})
    run_id = trigger(d)
    hang_store(proxy, stall)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(grace + CLEANUP_DEADLINE + SLACK) == 0
    took = time.monotonic() - t0
    event = finished(d, run_id)
    assert event is not None
    assert event["result"] == "failure"
    assert event["error"] == f"interrupted by daemon shutdown (after shutdown_grace {grace:g}s)"
    assert took < grace + CLEANUP_DEADLINE + SLACK
    record_testsuite_property("hung_sigterm_exit_seconds", round(took, 1))
