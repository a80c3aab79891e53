"""Issue 18: operator conveniences, against a real `backupd run` subprocess and PostgreSQL."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.helpers import BIG_TABLE_SQL, run_cli, wrapped_bin_dir, write_config
from tests.pgcluster import PgCluster, scratch_database, wait_for


def gated_bin_dir(base: Path) -> tuple[Path, Path]:
    """A pg_dump that writes its dump, then holds its stdout open until `gate` exists
    (at most 60 s): the run stays in progress with its bytes already counted."""
    gate = base / "go"
    bindir = wrapped_bin_dir(
        base,
        f'"$REAL" "$@"\nrc=$?\n'
        f'for _ in $(seq 1200); do [ -e "{gate}" ] && break; sleep 0.05; done\n'
        "exit $rc",
    )
    return bindir, gate


@pytest.fixture
def big_db(pg: PgCluster) -> Iterator[str]:
    """A database whose dump is a few MiB, so a run's bytes show before its dump ends."""
    yield from scratch_database(pg, BIG_TABLE_SQL.replace("120000", "40000"), "big_")


def operator_config(
    tmp_path: Path, pg: PgCluster, db: str, password_file: Path, big: str, **kw: str
) -> Path:
    bindir, _ = gated_bin_dir(tmp_path / "gated")
    return write_config(
        tmp_path / "b.toml",
        pg,
        password_file=password_file,
        database=db,
        fs_path=tmp_path / "store",
        extra=(
            f'[source.gated]\ntype = "postgres"\ndsn = "{pg.dsn(big)}"\n'
            f'password = {{ file = "{password_file}" }}\npg_bin_dir = "{bindir}"\n\n'
            '[job.bad]\nsource = "main"\nstorage = ["local"]\ndatabases = ["nosuchdb"]\n'
            "retry = { max_attempts = 1 }\n\n"
            '[job.slow]\nsource = "gated"\nstorage = ["local"]\n'
        ),
        **kw,
    )


def test_status_and_history_explain_runs(
    tmp_path: Path,
    pg: PgCluster,
    sample_db: str,
    pg_password_file: Path,
    big_db: str,
    daemons: list[DaemonProcess],
) -> None:
    cfg = operator_config(tmp_path, pg, sample_db, pg_password_file, big_db)
    gate = tmp_path / "gated" / "go"
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    assert d.cli("trigger", "app", "--wait").returncode == 0
    assert d.cli("trigger", "bad", "--wait").returncode == 1

    # A running run shows its bytes, rate and elapsed time.
    started = d.cli("trigger", "slow")
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.split()[1]

    def slow_running() -> dict | None:  # type: ignore[type-arg]
        jobs = {j["name"]: j for j in d.status()["jobs"]}
        running = jobs["slow"]["running"]
        return running[0] if running and running[0].get("bytes_done", 0) > 0 else None

    running = wait_for(slow_running, 30, what="the slow run's first bytes")
    assert running["run_id"] == run_id and running["elapsed_seconds"] >= 0
    assert running["rate_bytes_per_second"] > 0
    text = d.cli("status")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    print(text.stdout)
    assert lines[0].split("  ")[0] == "JOB" and "LAST BACKUP IN STORAGE" in lines[0]
    assert any(
        f"running {run_id}: " in line and "/s, " in line and "elapsed" in line for line in lines
    )
    gate.touch()
    wait_for(
        lambda: {j["name"]: j for j in d.status()["jobs"]}["slow"]["running"] == [],
        30,
        what="the slow run to end",
    )

    status = d.status()
    jobs = {j["name"]: j for j in status["jobs"]}
    # The failure's reason is the actual error, on one line.
    assert jobs["bad"]["last_run"]["state"] == "failure"
    reason = jobs["bad"]["last_error"]
    assert "nosuchdb" in reason and "does not exist" in reason and "\n" not in reason
    assert jobs["app"]["last_error"] is None
    app_backup = jobs["app"]["last_backup"]
    assert app_backup["size_bytes"] > 0 and app_backup["storage"] == "local"
    assert app_backup["stem"] == jobs["app"]["last_run"]["backup"]
    assert jobs["bad"]["last_backup"] is None

    text = d.cli("status").stdout
    print(text)
    bad_row = next(i for i, line in enumerate(text.splitlines()) if line.startswith("bad "))
    assert text.splitlines()[bad_row + 1] == f"  last error: {reason}"
    app_row = next(line for line in text.splitlines() if line.startswith("app "))
    assert "success " in app_row and " ago" in app_row and "KiB" in app_row

    # history: the socket's history command on the command line.
    hist = d.cli("history", "bad", "--json")
    assert hist.returncode == 0, hist.stderr
    (run,) = json.loads(hist.stdout)["runs"]
    assert run["result"] == "failure" and run["trigger"] == "manual" and run["attempts"] == 1
    assert "nosuchdb" in run["error"] and run["node"] == socket.gethostname()
    assert run["duration_seconds"] is not None and run["started_at"]
    for _ in range(2):
        assert d.cli("trigger", "app", "--wait").returncode == 0
    hist = d.cli("history", "app", "--limit", "2")
    print(hist.stdout)
    assert hist.returncode == 0, hist.stderr
    head, *rows = hist.stdout.splitlines()
    assert head.split() == [
        "RESULT", "TRIGGER", "STARTED", "(UTC)", "DURATION", "SIZE", "ATTEMPTS", "NODE", "ERROR"
    ]  # fmt: skip
    assert len(rows) == 2 and all(r.startswith("success  manual") for r in rows)
    assert d.cli("history", "app", "--limit", "0").returncode == 2

    # After a restart the last backup comes from storage.
    newest = d.status()["jobs"][0]["last_backup"]
    d.stop()
    d2 = DaemonProcess(cfg, tmp_path / "daemon2.log").start()
    daemons.append(d2)

    def app_backup_after_restart() -> dict | None:  # type: ignore[type-arg]
        return {j["name"]: j for j in d2.status()["jobs"]}["app"]["last_backup"]

    t0 = time.monotonic()
    again = wait_for(app_backup_after_restart, 30, what="the start-up scan")
    print(f"last backup shown {time.monotonic() - t0:.2f}s after the restarted daemon answered")
    assert again["stem"] == newest["stem"] and again["size_bytes"] == newest["size_bytes"]
    assert "KiB" in d2.cli("status").stdout.splitlines()[1]


