"""Issue 12, finding 2: one backup stamped in the future by a wrong clock.

Before the fix, a manifest dated 200 days ahead was the "newest" backup for
ever: `keep_last = 1` deleted each new backup right after its run published
it, the last-success gauge stayed in the future (so the "no recent success"
alert could not fire), and the start-up scan saw no missed run to catch up.
Now such a backup is kept, reported (log, `backupd_backups_future`, `list`)
and never counts as the newest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backupd.catalog.listing import find_backup, list_backups
from backupd.catalog.manifest import Manifest
from backupd.catalog.retention import FUTURE_TOLERANCE
from backupd.config.file import load_config
from backupd.observe.metrics import Metrics
from backupd.storage.filesystem import FilesystemStore
from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.helpers import restamp, run_cli, runs_with_prune
from tests.pgcluster import free_port, wait_for


async def test_a_backup_200_days_ahead_makes_keep_last_1_delete_no_new_backup(
    tmp_path: Path, config_file: ConfigFile, sample_db: str
) -> None:
    fs = tmp_path / "store"
    cfg = config_file(
        sample_db,
        path=tmp_path / "backupd.toml",
        extra_job={"retention": {"keep_last": 1}},
    )
    config = load_config(cfg)
    store = FilesystemStore(config.storages["local"])  # type: ignore[arg-type]
    await store.open()
    metrics = Metrics()
    (first,) = await runs_with_prune(config, 1, metrics)
    (manifest,) = await list_backups(store, "app")
    ahead = restamp(fs, manifest, datetime.now(UTC) + timedelta(days=200))

    stems = await runs_with_prune(config, 3, metrics)

    # Each run's backup survived its own prune; the next run's prune deleted it.
    remaining = await list_backups(store, "app")
    assert [m.stem for m in remaining] == [ahead.stem, stems[-1]]
    # The last success is the real newest, never the one 200 days ahead.
    newest = remaining[1]
    value = metrics.registry.get_sample_value
    finished = datetime.fromisoformat(newest.finished_at.replace("Z", "+00:00")).timestamp()
    assert value("backupd_job_last_success_timestamp_seconds", {"job": "app"}) == pytest.approx(
        finished, abs=1.0
    )
    labels = {"job": "app", "storage": "local"}
    assert value("backupd_backups_future", labels) == 1
    assert value("backupd_backups", labels) == 2
    # `latest` is the newest backup not dated in the future.
    assert (await find_backup(store, "app", "latest")).stem == stems[-1]
    await store.aclose()

    # `list` marks it; `list --json` stays an array of manifests, with "future".
    out = run_cli("list", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    (row,) = [line for line in out.stdout.splitlines() if ahead.id in line]
    assert row.rstrip().endswith("future")
    assert "backup_in_future" in out.stderr
    out = run_cli("list", "app", "-c", str(cfg), "--json")
    assert [(m["stem"], m["future"]) for m in json.loads(out.stdout)] == [
        (ahead.stem, True),
        (stems[-1], False),
    ]
    out = run_cli("prune", "app", "--dry-run", "-c", str(cfg))
    assert f"keep          {ahead.stem}  (dated in the future)" in out.stdout
    assert f"keep          {stems[-1]}  (newest, last 1)" in out.stdout
    assert first not in out.stdout  # long deleted, by the second run's prune


def test_start_up_scan_catches_up_and_reports_no_future_success(
    tmp_path: Path,
    config_file: ConfigFile,
    sample_db: str,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    """Only a backup 200 days ahead in storage, and a yearly schedule whose last fire
    (1 January) passed: the restarted daemon catches up, and its last-success gauge
    never shows the future."""
    fs = tmp_path / "store"
    port = free_port()
    cfg = config_file(
        sample_db,
        path=tmp_path / "backupd.toml",
        extra_job='schedule = "0 0 1 1 *"\ncatch_up = true\n',
        http_listen=f"127.0.0.1:{port}",
    )
    out = run_cli("backup", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    (listed,) = json.loads(run_cli("list", "app", "-c", str(cfg), "--json").stdout)
    real = Manifest.from_json(json.dumps(listed).encode())
    ahead = restamp(fs, real, datetime.now(UTC) + timedelta(days=200))
    (fs / real.manifest_key).unlink()  # now the only backup is the one in the future

    began = time.monotonic()
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        seen: list[float] = []

        def caught_up() -> bool:
            import urllib.request

            from prometheus_client.parser import text_string_to_metric_families

            # listed first, scraped after: the scrape that ends the wait sees the gauge
            # as the finished catch-up run left it
            stems = [m["stem"] for m in json.loads(daemon.cli("list", "app", "--json").stdout)]
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
            values = [
                s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "backupd_job_last_success_timestamp_seconds"
            ]
            seen.extend(values)
            return len(stems) == 2 and bool(values)

        wait_for(caught_up, 60, what="the catch-up run")
        record_testsuite_property("catch_up_seconds", round(time.monotonic() - began, 2))
    finally:
        assert daemon.stop() == 0
    events = daemon.events()
    assert [e["event"] for e in events if e["event"] == "catch_up"] == ["catch_up"]
    assert any(e["event"] == "backup_in_future" and e["backup"] == ahead.stem for e in events)
    limit = time.time() + FUTURE_TOLERANCE.total_seconds()
    assert seen and all(v < limit for v in seen)
    assert (fs / ahead.manifest_key).exists()
