"""The metrics contract: names, labels and values as Prometheus will scrape them."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backupd import __version__
from backupd.observe.exposition import TextExposition
from backupd.observe.metrics import Metrics


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The sample `name{labels}` as a scraper parses it, or None when absent."""
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def series(metrics: Metrics, job: str) -> list[str]:
    """Every exposed sample that carries job=`job`."""
    return [
        sample.name
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
        if sample.labels.get("job") == job
    ]


def populated() -> Metrics:
    """A Metrics object on which every domain event happened at least once."""
    m = Metrics()
    m.jobs_configured(["j"])
    m.notifiers_configured(["ops"])
    m.backups_in_storage("j", "offsite", 3, 1_700_000_000.0, 2048)
    m.run_started("j")
    m.attempt("j", "retry")
    m.attempt("j", "success")
    m.bytes_written("j", "offsite", 4096)
    m.run_finished("j", "success", 42.0, 4096, 1_700_003_600.0)
    m.run_started("j")
    m.attempt("j", "failure")
    m.run_finished("j", "failure", 3.0, None, 1_700_007_200.0)
    m.skipped("j", "overlap")
    m.next_run("j", 1_700_010_000.0)
    m.retention_deleted("j", "offsite", 2)
    m.retention_delete_failed("j", "offsite")
    m.verified("j", "success", 1_700_008_000.0)
    m.config_reloaded("success")
    m.notify_failed("ops")
    m.wal_configured("j", 300.0)  # physical jobs (issue 16)
    m.wal_archived("j", 2, 1_700_008_100.0)
    m.wal_lag("j", 4.5)
    m.restorable_window("j", 1_700_000_000.0, 1_700_008_100.0)
    m.restore_drill("j", 12.5)
    return m


def test_success_and_failure_are_counted_with_their_timestamps() -> None:
    m = Metrics()
    m.run_started("j")
    m.run_finished("j", "success", 12.5, 1000, 1_700_000_000.0)
    m.run_started("j")
    m.run_finished("j", "failure", 2.0, None, 1_700_000_100.0)

    text = m.exposition().decode()
    assert 'backupd_job_runs_total{job="j",result="success"} 1.0' in text
    assert 'backupd_job_runs_total{job="j",result="failure"} 1.0' in text
    assert 'backupd_job_last_success_timestamp_seconds{job="j"} 1.7e+09' in text
    assert value(m, "backupd_job_last_failure_timestamp_seconds", job="j") == 1_700_000_100.0
    assert value(m, "backupd_job_last_size_bytes", job="j") == 1000
    assert value(m, "backupd_job_duration_seconds_count", job="j") == 2
    assert value(m, "backupd_job_duration_seconds_sum", job="j") == 14.5
    assert value(m, "backupd_job_duration_seconds_bucket", job="j", le="10.0") == 1
    assert value(m, "backupd_job_duration_seconds_bucket", job="j", le="60.0") == 2
    assert value(m, "backupd_job_duration_seconds_bucket", job="j", le="43200.0") == 2
    assert value(m, "backupd_job_running", job="j") == 0


def test_running_gauge_follows_runs_in_progress() -> None:
    m = Metrics()
    m.jobs_configured(["j"])
    assert value(m, "backupd_job_running", job="j") == 0
    m.run_started("j")
    assert value(m, "backupd_job_running", job="j") == 1
    m.run_finished("j", "cancelled", 1.0, None, 1_700_000_000.0)
    assert value(m, "backupd_job_running", job="j") == 0
    assert value(m, "backupd_job_runs_total", job="j", result="cancelled") == 1
    # A cancelled run is neither a success nor a failure.
    assert value(m, "backupd_job_last_success_timestamp_seconds", job="j") is None
    assert value(m, "backupd_job_last_failure_timestamp_seconds", job="j") is None


def test_configured_jobs_have_zero_counters_but_no_timestamps() -> None:
    m = Metrics()
    m.jobs_configured(["a", "b"])
    for job in ("a", "b"):
        for result in ("success", "failure", "cancelled"):
            assert value(m, "backupd_job_runs_total", job=job, result=result) == 0
        assert value(m, "backupd_job_attempts_total", job=job, result="retry") == 0
        assert value(m, "backupd_job_skipped_total", job=job, reason="overlap") == 0
        assert value(m, "backupd_job_duration_seconds_count", job=job) == 0
        # Absent, not 1970: "not known yet" must not look like "very old".
        assert value(m, "backupd_job_last_success_timestamp_seconds", job=job) is None


def test_last_success_from_storage_survives_a_restart_and_never_moves_back() -> None:
    m = Metrics()
    m.backups_in_storage("j", "offsite", 5, 1_700_000_000.0, 2048)
    m.backups_in_storage("j", "local", 2, 1_600_000_000.0, 1024)  # an older copy elsewhere
    assert value(m, "backupd_job_last_success_timestamp_seconds", job="j") == 1_700_000_000.0
    assert value(m, "backupd_job_last_size_bytes", job="j") == 2048
    assert value(m, "backupd_backups", job="j", storage="offsite") == 5
    assert value(m, "backupd_backups", job="j", storage="local") == 2
    # Counters per (job, storage) exist at 0 for increase() from the first scrape.
    assert value(m, "backupd_bytes_written_total", job="j", storage="local") == 0
    assert value(m, "backupd_retention_deleted_total", job="j", storage="local") == 0

    m.run_started("j")
    m.run_finished("j", "success", 10.0, 4096, 1_700_086_400.0)
    assert value(m, "backupd_job_last_success_timestamp_seconds", job="j") == 1_700_086_400.0
    assert value(m, "backupd_job_last_size_bytes", job="j") == 4096