def _fs_keys(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _listed(cfg: Path, storage: str) -> list[dict]:  # type: ignore[type-arg]
    out = run_cli("list", "app", "--storage", storage, "--json", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_delete_one_backup_manifest_first_and_never_the_only_one_by_accident(
    tmp_path: Path,
    sample_db: str,
    config_file: ConfigFile,
    s3_bucket: str,
    s3_client: Any,
) -> None:
    store = tmp_path / "store"
    cfg = config_file(sample_db, fs_path=store, s3=True)
    c = ("-c", str(cfg))
    assert run_cli("backup", "app", *c).returncode == 0
    (only,) = _listed(cfg, "local")
    refused = run_cli("delete", "app", "--backup", only["id"], *c)
    assert refused.returncode == 2
    assert "only backup of job app, storage local" in refused.stderr and "--force" in refused.stderr
    assert len(_listed(cfg, "local")) == 1

    assert run_cli("backup", "app", *c).returncode == 0
    newest, oldest = _listed(cfg, "local")
    before = _fs_keys(store)
    dry = run_cli("delete", "app", "--backup", oldest["id"], "--dry-run", *c)
    assert dry.returncode == 0, dry.stderr
    assert f"would delete {oldest['stem']}" in dry.stdout
    assert _fs_keys(store) == before

    done = run_cli("delete", "app", "--backup", oldest["stem"], *c)
    assert done.returncode == 0, done.stderr
    assert f"deleted {oldest['stem']}" in done.stdout
    assert [b["stem"] for b in _listed(cfg, "local")] == [newest["stem"]]
    assert not any(oldest["stem"] in k for k in _fs_keys(store))
    assert {k for k in _fs_keys(store) if k.startswith("app/")} == {
        k for k in before if oldest["stem"] not in k
    }
    # The other storage is untouched; --storage picks it.
    assert len(_listed(cfg, "offsite")) == 2
    gone = run_cli("delete", "app", "--backup", oldest["id"], "--storage", "offsite", *c)
    assert gone.returncode == 0, gone.stderr
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])}
    assert not any(oldest["stem"] in k for k in keys) and any(newest["stem"] in k for k in keys)

    missing = run_cli("delete", "app", "--backup", oldest["id"], *c)
    assert missing.returncode != 0 and "no backup" in missing.stderr
    forced = run_cli("delete", "app", "--backup", newest["id"], "--force", *c)
    assert forced.returncode == 0, forced.stderr
    assert _listed(cfg, "local") == []
