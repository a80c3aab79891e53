"""Issue 8: things break on purpose, and a backup is still either complete or absent.

S3 faults come from `tests/faultproxy.py` between backupd and moto; the
database, pg_dump, the disk and the daemon process are the real ones, broken
for real (a PostgreSQL restart, a wrapped pg_dump, a full tmpfs, SIGKILL).
Each test asserts what a user would check: what `backupd list` shows, what
the bucket and the directory hold, whether the bytes restore, what the
metrics and the logs say.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from backupd.catalog.manifest import Manifest
from backupd.config.file import load_config, parse_config
from backupd.config.model import Config
from backupd.daemon.lifecycle import schedule_entries
from backupd.daemon.maintenance import sweep
from backupd.daemon.runner import JobBusy, Run, Runner, StorePool
from backupd.daemon.scheduler import ScheduleLoop
from backupd.errors import StorageError
from backupd.observe.metrics import Metrics
from backupd.operations.backup import Trigger, run_backup
from backupd.storage import Store, open_store
from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.fakeclock import FakeClock
from tests.faultproxy import (
    TRANSIENT_FAULTS,
    Delay,
    ErrorReply,
    FaultProxy,
    OneOf,
    Rule,
    TruncateUpstream,
)
from tests.helpers import no_wait_retry, restore_to, run_cli, wrapped_bin_dir
from tests.pgcluster import PgCluster, wait_for
from tests.test_runner import fake_manifest

MiB = 1024 * 1024

FAST_RETRY = no_wait_retry(attempts=6)

# -- fixtures and helpers ---------------------------------------------------------------------


@asynccontextmanager
async def open_stores(config: Config, names: tuple[str, ...]) -> AsyncIterator[dict[str, Store]]:
    stores: dict[str, Store] = {}
    try:
        for name in names:
            stores[name] = await open_store(config.storages[name], s3_retry=FAST_RETRY)
        yield stores
    finally:
        for store in stores.values():
            await store.aclose()


async def no_backoff(seconds: float) -> None:
    """The runner's sleep between attempts, skipped: a test never sleeps for backoff."""


async def run_job(config: Config, job: str = "app") -> tuple[Run, Metrics]:
    """One run through the real Runner (attempts, metrics), its stores opened by its pool."""
    metrics = Metrics()
    metrics.jobs_configured(config.jobs)
    pool = StorePool(s3_retry=FAST_RETRY)
    try:
        runner = Runner(config, pool, metrics=metrics, sleep=no_backoff)
        run = await runner.wait(runner.submit(job, Trigger()))
    finally:
        await pool.aclose()
    return run, metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def keys(s3_client: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []))