def test_storage_and_retention_counters_add_up() -> None:
    m = Metrics()
    m.bytes_written("j", "offsite", 100)
    m.bytes_written("j", "offsite", 50)
    m.bytes_written("j", "local", 7)
    m.retention_deleted("j", "offsite", 2)
    m.retention_deleted("j", "offsite", 1)
    m.retention_delete_failed("j", "offsite")
    m.skipped("j", "missed", 3)
    assert value(m, "backupd_bytes_written_total", job="j", storage="offsite") == 150
    assert value(m, "backupd_bytes_written_total", job="j", storage="local") == 7
    assert value(m, "backupd_retention_deleted_total", job="j", storage="offsite") == 3
    assert value(m, "backupd_retention_delete_errors_total", job="j", storage="offsite") == 1
    assert value(m, "backupd_job_skipped_total", job="j", reason="missed") == 3


def test_next_run_is_set_and_removed() -> None:
    m = Metrics()
    m.next_run("j", 1_700_000_000.0)
    assert value(m, "backupd_job_next_run_timestamp_seconds", job="j") == 1_700_000_000.0
    m.next_run("j", None)
    assert value(m, "backupd_job_next_run_timestamp_seconds", job="j") is None


def test_verify_records_time_per_result() -> None:
    m = Metrics()
    m.verified("j", "success", 100.0)
    m.verified("j", "failure", 200.0)
    m.verified("j", "success", 300.0)
    assert value(m, "backupd_last_verify_timestamp_seconds", job="j", result="success") == 300
    assert value(m, "backupd_last_verify_timestamp_seconds", job="j", result="failure") == 200


def test_config_reloads_are_counted_and_the_last_outcome_kept() -> None:
    m = Metrics()
    assert value(m, "backupd_config_reload_total", result="failure") == 0
    assert value(m, "backupd_config_last_reload_successful") == 1
    m.config_reloaded("failure")
    assert value(m, "backupd_config_reload_total", result="failure") == 1
    assert value(m, "backupd_config_last_reload_successful") == 0
    m.config_reloaded("success")
    assert value(m, "backupd_config_reload_total", result="success") == 1
    assert value(m, "backupd_config_last_reload_successful") == 1


def test_build_info_carries_the_version() -> None:
    assert value(Metrics(), "backupd_build_info", version=__version__) == 1
    assert value(Metrics(version="9.9.9"), "backupd_build_info", version="9.9.9") == 1


def test_forget_job_removes_every_series_of_that_job_only() -> None:
    m = populated()
    m.jobs_configured(["keep"])
    m.run_started("keep")
    assert len(series(m, "j")) > 20
    m.forget_job("j")
    assert series(m, "j") == []
    assert value(m, "backupd_job_running", job="keep") == 1
    # A job re-added later starts from what storage says, not from stale memory.
    m.backups_in_storage("j", "offsite", 1, 1_000.0, 10)
    assert value(m, "backupd_job_last_success_timestamp_seconds", job="j") == 1_000.0


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.run_started("j")
    a.run_finished("j", "success", 1.0, 10, 1.0)
    assert value(a, "backupd_job_runs_total", job="j", result="success") == 1
    assert value(b, "backupd_job_runs_total", job="j", result="success") is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.run_finished("j", "ok", 1.0, None, 1.0), "unknown run result 'ok'"),
        (lambda m: m.attempt("j", "oops"), "unknown attempt result 'oops'"),
        (lambda m: m.skipped("j", "because"), "unknown skip reason 'because'"),
        (lambda m: m.verified("j", "maybe", 1.0), "unknown verify result 'maybe'"),
        (lambda m: m.config_reloaded("partial"), "unknown reload result 'partial'"),
    ],
)
def test_label_values_outside_the_contract_are_refused(call, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call(Metrics())


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_exposition_passes_promtool_lint() -> None:
    proc = subprocess.run(
        ["promtool", "check", "metrics"],
        input=populated().exposition(),
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert proc.stdout.decode().strip() == ""


def without_process_values(exposition: bytes) -> list[str]:
    """The lines, less the process_* samples (memory and CPU change between two reads)."""
    return [line for line in exposition.decode().splitlines() if not line.startswith("process_")]


def test_exposition_is_byte_for_byte_what_prometheus_client_writes() -> None:
    """backupd renders /metrics itself (fast); it must say exactly what generate_latest says."""
    m = populated()
    m.jobs_configured(["k", "gone"])
    m.run_finished("k", "cancelled", 7.5, None, 1_700_000_001.0)
    m.exposition()  # fills the per-series cache, which must not go stale:
    m.forget_job("gone")
    m.run_finished("j", "success", 1e6, 10**12, 1_700_100_000.0)

    ours = m.exposition()

    assert without_process_values(ours) == without_process_values(generate_latest(m.registry))
    assert 'job="gone"' not in ours.decode()


def test_text_exposition_escapes_like_prometheus_client() -> None:
    registry = CollectorRegistry()
    counter = Counter(
        "odd_total", 'Help with \\ and\nnewline "quotes".', ["b", "a"], registry=registry
    )
    gauge = Gauge("plain", "A gauge.", ["x"], registry=registry)
    histogram = Histogram("lat", "Latency.", ["z"], buckets=(0.5, 2.0), registry=registry)
    counter.labels('q"uote', "back\\slash\nnl").inc(3)
    gauge.labels("é").set(-1.5e-9)
    gauge.labels("inf").set(float("inf"))
    histogram.labels("a").observe(1.0)
    histogram.labels("a").observe(9.0)
    unlabelled = Gauge("solo", "No labels.", registry=registry)
    unlabelled.set(2)

    text = TextExposition([counter, gauge, histogram, unlabelled]).render()

    assert text == generate_latest(registry)
