"""Issue 5 acceptance: retention applied to real storage, after runs and by `backupd prune`.

Deletion is manifest first, then data: a prune interrupted between the two
leaves no manifest without its data, and what it leaves is swept later.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import re
import tomllib
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from backupd.catalog.listing import list_backups
from backupd.catalog.manifest import MANIFEST_SUFFIX, FailedDatabase, Manifest, now_utc
from backupd.config.file import load_config
from backupd.config.model import Config, FilesystemStorage, Job
from backupd.daemon.maintenance import sweep
from backupd.daemon.runner import StorePool
from backupd.observe.metrics import Metrics
from backupd.operations.backup import Trigger, run_backup
from backupd.operations.prune import prune_job
from backupd.storage.base import ObjectInfo
from backupd.storage.filesystem import FilesystemStore
from tests import configs
from tests.configs import ConfigFile
from tests.helpers import restamp, run_cli, runs_with_prune
from tests.pgcluster import SAMPLE_SQL, PgCluster


def _fs_keys(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _s3_keys(s3_client: Any, bucket: str) -> set[str]:
    contents = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"].removeprefix("prod/") for o in contents}


def _keys_of(manifests: Sequence[Manifest]) -> set[str]:
    keys = {m.manifest_key for m in manifests}
    return keys | {m.object_key(o) for m in manifests for o in m.objects}


def _retention(cfg: Path, policy: str) -> None:
    configs.edit(cfg, {"job.app.retention": tomllib.loads(policy)["retention"]})


async def _listing(config: Config, storage: str) -> list[Manifest]:
    pool = StorePool()
    try:
        return await list_backups(await pool.get(config.storages[storage]), "app")
    finally:
        await pool.aclose()


def _plan(stdout: str) -> dict[str, dict[str, list[str]]]:
    """`prune` output per storage: stems by verb (keep, would delete, deleted)."""
    plans: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        head = re.match(r"job app, storage (\S+): ", line)
        if head:
            current = plans.setdefault(head.group(1), {})
            continue
        verb, stem = re.match(r"  (keep|would delete|deleted)\s+(\S+)", line).groups()  # type: ignore[union-attr]
        current.setdefault(verb, []).append(stem)
    return plans


async def test_keep_last_prunes_after_each_run_and_prune_applies_its_dry_run(
    tmp_path: Path,
    config_file: ConfigFile,
    sample_db: str,
    s3_bucket: str,
    s3_client: Any,
) -> None:
    fs = tmp_path / "store"
    cfg = config_file(
        sample_db,
        path=tmp_path / "backupd.toml",
        s3=True,
        extra_job={"retention": {"keep_last": 2}},
    )
    metrics = Metrics()
    stems = await runs_with_prune(load_config(cfg), 4, metrics)

    # Two backups remain in each storage, the two newest, and nothing else of the others.
    config = load_config(cfg)
    for storage, keys in (("local", _fs_keys(fs)), ("offsite", _s3_keys(s3_client, s3_bucket))):
        remaining = await _listing(config, storage)
        assert [m.stem for m in remaining] == [stems[3], stems[2]]
        assert keys == _keys_of(remaining)
        assert not any(stem in key for key in keys for stem in stems[:2])
        deleted = metrics.registry.get_sample_value(
            "backupd_retention_deleted_total", {"job": "app", "storage": storage}
        )
        assert deleted == 2
        assert (
            metrics.registry.get_sample_value("backupd_backups", {"job": "app", "storage": storage})
            == 2
        )

    # More backups under a looser policy, then a stricter one: the dry run plans, deletes nothing.
    _retention(cfg, "retention = { keep_last = 10 }")
    stems += await runs_with_prune(load_config(cfg), 3)
    _retention(cfg, "retention = { keep_last = 3 }")
    before = (_fs_keys(fs), _s3_keys(s3_client, s3_bucket))
    out = run_cli("prune", "app", "--dry-run", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert (_fs_keys(fs), _s3_keys(s3_client, s3_bucket)) == before
    plan = _plan(out.stdout)
    newest_first = stems[:1:-1]  # the five that exist: stems[6] .. stems[2]
    for storage in ("local", "offsite"):
        assert plan[storage] == {
            "keep": newest_first[:3],
            "would delete": [stems[2], stems[3]],
        }
    assert f"  keep          {stems[6]}  (newest, last 3)" in out.stdout
    assert f"  keep          {stems[4]}  (last 3)" in out.stdout
    assert "job app, storage local: plan (dry run): keep 3, delete 2" in out.stdout

    # prune applies exactly that plan.
    out = run_cli("prune", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    applied = _plan(out.stdout)
    config = load_config(cfg)
    for storage in ("local", "offsite"):
        assert applied[storage]["deleted"] == plan[storage]["would delete"]
        assert applied[storage]["keep"] == plan[storage]["keep"]
        assert [m.stem for m in await _listing(config, storage)] == plan[storage]["keep"]
    assert _fs_keys(fs) == _keys_of(await _listing(config, "local"))
    assert _s3_keys(s3_client, s3_bucket) == _keys_of(await _listing(config, "offsite"))


class RefusingStore(FilesystemStore):
    """A test double of the filesystem store whose delete() refuses some keys, the way
    S3 DeleteObjects reports per-key errors, or hangs on data keys (a prune killed there)."""

    def __init__(self, cfg: FilesystemStorage) -> None:
        super().__init__(cfg)
        self.refuse: set[str] = set()
        self.hang_on_data = False
        self.hanging = asyncio.Event()

    async def delete(self, keys: Sequence[str]) -> builtins.list[str]:
        if self.hang_on_data and any(not k.endswith(MANIFEST_SUFFIX) for k in keys):
            self.hanging.set()
            await asyncio.Event().wait()  # until the prune is cancelled
        refused = [k for k in keys if k in self.refuse]
        return [*await super().delete([k for k in keys if k not in self.refuse]), *refused]


async def _store_with_backups(
    tmp_path: Path, config_file: ConfigFile, db: str, n: int, policy: str
) -> tuple[Job, RefusingStore, list[Manifest]]:
    cfg = config_file(db, path=tmp_path / "backupd.toml", extra_job=policy + "\n")
    config = load_config(cfg)
    job = config.jobs["app"]
    storage = config.storages["local"]
    assert isinstance(storage, FilesystemStorage)
    store = RefusingStore(storage)
    await store.open()
    manifests = [
        await run_backup(job, config.sources["main"], {"local": store}, trigger=Trigger())
        for _ in range(n)
    ]
    return job, store, manifests


async def test_partial_delete_failures_are_counted_and_retried_by_the_next_prune(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    job, store, (oldest, middle, newest) = await _store_with_backups(
        tmp_path, config_file, sample_db, 3, "retention = { keep_last = 1 }"
    )
    oldest_data = oldest.object_key(oldest.objects[0])
    store.refuse = {oldest_data, middle.manifest_key}
    metrics = Metrics()
    now = now_utc()

    first = await prune_job(job, store, metrics=metrics, now=now, grace=3600)
    assert first.deleted == [oldest.stem]  # its manifest is gone: no longer a backup
    assert first.left == {oldest.stem: [oldest_data]}
    assert first.failed == [middle.stem]  # its manifest stayed: still a whole backup
    assert first.errors == 2
    errors = {"job": "app", "storage": "local"}
    assert metrics.registry.get_sample_value("backupd_retention_delete_errors_total", errors) == 2
    assert [m.stem for m in await list_backups(store, "app")] == [newest.stem, middle.stem]
    assert _fs_keys(store.root) == _keys_of([newest, middle]) | {oldest_data}
    lines = "\n".join(first.describe())
    assert f"FAILED        {middle.stem}" in lines and f"LEFT          {oldest_data}" in lines

    store.refuse = set()
    second = await prune_job(job, store, metrics=metrics, now=now + timedelta(hours=2), grace=3600)
    assert second.deleted == [middle.stem]
    assert second.swept == 1 and second.errors == 0
    assert _fs_keys(store.root) == _keys_of([newest])
    assert metrics.registry.get_sample_value("backupd_retention_deleted_total", errors) == 2


class CountingStore(RefusingStore):
    """Counts listings, and the manifest reads in flight at once."""

    def __init__(self, cfg: FilesystemStorage) -> None:
        super().__init__(cfg)
        self.listings: list[str] = []
        self.reads: list[str] = []
        self.reading = self.most_reading = 0

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        self.listings.append(prefix)
        return await super().list(prefix)

    async def open_read(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        self.reads.append(key)
        self.reading += 1
        self.most_reading = max(self.most_reading, self.reading)
        try:
            await asyncio.sleep(0)  # every read that can start does, before any ends
            async for chunk in super().open_read(key, chunk_size):
                yield chunk
        finally:
            self.reading -= 1


async def test_a_prune_lists_once_and_reads_manifests_at_once(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    """A store's round trips add up (Ceph RGW: ~50 ms a listing or a small read): the
    orphan sweep reuses the prune's listing, less what it deleted, and manifests are read
    READ_CONCURRENCY at a time."""
    job, first, manifests = await _store_with_backups(
        tmp_path, config_file, sample_db, 3, "retention = { keep_last = 1 }"
    )
    store = CountingStore(FilesystemStorage(name="local", path=str(first.root)))
    oldest, middle, newest = manifests
    # an orphan (a backup whose manifest a crash never wrote), older than the grace
    orphan = oldest.object_key(oldest.objects[0]).replace(
        oldest.stem, oldest.stem[:-8] + "0fab0fab"
    )
    (store.root / orphan).parent.mkdir(parents=True, exist_ok=True)
    (store.root / orphan).write_bytes(b"left by a crash")

    outcome = await prune_job(job, store, now=now_utc() + timedelta(hours=2), grace=3600)
    assert store.listings == ["app/"]
    assert store.most_reading == 3
    assert sorted(outcome.deleted) == sorted([middle.stem, oldest.stem]) and outcome.swept == 1
    assert _fs_keys(store.root) == _keys_of([newest])


async def test_the_prune_after_a_run_does_not_read_back_the_manifest_it_just_wrote(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    """One small read less at the end of every run; but only where the listing shows the
    manifest as written: one replaced since (another size) is read back and judged."""
    job, first, manifests = await _store_with_backups(
        tmp_path, config_file, sample_db, 3, "retention = { keep_last = 2 }"
    )
    store = CountingStore(FilesystemStorage(name="local", path=str(first.root)))
    oldest, middle, newest = manifests
    outcome = await prune_job(job, store, published=newest)
    assert sorted(store.reads) == sorted([oldest.manifest_key, middle.manifest_key])
    assert outcome.deleted == [oldest.stem] and newest.stem in outcome.kept

    (store.root / middle.manifest_key).write_bytes(b'{"not": "the manifest written"}\n')
    store.reads = []
    outcome = await prune_job(job, store, published=middle)
    assert sorted(store.reads) == sorted([middle.manifest_key, newest.manifest_key])
    assert [s.key for s in outcome.invalid] == [middle.manifest_key]  # judged, not trusted
    assert outcome.deleted == [] and _fs_keys(store.root) >= {middle.manifest_key}


async def test_prune_killed_between_manifest_and_data_leaves_no_manifest_without_data(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    job, store, (oldest, newest) = await _store_with_backups(
        tmp_path, config_file, sample_db, 2, "retention = { keep_last = 1 }"
    )
    store.hang_on_data = True
    task = asyncio.create_task(prune_job(job, store))
    await asyncio.wait_for(store.hanging.wait(), 30)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    store.hang_on_data = False

    # Every manifest left has all its data; the oldest's data is there, without a manifest.
    remaining = await list_backups(store, "app")
    assert [m.stem for m in remaining] == [newest.stem]
    oldest_data = oldest.object_key(oldest.objects[0])
    assert _fs_keys(store.root) == _keys_of(remaining) | {oldest_data}

    # The sweeper removes it once older than the grace; the complete backup stays.
    early = await sweep(store, 3600, now=now_utc())
    assert early.deleted_orphans == 0 and oldest_data in _fs_keys(store.root)
    late = await sweep(store, 3600, now=now_utc() + timedelta(hours=2))
    assert late.deleted_orphans == 1
    assert _fs_keys(store.root) == _keys_of(remaining)


@pytest.mark.slow
async def test_partial_backups_never_let_retention_delete_a_database_s_newest_copy(
    tmp_path: Path, config_file: ConfigFile, pg: PgCluster, sample_db: str
) -> None:
    """Issue 12, finding 7: two partial backups lacking `billing` follow two complete
    ones; keep_last = 1 keeps the newest partial and the newest complete (the newest
    backup of billing), and deletes the rest."""
    billing = "billing_" + uuid.uuid4().hex[:8]
    pg.createdb(billing)
    try:
        pg.psql(SAMPLE_SQL, billing)
        fs = tmp_path / "store"
        cfg = config_file(
            sample_db,
            path=tmp_path / "backupd.toml",
            extra_job=f'databases = ["{sample_db}", "{billing}"]\n'
            "retention = { keep_last = 10 }\n",
        )
        for _ in range(2):
            out = run_cli("backup", "app", "-c", str(cfg))
            assert out.returncode == 0, out.stderr
    finally:
        pg.dropdb(billing)
    config = load_config(cfg)
    complete_new, complete_old = await _listing(config, "local")
    failed = (FailedDatabase(billing, "pg_dump exited 1: connection refused"),)
    partials = [
        restamp(
            fs,
            complete_new,
            complete_new.started + timedelta(seconds=n),
            databases={sample_db},
            failed=failed,
        )
        for n in (60, 120)
    ]
    out = run_cli("list", "app", "-c", str(cfg))
    partial_rows = [line for line in out.stdout.splitlines() if "partial" in line]
    assert len(partial_rows) == 2
    assert all(line.endswith(f"partial, failed: {billing}") for line in partial_rows)
    listed = json.loads(run_cli("list", "app", "-c", str(cfg), "--json").stdout)
    assert listed[0]["failed"] == [{"database": billing, "error": failed[0].error}]

    configs.edit(cfg, {"job.app.retention.keep_last": 1})
    out = run_cli("prune", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"keep          {partials[1].stem}  (newest, last 1)" in out.stdout
    assert f"keep          {complete_new.stem}  (newest of database {billing})" in out.stdout
    assert f"deleted       {complete_old.stem}" in out.stdout
    assert f"deleted       {partials[0].stem}" in out.stdout
    remaining = await _listing(config, "local")
    assert [m.stem for m in remaining] == [partials[1].stem, complete_new.stem]
    assert _fs_keys(fs) == _keys_of(remaining)