def uploads(s3_client: Any, bucket: str) -> list[dict[str, Any]]:
    return list(s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def files(root: Path) -> list[Path]:
    """Every file under `root`, hidden temporary uploads included."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def pids(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def stored_sha256(s3_client: Any, bucket: str, manifest: Manifest, prefix: str = "prod/") -> str:
    (entry,) = manifest.objects
    body = s3_client.get_object(Bucket=bucket, Key=prefix + manifest.object_key(entry))["Body"]
    return hashlib.sha256(body.read()).hexdigest()


def listed(cfg: Path) -> list[dict[str, Any]]:
    out = run_cli("list", "-c", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# -- S3 faults ------------------------------------------------------------------------------


async def test_thirty_percent_of_s3_requests_failing_still_gives_a_restorable_backup(
    pg: PgCluster,
    big_db: str,
    proxied_config: ConfigFile,
    proxy: FaultProxy,
    s3_bucket: str,
    s3_client: Any,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    """Three backups in a row through the faults. Each request gets 6 tries; at 30%
    one now and then still runs out, and then the run's next attempt
    (max_attempts = 3) starts that backup over."""
    cfg = proxied_config(
        big_db,
        endpoint=proxy.url,
        extra_job={"compression": "none"},
        max_attempts=3,
    )
    config = load_config(cfg)
    flaky = proxy.add(Rule(TRANSIENT_FAULTS, probability=0.3))
    runs: list[Run] = []
    with structlog.testing.capture_logs() as events:
        for _ in range(3):
            run, metrics = await run_job(config)
            assert run.state == "success", run.error
            assert sample(metrics, "backupd_job_attempts_total", job="app", result="retry") == (
                run.attempts - 1
            )
            runs.append(run)
    proxy.clear()
    assert flaky.injected >= 5, proxy.injected()
    # backupd logs each retry it makes; aiohttp itself silently resends an idempotent
    # request (PUT, HEAD) once when a reused connection drops, so not every fault is logged.
    retries = [e for e in events if e["event"] == "stamina.retry_scheduled"]
    assert 0 < len(retries) <= flaky.injected
    if all(run.attempts == 1 for run in runs):  # every faulted request was sent again
        log = proxy.log()
        for n, seen in enumerate(log):
            if seen.fault is not None:
                assert any(
                    (s.op, s.path, s.query.get("partNumber"), s.fault)
                    == (seen.op, seen.path, seen.query.get("partNumber"), None)
                    for s in log[n + 1 :]
                ), seen

    # Lost replies to CreateMultipartUpload (or a failed attempt's aborts that ran out
    # of tries) leave uploads that no backup refers to: the sweeper's job.
    backups = listed(cfg)
    assert sorted(b["stem"] for b in backups) == sorted(run.backup or "" for run in runs)
    leftovers = len(uploads(s3_client, s3_bucket))
    async with open_stores(config, ("offsite",)) as stores:
        swept = await sweep(stores["offsite"], 0.0, set())
    assert swept.aborted_uploads == leftovers and swept.failed == 0
    assert uploads(s3_client, s3_bucket) == []
    assert len(keys(s3_client, s3_bucket)) == 2 * 3  # each manifest and its data object

    # The stored bytes are the ones the manifests vouch for, and the latest restores.
    for backup in backups:
        manifest = Manifest.from_json(json.dumps(backup).encode())
        assert stored_sha256(s3_client, s3_bucket, manifest) == manifest.objects[0].sha256
    target = "restored_" + uuid.uuid4().hex[:6]
    pg.createdb(target)
    try:
        out = restore_to(cfg, pg, target)
        assert out.returncode == 0, out.stderr
        assert pg.row_counts(target) == pg.row_counts(big_db) == {"public.blobs": 200000}
    finally:
        pg.dropdb(target)
    figures = {
        "s3_requests": flaky.matched,
        "faults_injected": flaky.injected,
        "retries_logged": len(retries),
        "attempts": sum(run.attempts for run in runs),
        "leftovers_swept": leftovers + swept.deleted_orphans,
    }
    for name, value in figures.items():
        record_testsuite_property(f"flaky_{name}", value)


@pytest.mark.parametrize("problem", ["AccessDenied", "NoSuchBucket"])
async def test_refusal_fails_the_run_once_without_a_retry_storm(
    sample_db: str,
    proxied_config: ConfigFile,
    proxy: FaultProxy,
    s3_bucket: str,
    problem: str,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    bucket = s3_bucket
    if problem == "AccessDenied":
        proxy.add(Rule(ErrorReply(403, "AccessDenied", "Access Denied")))
    else:
        bucket = "missing-" + uuid.uuid4().hex[:8]  # moto itself answers NoSuchBucket
    cfg = proxied_config(
        sample_db,
        endpoint=proxy.url,
        bucket=bucket,
        max_attempts=4,
    )
    with structlog.testing.capture_logs() as events:
        run, metrics = await run_job(load_config(cfg))
    assert run.state == "failure" and run.attempts == 1
    expected = "access denied to bucket" if problem == "AccessDenied" else "does not exist"
    assert expected in (run.error or "") and repr(bucket) in (run.error or "")
    assert not [e for e in events if e["event"] == "stamina.retry_scheduled"]
    assert sample(metrics, "backupd_job_attempts_total", job="app", result="failure") == 1
    assert sample(metrics, "backupd_job_attempts_total", job="app", result="retry") == 0
    assert sample(metrics, "backupd_job_runs_total", job="app", result="failure") == 1
    # One refused request: the small dump goes up as a single PutObject.
    assert proxy.seen() == {"PutObject": 1}
    record_testsuite_property(f"refused_{problem}_s3_requests", sum(proxy.seen().values()))


@pytest.mark.parametrize("times", [1, None], ids=["once", "always"])
async def test_complete_answering_200_with_an_error(
    big_db: str,
    proxied_config: ConfigFile,
    proxy: FaultProxy,
    s3_bucket: str,
    s3_client: Any,
    times: int | None,
) -> None:
    """The store assembles the object, then says 200 with an <Error> body (S3 documents this).

    Once: the retry finds the upload gone, the size check confirms the object, the
    backup is published. Always: the run fails, and the object the store did
    assemble is deleted, so nothing is left that looks like data.
    """
    cfg = proxied_config(
        big_db,
        endpoint=proxy.url,
        extra_job={"compression": "none"},
    )
    config = load_config(cfg)
    job = config.jobs["app"]
    fault = ErrorReply(200, "InternalError", "We encountered an internal error.", forward=True)
    proxy.add(Rule(fault, ops=("CompleteMultipartUpload",), times=times))
    async with open_stores(config, job.storage) as stores:
        if times == 1:
            manifest = await run_backup(job, config.sources["main"], stores, trigger=Trigger())
        else:
            with pytest.raises(StorageError, match="complete upload") as failed:
                await run_backup(job, config.sources["main"], stores, trigger=Trigger())
    completes = proxy.seen()["CompleteMultipartUpload"]
    if times == 1:
        assert completes == 2
        assert stored_sha256(s3_client, s3_bucket, manifest) == manifest.objects[0].sha256
        assert [m["stem"] for m in listed(cfg)] == [manifest.stem]
    else:
        assert completes == FAST_RETRY.attempts and "InternalError" in str(failed.value)
        assert keys(s3_client, s3_bucket) == [] and uploads(s3_client, s3_bucket) == []
        assert listed(cfg) == []


async def test_a_part_the_store_kept_short_fails_the_run(
    big_db: str,
    proxied_config: ConfigFile,
    proxy: FaultProxy,
    s3_bucket: str,
    s3_client: Any,
) -> None:
    """A store that does not check Content-MD5 keeps a truncated part and answers 200.

    The part is cut to 5 MiB (still a legal part size), so only backupd's own
    check of the completed object's size can notice.
    """
    cfg = proxied_config(
        big_db,
        endpoint=proxy.url,
        extra_job={"compression": "none"},
        s3_extra={"part_size": "6MiB"},
    )
    config = load_config(cfg)
    job = config.jobs["app"]
    proxy.add(Rule(TruncateUpstream(5 * MiB), ops=("UploadPart",), query={"partNumber": "1"}))
    async with open_stores(config, job.storage) as stores:
        with pytest.raises(StorageError, match=r"bytes after upload, expected"):
            await run_backup(job, config.sources["main"], stores, trigger=Trigger())
    assert proxy.injected() == {"body cut to 5242880 bytes upstream": 1}
    assert keys(s3_client, s3_bucket) == [] and uploads(s3_client, s3_bucket) == []
    assert listed(cfg) == []


async def test_a_target_failing_at_complete_takes_back_the_target_that_completed(
    tmp_path: Path,
    big_db: str,
    proxied_config: ConfigFile,
    proxy: FaultProxy,
    s3_bucket: str,
    s3_client: Any,
) -> None:
    """The filesystem copy is already renamed into place when S3 refuses the Complete:
    the run fails, and the finished file is deleted, not left for the sweeper."""
    fs = tmp_path / "store"
    cfg = proxied_config(
        big_db,
        endpoint=proxy.url,
        fs_path=fs,
        extra_job={"compression": "none"},
    )
    held = proxy.add(
        Rule(
            Delay(120, then=ErrorReply(403, "AccessDenied", "Access Denied")),
            ops=("CompleteMultipartUpload",),
        )
    )
    run_task = asyncio.create_task(run_job(load_config(cfg)))

    def fs_published() -> bool:
        return held.injected == 1 and any(p.suffix == ".dump" for p in files(fs))

    await asyncio.to_thread(wait_for, fs_published, 60, what="the filesystem copy to complete")
    proxy.release()
    run, _ = await run_task
    assert run.state == "failure" and "access denied" in (run.error or "")
    assert files(fs) == []
    assert keys(s3_client, s3_bucket) == [] and uploads(s3_client, s3_bucket) == []
    assert listed(cfg) == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 13))
async def test_random_faults_never_half_publish(
    tmp_path: Path,
    big_db: str,
    proxied_config: ConfigFile,
    s3_server: str,
    s3_bucket: str,
    s3_client: Any,
    seed: int,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    """40% of S3 requests fail, some of them for good (403), with only 2 tries per
    request and 2 attempts per run: runs succeed or fail, and either way no target
    is ever published alone, and the sweeper can clear whatever S3 kept."""
    tight = no_wait_retry(attempts=2, timeout=30.0)
    fs = tmp_path / "store"
    with FaultProxy(s3_server, seed=seed) as proxy:
        cfg = proxied_config(
            big_db,
            endpoint=proxy.url,
            fs_path=fs,
            extra_job={"compression": "none"},
            max_attempts=2,
        )
        config = load_config(cfg)
        faults = OneOf((*TRANSIENT_FAULTS.faults, ErrorReply(403, "AccessDenied", "no")))
        proxy.add(Rule(faults, probability=0.4))
        pool = StorePool(s3_retry=tight)
        try:
            runner = Runner(config, pool, sleep=no_backoff)
            run = await runner.wait(runner.submit("app", Trigger()))
        finally:
            await pool.aclose()
        proxy.clear()
        async with open_stores(config, ("offsite",)) as stores:
            swept = await sweep(stores["offsite"], 0.0, set())
        assert swept.failed == 0
        injected = sum(proxy.injected().values())
    record_testsuite_property(f"random_faults_seed{seed}", f"{run.state}, {injected} faults")
    s3_manifests = [k for k in keys(s3_client, s3_bucket) if k.endswith(".manifest.json")]
    fs_files = files(fs)
    if run.state == "success":
        assert len(s3_manifests) == 1
        assert [p.name for p in fs_files if p.name.endswith(".manifest.json")] == [
            Path(s3_manifests[0]).name
        ]
        assert len(fs_files) == 2  # and its one data object, nothing of a failed attempt
    else:
        assert run.state == "failure" and s3_manifests == [] and fs_files == []
    assert uploads(s3_client, s3_bucket) == []
    assert len(keys(s3_client, s3_bucket)) == (2 if run.state == "success" else 0)


# -- the daemon killed at each stage of a backup ----------------------------------------------

# stage -> (a rule that holds the daemon there, (uploads, objects) a crash there leaves)
STAGES: dict[str, tuple[Callable[[], Rule], tuple[int, int]]] = {
    "before-upload": (lambda: Rule(Delay(120), ops=("CreateMultipartUpload",)), (0, 0)),
    "mid-part": (
        lambda: Rule(Delay(120, after_bytes=MiB), ops=("UploadPart",), query={"partNumber": "2"}),
        (1, 0),
    ),
    "after-last-part": (lambda: Rule(Delay(120), ops=("CompleteMultipartUpload",)), (1, 0)),
    "before-manifest": (
        lambda: Rule(Delay(120), ops=("PutObject",), key_suffix=".manifest.json"),
        (0, 1),
    ),
}


@pytest.mark.parametrize(
    "stage",
    [
        pytest.param("before-upload", marks=pytest.mark.slow),
        "mid-part",
        pytest.param("after-last-part", marks=pytest.mark.slow),
        pytest.param("before-manifest", marks=pytest.mark.slow),
    ],
)
def test_kill_9_at_each_stage_leaves_nothing_listed_and_the_restart_sweeps(
    tmp_path: Path,
    big_db: str,
    proxied_config: ConfigFile,
    proxy: FaultProxy,
    s3_bucket: str,
    s3_client: Any,
    daemons: list[DaemonProcess],
    stage: str,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    """The proxy holds the daemon at a stage (seen in its request log), then SIGKILL:
    no cleanup code runs. What the crash leaves is never a backup, and the next
    daemon sweeps it and backs up again."""
    marker = "pgdump-" + uuid.uuid4().hex
    bindir = wrapped_bin_dir(tmp_path / "bin", f'exec -a {marker} "$REAL" "$@"')
    cfg = proxied_config(
        big_db,
        endpoint=proxy.url,
        s3_extra='abandoned_upload_grace = "1s"\n',
        extra_source={"pg_bin_dir": bindir},
        extra_job={"compression": "none"},
    )
    make_rule, (left_uploads, left_objects) = STAGES[stage]
    rule = proxy.add(make_rule())
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    assert d.cli("trigger", "app").returncode == 0
    wait_for(lambda: rule.injected >= 1, 60, what=f"the daemon to reach stage {stage}")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    assert d.wait(10) == -signal.SIGKILL
    proxy.clear()

    # Nothing is a backup, pg_dump does not outlive the daemon, and the crash left
    # exactly the leftovers of its stage.
    assert listed(cfg) == []
    wait_for(lambda: not pids(marker), 30, what="pg_dump to exit after the daemon died")
    assert len(uploads(s3_client, s3_bucket)) == left_uploads
    assert len(keys(s3_client, s3_bucket)) == left_objects
    assert not [k for k in keys(s3_client, s3_bucket) if k.endswith(".manifest.json")]

    # Once the leftovers are older than the 1s grace, a restarted daemon sweeps them at start.
    def leftover_times() -> list[datetime]:
        times = [u["Initiated"] for u in uploads(s3_client, s3_bucket)]
        listing = s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
        return times + [o["LastModified"] for o in listing]

    wait_for(
        lambda: all(datetime.now(UTC) - t > timedelta(seconds=1.2) for t in leftover_times()),
        10,
        what="the leftovers to age past the grace",
    )
    again = DaemonProcess(cfg, tmp_path / "daemon2.log").start()
    daemons.append(again)

    def swept() -> list[dict[str, Any]] | bool:
        if uploads(s3_client, s3_bucket) or keys(s3_client, s3_bucket):
            return False
        return [e for e in again.events() if e.get("event") == "sweep_done"] or not (
            left_uploads or left_objects  # nothing to sweep: nothing logged
        )

    done = wait_for(swept, 30, what="the restarted daemon to sweep the leftovers")
    if left_uploads or left_objects:
        assert [(e["aborted_uploads"], e["deleted_orphans"]) for e in done] == [
            (left_uploads, left_objects)
        ]
    record_testsuite_property(
        f"kill9_{stage}_swept", f"{left_uploads} uploads, {left_objects} objects"
    )
    out = again.cli("trigger", "app", "--wait")
    assert out.returncode == 0, out.stdout + out.stderr + again.logs()
    (backup,) = listed(cfg)
    manifest = Manifest.from_json(json.dumps(backup).encode())
    assert stored_sha256(s3_client, s3_bucket, manifest) == manifest.objects[0].sha256
    assert uploads(s3_client, s3_bucket) == []


# -- the database, pg_dump and the disk -------------------------------------------------------


async def test_postgres_restarted_mid_dump_fails_the_attempt_and_the_retry_succeeds(
    tmp_path: Path,
    pg: PgCluster,
    big_db: str,
    config_file: ConfigFile,
    s3_bucket: str,
    s3_client: Any,
) -> None:
    streaming, go = tmp_path / "streaming", tmp_path / "go"
    # The first 256 KiB go through, then the wrapper stops reading until the test says go:
    # pg_dump is blocked mid-COPY with its connection open when the server restarts.
    bindir = wrapped_bin_dir(
        tmp_path / "bin",
        "set -o pipefail\n"
        f'"$REAL" "$@" | {{ dd bs=262144 count=1 iflag=fullblock status=none; touch "{streaming}"\n'
        f'  while [ ! -e "{go}" ]; do sleep 0.05; done; cat; }}',
    )
    fs = tmp_path / "store"
    cfg = config_file(big_db, s3=True, extra_source={"pg_bin_dir": bindir}, max_attempts=3)
    config = load_config(cfg)

    async def restart_when_streaming() -> None:
        await asyncio.to_thread(wait_for, streaming.exists, 60, what="pg_dump to stream")
        await asyncio.to_thread(pg.restart)
        go.touch()

    with structlog.testing.capture_logs() as events:
        restarter = asyncio.create_task(restart_when_streaming())
        run, metrics = await run_job(config)
        await restarter
    assert run.state == "success", run.error
    assert run.attempts == 2
    (failed,) = [e for e in events if e["event"] == "attempt_failed"]
    assert failed["transient"] is True and "pg_dump" in failed["error"]
    assert sample(metrics, "backupd_job_attempts_total", job="app", result="retry") == 1
    assert sample(metrics, "backupd_job_attempts_total", job="app", result="success") == 1
    # Only the second attempt's backup exists, on both targets, and nothing else.
    (backup,) = listed(cfg)
    assert backup["stem"] == run.backup and backup["attempts"] == 2
    assert len(files(fs)) == 2 and len(keys(s3_client, s3_bucket)) == 2
    assert uploads(s3_client, s3_bucket) == []


@pytest.mark.parametrize("output", ["", "PGDMP"], ids=["empty", "tiny"])
async def test_pg_dump_exiting_0_with_too_little_output_is_a_failure(
    tmp_path: Path,
    sample_db: str,
    config_file: ConfigFile,
    s3_bucket: str,
    s3_client: Any,
    output: str,
) -> None:
    bindir = wrapped_bin_dir(tmp_path / "bin", f"printf '{output}'\nexit 0")
    fs = tmp_path / "store"
    cfg = config_file(sample_db, s3=True, extra_source={"pg_bin_dir": bindir}, max_attempts=3)
    run, metrics = await run_job(load_config(cfg))
    assert run.state == "failure" and run.attempts == 1  # not transient: never retried
    assert f"is {len(output)} bytes, below min_size 1024" in (run.error or "")
    assert sample(metrics, "backupd_job_runs_total", job="app", result="failure") == 1
    assert sample(metrics, "backupd_job_last_success_timestamp_seconds", job="app") == 0
    assert listed(cfg) == []
    assert (
        files(fs) == [] and keys(s3_client, s3_bucket) == [] and not uploads(s3_client, s3_bucket)
    )


@pytest.fixture
def small_fs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of `request.param` bytes (e.g. "2m"); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={request.param},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


@pytest.mark.parametrize(
    ("small_fs", "upload_began"), [("2m", False), ("7m", True)], indirect=["small_fs"]
)
async def test_full_filesystem_fails_the_run_and_publishes_no_other_target(
    tmp_path: Path,
    big_db: str,
    proxied_config: ConfigFile,
    proxy: FaultProxy,
    s3_bucket: str,
    s3_client: Any,
    small_fs: Path,
    upload_began: bool,
) -> None:
    """2 MiB fill up before the first S3 part is sent; 7 MiB after the multipart upload began."""
    marker = "pgdump-" + uuid.uuid4().hex
    bindir = wrapped_bin_dir(tmp_path / "bin", f'exec -a {marker} "$REAL" "$@"')
    cfg = proxied_config(
        big_db,
        endpoint=proxy.url,
        fs_path=small_fs,
        extra_source={"pg_bin_dir": bindir},
        extra_job={"compression": "none"},
        max_attempts=3,
    )
    run, metrics = await run_job(load_config(cfg))
    assert run.state == "failure" and run.attempts == 1  # a full disk is not retried
    assert "filesystem storage local" in (run.error or "")
    assert "no space left on device" in (run.error or "")
    assert sample(metrics, "backupd_job_runs_total", job="app", result="failure") == 1
    assert files(small_fs) == []  # no temporary file, no directory of the run left
    seen = proxy.seen()
    assert (seen["CreateMultipartUpload"], seen["AbortMultipartUpload"]) == (
        (1, 1) if upload_began else (0, 0)
    )
    assert seen["PutObject"] == 0 and seen["CompleteMultipartUpload"] == 0
    assert keys(s3_client, s3_bucket) == [] and uploads(s3_client, s3_bucket) == []
    assert listed(cfg) == []
    assert pids(marker) == []


# -- the clock ---------------------------------------------------------------------------------

CLOCK_CONFIG = """
[daemon]
max_concurrent_jobs = 10
[source.main]
type = "postgres"
dsn = "postgresql://backup@db1/app"
max_concurrent = 10
[storage.local]
type = "filesystem"
path = "{root}"
{jobs}
"""


def clock_config(root: Path, **jobs: tuple[str, str]) -> Config:
    text = CLOCK_CONFIG.format(
        root=root,
        jobs="".join(
            f'[job.{name}]\nsource = "main"\nstorage = ["local"]\n'
            f'schedule = ["{expr}"]\ntimezone = "{tz}"\n'
            for name, (expr, tz) in jobs.items()
        ),
    )
    return parse_config(tomllib.loads(text))


class SimulatedRunner:
    """The real Runner on the fake clock: each run lasts `duration` seconds of it (its
    fake attempt waits until `end_runs` releases it), and a fire while the job runs
    is skipped by the runner's own overlap rule (JobBusy)."""

    def __init__(self, clock: FakeClock, config: Config, duration: float) -> None:
        self.clock = clock
        self.duration = duration
        self.fired: dict[str, list[datetime]] = {}
        self.started: dict[str, list[datetime]] = {}
        self.overlaps: dict[str, int] = {}
        self.missed: dict[str, int] = {}
        self.pool = StorePool()
        self.runner = Runner(config, self.pool, attempt=self._attempt)
        self._ends: list[tuple[float, Run]] = []  # monotonic end of each run, in start order
        self._release: dict[str, asyncio.Event] = {}

    async def _attempt(self, job: Any, source: Any, stores: Any, run: Run, hooks: Any) -> Manifest:
        await self._release[run.run_id].wait()
        return fake_manifest(job.name, run.attempts)

    async def fire(self, key: str, slot: datetime) -> None:
        job = key.split(":", 1)[1]
        assert self.clock.now() >= slot, "a slot fired early"
        self.fired.setdefault(job, []).append(slot)
        try:
            run = self.runner.submit(job, Trigger("schedule"), scheduled_for=slot)
        except JobBusy:
            self.overlaps[job] = self.overlaps.get(job, 0) + 1
            return
        self._release[run.run_id] = asyncio.Event()
        self._ends.append((self.clock.monotonic() + self.duration, run))
        self.started.setdefault(job, []).append(slot)

    async def end_runs(self) -> None:
        """Ends each run `duration` after its fire; always back asleep on the clock."""
        while True:
            if not self._ends:  # idle: look again a (fake) second later
                await self.clock.sleep(1.0)
            elif (wait := self._ends[0][0] - self.clock.monotonic()) > 0:
                await self.clock.sleep(wait)
            else:
                run = self._ends.pop(0)[1]
                self._release[run.run_id].set()
                await self.runner.wait(run)

    def skipped(self, key: str, reason: str, count: int) -> None:
        assert reason == "missed"
        job = key.split(":", 1)[1]
        self.missed[job] = self.missed.get(job, 0) + count

    def running(self) -> list[str]:
        return sorted(run.job for run in self.runner.active())


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def test_reload_while_jobs_run_and_clock_jumps_fire_every_slot_once(tmp_path: Path) -> None:
    """Berlin's fall-back night: a reload in the repeated hour while two jobs run (one
    of them removed by it), then the wall clock stepped forward 20 minutes and back 10.
    The entries are built by the daemon's own `schedule_entries` from parsed configs."""
    start = utc("2026-10-25 00:40")  # 02:40 CEST; clocks go back at 01:00 UTC
    clock = FakeClock(start)
    before = clock_config(
        tmp_path,
        tenmin=("*/10 * * * *", "Europe/Berlin"),
        fixed=("45 2 * * *", "Europe/Berlin"),
        minutely=("* * * * *", "UTC"),
        dropped=("*/5 * * * *", "UTC"),
    )
    after = clock_config(
        tmp_path,
        tenmin=("*/10 * * * *", "Europe/Berlin"),  # unchanged: keeps its pending slot
        fixed=("45 2 * * *", "Europe/Berlin"),
        minutely=("*/2 * * * *", "UTC"),  # changed: recomputed, never before its last fire
        added=("*/15 * * * *", "Asia/Kolkata"),  # +05:30: quarter hours fall on UTC ones
    )
    sim = SimulatedRunner(clock, before, duration=150.0)
    loop = ScheduleLoop(clock, schedule_entries(before), sim.fire, skipped=sim.skipped)
    task = asyncio.create_task(loop.run())
    ender = asyncio.create_task(sim.end_runs())
    await clock.wait_for_sleepers(2)
    try:
        await clock.advance(25 * 60 + 30)  # 01:05:30 UTC = 02:05:30 CET, the second 02:xx
        assert sim.running() == ["dropped", "minutely"]
        sim.runner.update_config(after)  # as the daemon's reload does
        loop.replace(schedule_entries(after))
        await clock.wait_for_sleepers(2)
        await clock.advance(14 * 60 + 30)  # 01:20
        clock.jump(20 * 60)  # NTP steps the wall clock to 01:40
        await clock.advance(20 * 60)  # 02:00
        clock.jump(-10 * 60)  # and back to 01:50
        await clock.advance(20 * 60)  # 02:10
    finally:
        task.cancel()
        ender.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sim.runner.shutdown(0.0)
        await sim.pool.aclose()

    def at(first: str, last: str | None = None, step: int = 1) -> list[datetime]:
        begin = utc(f"2026-10-25 {first}")
        end = utc(f"2026-10-25 {last or first}")
        return [
            begin + timedelta(minutes=m)
            for m in range(0, int((end - begin).seconds / 60) + 1, step)
        ]

    # Fixed-time 02:45 runs once, at its first occurrence, not again at 02:45 CET.
    assert sim.fired["fixed"] == at("00:45")
    # Every 10 real minutes through the repeated hour; the forward step fires the
    # latest passed slot (01:40) and reports 01:30 as missed; the step back refires nothing.
    assert sim.fired["tenmin"] == at("00:50", "01:20", 10) + at("01:40", "02:10", 10)
    assert sim.missed["tenmin"] == 1
    # Every minute until the reload, every two after it; the jump skips (and counts) 9.
    assert sim.fired["minutely"] == (
        at("00:41", "01:06") + at("01:08", "01:20", 2) + at("01:40", "02:10", 2)
    )
    assert sim.missed["minutely"] == 9
    # Added at the reload; its 01:30 was jumped over and fires late, as the latest slot.
    assert sim.fired["added"] == at("01:15", "02:00", 15)
    # Removed at the reload while it ran: no slot after the reload.
    assert sim.fired["dropped"] == at("00:45", "01:05", 5)
    # A slot that came while the previous run went on was skipped as the runner does.
    assert sim.overlaps["minutely"] > 0
