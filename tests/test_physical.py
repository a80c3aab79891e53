"""Physical base backups, the WAL archive and point-in-time restore, on a real cluster."""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import configs
from tests.pgcluster import PgCluster, free_port, wait_for
from tests.physical import (
    PhysicalSetup,
    batches,
    make_physical_cluster,
    mkdir_owned,
    physical_setup,
    query,
    stop_server,
    temp_base,
    wait_slot_streaming,
)


@pytest.fixture(scope="module")
def phys_pg() -> Iterator[PgCluster]:
    for base in temp_base("backupd-phys-"):
        cluster = make_physical_cluster(base / "cluster")
        try:
            yield cluster
        finally:
            cluster.stop("immediate")


@pytest.fixture
def setup(phys_pg: PgCluster, tmp_path: Path) -> Iterator[PhysicalSetup]:
    for base in temp_base("backupd-physjob-"):
        s = physical_setup(phys_pg, base / "job")
        yield s
        phys_pg.psql("ALTER SYSTEM SET archive_command = ''")
        phys_pg.psql("SELECT pg_reload_conf()")


def _manifests(s: PhysicalSetup) -> list[dict]:
    out = s.ok("list", "-c", str(s.config), s.job, "--json")
    return json.loads(out.stdout)


def test_base_backup_is_one_streamed_object_with_its_wal_position(setup: PhysicalSetup) -> None:
    setup.ok("backup", "-c", str(setup.config), setup.job)
    [m] = _manifests(setup)
    assert m["kind"] == "physical"
    [obj] = m["objects"]
    assert obj["kind"] == "base" and obj["key"].endswith("/base.tar.zst")
    assert obj["raw_bytes"] > 10 * 1024 * 1024  # a whole cluster
    assert m["wal"]["timeline"] == 1
    assert m["wal"]["start_segment"] <= m["wal"]["stop_segment"]
    assert m["restorable_from"] == m["finished_at"]
    # `download` gives the cluster's tar; pg_basebackup put its own manifest last in it
    tar_path = setup.base / "base.tar"
    setup.ok("download", "-c", str(setup.config), setup.job, "-o", str(tar_path))
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    assert "PG_VERSION" in names and "backup_label" in names
    assert names[-1] == "backup_manifest"
    assert any(n.startswith("pg_wal/0000000") for n in names)  # -X fetch: self-contained


def test_check_connect_reports_a_role_without_replication(setup: PhysicalSetup) -> None:
    ok = setup.cli("check", "-c", str(setup.config), "--connect")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "replica" in ok.stdout and "walsender" in ok.stdout
    setup.pg.psql("ALTER ROLE backup NOREPLICATION")
    try:
        bad = setup.cli("check", "-c", str(setup.config), "--connect")
    finally:
        setup.pg.psql("ALTER ROLE backup REPLICATION")
    assert bad.returncode == 1
    assert "lacks REPLICATION" in bad.stdout


def test_restore_to_a_time_and_to_the_latest(setup: PhysicalSetup) -> None:
    pg = setup.pg
    setup.use_archive_command()
    pg.psql("DROP TABLE IF EXISTS pitr_rows; CREATE TABLE pitr_rows (id int, batch text)")
    setup.ok("backup", "-c", str(setup.config), setup.job)
    pg.psql("INSERT INTO pitr_rows SELECT g, 'A' FROM generate_series(1, 1000) g")
    t1 = pg.psql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    )
    wait_for(
        lambda: (
            pg.psql(f"SELECT clock_timestamp() > '{t1}'::timestamptz + interval '20 ms'") == "t"
        ),
        what="the clock to pass T1",
    )
    pg.psql("INSERT INTO pitr_rows SELECT g, 'B' FROM generate_series(1001, 1500) g")
    setup.switch_and_wait_archived()

    out_dir = mkdir_owned(setup.base / "restores")
    port = free_port()
    first = setup.restore("t1", "--time", t1, port=port)
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        assert "restorable:" in first.stderr
        assert query(port, "SELECT batch, count(*) FROM pitr_rows GROUP BY 1") == "A|1000"
        assert query(port, "SELECT pg_is_in_recovery()") == "f"
    finally:
        stop_server(out_dir / "t1")

    port2 = free_port()
    latest = setup.restore("latest", "--latest", port=port2)
    try:
        assert latest.returncode == 0, latest.stdout + latest.stderr
        assert batches(port2, "pitr_rows") == "A1000,B500"
    finally:
        stop_server(out_dir / "latest")

    early = setup.restore("early", "--time", "2001-01-01T00:00:00Z")
    assert early.returncode == 2
    assert "outside the restorable:" in early.stderr
    assert not (out_dir / "early").exists()


@pytest.mark.slow
def test_a_server_compressed_base_backup_restores_and_replays(
    phys_pg: PgCluster, tmp_path: Path
) -> None:
    """compression_at = "server": PostgreSQL compresses (pg_basebackup --compress=server-zstd),
    backupd stores the stream as is; restore, verify and replay read it unchanged."""
    for base in temp_base("backupd-physsrv-"):
        s = physical_setup(phys_pg, base / "job", extra_job='compression_at = "server"\n')
        try:
            _server_compressed(s)
        finally:
            phys_pg.psql("ALTER SYSTEM SET archive_command = ''")
            phys_pg.psql("SELECT pg_reload_conf()")


def _server_compressed(s: PhysicalSetup) -> None:
    pg = s.pg
    checked = s.ok("check", "-c", str(s.config), "--connect")
    assert "server-side compression (zstd:3): supported" in checked.stdout
    s.use_archive_command()
    pg.psql("DROP TABLE IF EXISTS srv_rows; CREATE TABLE srv_rows (id int)")
    s.ok("backup", "-c", str(s.config), s.job)
    [m] = _manifests(s)
    [obj] = m["objects"]
    assert m["tool"]["compressed_by"] == "server" and m["compression"] == "zstd:3"
    assert obj["key"].endswith("/base.tar.zst")
    assert obj["raw_bytes"] > 10 * 1024 * 1024 > obj["size_bytes"]
    # the stored object is one zstd frame that decodes to the tar the manifest describes
    tar_path = s.base / "base.tar"
    s.ok("download", "-c", str(s.config), s.job, "-o", str(tar_path))
    assert tar_path.stat().st_size == obj["raw_bytes"]
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    assert "PG_VERSION" in names and "backup_label" in names
    assert "backup_manifest" not in names  # --no-manifest: see servercompress
    assert "verified" in s.ok("verify", "-c", str(s.config), s.job).stdout.lower()
    pg.psql("INSERT INTO srv_rows SELECT g FROM generate_series(1, 700) g")
    s.switch_and_wait_archived()
    port = free_port()
    out_dir = mkdir_owned(s.base / "restores")
    s.ok(
        "restore", "-c", str(s.config), s.job, "--data-dir", str(out_dir / "latest"),
        "--latest", "--start", "--port", str(port),
    )  # fmt: skip
    try:
        assert query(port, "SELECT count(*) FROM srv_rows") == "700"
    finally:
        stop_server(out_dir / "latest")


def _stored(s: PhysicalSetup, name: str) -> Path:
    return s.store / s.job / "wal" / name[:8] / f"{name}.json"


@pytest.fixture
def owned_base() -> Iterator[Path]:
    yield from temp_base("backupd-physd-")


@pytest.mark.slow
def test_daemon_archives_continuously_and_loses_nothing_across_kill_9(
    phys_pg: PgCluster, owned_base: Path
) -> None:
    import urllib.request

    from tests.physical import OwnedDaemon

    base = owned_base
    port = free_port()
    s = physical_setup(
        phys_pg,
        base / "job",
        job="cont",
        http_listen=f"127.0.0.1:{port}",
        extra_job=f'wal = {{ slot = "backupd_test_cont", spool = "{base}/job/spool" }}\n',
    )
    pg = s.pg
    daemon = OwnedDaemon(s).start()
    try:
        wait_slot_streaming(pg, "backupd_test_cont", 60, daemon.logs)
        pg.psql("DROP TABLE IF EXISTS cont_rows; CREATE TABLE cont_rows (batch text)")
        s.ok("backup", "-c", str(s.config), s.job)
        pg.psql("INSERT INTO cont_rows SELECT 'A' FROM generate_series(1, 100)")
        seg = pg.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        pg.psql("SELECT pg_switch_wal()")
        wait_for(lambda: _stored(s, seg).exists(), 60, what=f"{seg} stored by the daemon")

        daemon.kill9()
        pg.psql("INSERT INTO cont_rows SELECT 'C' FROM generate_series(1, 50)")
        seg_c = pg.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        pg.psql("SELECT pg_switch_wal()")
        daemon = OwnedDaemon(s).start()
        wait_for(lambda: _stored(s, seg_c).exists(), 60, what=f"{seg_c} after the restart")

        # The growing segment is stored within seconds, without any segment switch.
        pg.psql(
            "SET synchronous_commit = on; "
            "INSERT INTO cont_rows SELECT 'D-marker-7f3a' FROM generate_series(1, 25)"
        )
        committed = time.time()
        seg_d = pg.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        fetched = s.base / "fetched"

        def marker_in_storage() -> float | None:
            got = s.cli("wal-fetch", "-c", str(s.config), s.job, seg_d, str(fetched))
            if got.returncode != 0 or b"D-marker-7f3a" not in fetched.read_bytes():
                return None
            return time.time()

        try:
            stored_at = wait_for(marker_in_storage, 60, what="the growing segment")
        except TimeoutError:
            raise AssertionError(f"not stored: {daemon.logs()[-3000:]}") from None
        assert not _stored(s, seg_d).exists()  # not completed: its growing copy served
        print(f"RPO: rows D in storage (and fetched) {stored_at - committed:.1f}s after commit")
        # PostgreSQL restarted mid-stream: the receiver reconnects (with backoff) and
        # the WAL written after the restart reaches storage too.
        pg.restart()
        pg.psql(
            "SET synchronous_commit = on; "
            "INSERT INTO cont_rows SELECT 'E-after-restart' FROM generate_series(1, 5)"
        )
        restarted = time.time()
        seg_e = pg.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")

        def e_in_storage() -> bool:
            got = s.cli("wal-fetch", "-c", str(s.config), s.job, seg_e, str(fetched))
            return got.returncode == 0 and b"E-after-restart" in fetched.read_bytes()

        try:
            wait_for(e_in_storage, 90, what="WAL after the PostgreSQL restart")
        except TimeoutError:
            raise AssertionError(f"not stored: {daemon.logs()[-3000:]}") from None
        print(f"after a PostgreSQL restart: rows E in storage {time.time() - restarted:.1f}s later")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        lag = [ln for ln in metrics.splitlines() if ln.startswith("backupd_wal_archive_lag")]
        print(lag)
        assert any('job="cont"' in ln for ln in lag)
        assert "backupd_wal_archived_segments_total" in metrics
        assert 'backupd_restorable_window_seconds{edge="earliest",job="cont"}' in metrics
        # the test cluster leaves max_slot_wal_keep_size unlimited: the daemon says so
        assert '"event": "wal_slot_unbounded"' in daemon.logs()
        # the status page shows the job's WAL lag (issue 18)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/").read().decode()
        assert "WAL lag" in page and 'data-job="cont"' in page
    finally:
        daemon.stop()

    out = mkdir_owned(s.base / "restores")
    rport = free_port()
    t0 = time.monotonic()
    restored = s.restore("latest", "--latest", port=rport)
    try:
        assert restored.returncode == 0, restored.stdout + restored.stderr
        print(f"restore --latest --start: {time.monotonic() - t0:.1f}s; {restored.stdout}")
        assert batches(rport, "cont_rows") == "A100,C50,D-marker-7f3a25,E-after-restart5"
    finally:
        stop_server(out / "latest")
        pg.psql("SELECT pg_drop_replication_slot('backupd_test_cont')")


@pytest.mark.slow
def test_list_verify_and_retention_follow_the_wal_chain(
    phys_pg: PgCluster, owned_base: Path
) -> None:
    s = physical_setup(
        phys_pg, owned_base / "job", job="chain", extra_job={"retention": {"keep_last": 1}}
    )
    with s.archiving():
        s.ok("backup", "-c", str(s.config), s.job)
        phys_pg.psql(
            "CREATE TABLE IF NOT EXISTS chain_rows (i int); INSERT INTO chain_rows VALUES (1)"
        )
        s.switch_and_wait_archived()
        [first] = _manifests(s)
        s.ok("backup", "-c", str(s.config), s.job)  # keep_last = 1: the first one goes
        [second] = _manifests(s)
        assert second["id"] != first["id"]
        phys_pg.psql("INSERT INTO chain_rows VALUES (2)")
        s.switch_and_wait_archived()
        phys_pg.psql("INSERT INTO chain_rows VALUES (3)")
        newest = s.switch_and_wait_archived()
        # The segment the second backup's start closed may be archived after the prune
        # that followed that backup; the next prune takes it.
        pruned = s.ok("prune", "-c", str(s.config), s.job)
        assert "keep 1, delete 0" in pruned.stdout

        stored = sorted(
            p.name[:24]
            for p in (s.store / s.job / "wal/00000001").glob("*.json")
            if len(p.name) == 29
        )
        start = second["wal"]["start_segment"]
        assert stored and stored[0] == start, stored  # older WAL went with the first backup
        assert stored[-1] == newest

        listed = s.ok("list", "-c", str(s.config), s.job)
        assert f"{s.job}: restorable: " in listed.stdout
        [shown] = _manifests(s)
        assert shown["restorable_until"] > shown["restorable_from"]
        good = s.cli("verify", "-c", str(s.config), s.job)
        assert good.returncode == 0, good.stdout + good.stderr
        assert "no gap" in good.stdout

        gap = stored[1]
        (s.store / s.job / "wal/00000001" / f"{gap}.json").unlink()
        bad = s.cli("verify", "-c", str(s.config), s.job)
        assert bad.returncode == 1
        assert (
            f"WAL chain broken: 1 segment(s) missing after the backup's start, the first {gap}"
            in bad.stdout
        )
        assert "WAL chain broken" in s.ok("list", "-c", str(s.config), s.job).stdout


@pytest.mark.slow
def test_encrypted_base_backup_and_wal_restore_with_the_identity(
    phys_pg: PgCluster, owned_base: Path
) -> None:
    from backupd.stream.age import generate_identity
    from tests.physical import chown_owner

    secret, public = generate_identity()
    s = physical_setup(
        phys_pg,
        owned_base / "job",
        job="sealed",
        extra_job=f'encryption = {{ recipients = ["{public}"] }}\n',
    )
    identity = s.base / "identity.txt"
    identity.write_text(secret + "\n")
    identity.chmod(0o600)
    chown_owner(identity)
    with s.archiving():
        phys_pg.psql("DROP TABLE IF EXISTS sealed_rows; CREATE TABLE sealed_rows (i int)")
        s.ok("backup", "-c", str(s.config), s.job)
        phys_pg.psql("INSERT INTO sealed_rows SELECT generate_series(1, 321)")
        newest = s.switch_and_wait_archived()
    assert list((s.store / s.job / "wal/00000001").glob(f"{newest}.zst.age"))
    out = mkdir_owned(s.base / "restores")
    without = s.cli("restore", "-c", str(s.config), s.job, "--data-dir", str(out / "x"))
    assert without.returncode == 1 and "--identity" in without.stderr
    assert not (out / "x").exists()  # a failed restore leaves DIR as it found it
    port = free_port()
    restored = s.restore("latest", "--latest", "--identity", str(identity), port=port)
    try:
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert query(port, "SELECT count(*) FROM sealed_rows") == "321"
    finally:
        stop_server(out / "latest")


@pytest.mark.slow
def test_a_promoted_copy_keeps_archiving_on_the_next_timeline(
    phys_pg: PgCluster, owned_base: Path
) -> None:
    from tests.physical import OwnedDaemon

    s = physical_setup(phys_pg, owned_base / "job", job="tl")
    with s.archiving():
        phys_pg.psql("DROP TABLE IF EXISTS tl_rows; CREATE TABLE tl_rows (batch text)")
        s.ok("backup", "-c", str(s.config), s.job)
        phys_pg.psql("INSERT INTO tl_rows SELECT 'A' FROM generate_series(1, 10)")
        s.switch_and_wait_archived()
    out = mkdir_owned(s.base / "restores")
    port = free_port()
    s.restore("primary2", "--latest", port=port, ok=True)
    # The promoted copy becomes the source of the same job (a failover): the daemon
    # creates the slot there and archives timeline 2 into the same archive.
    promoted = physical_setup(
        PgCluster(base=out, port=port),
        owned_base / "job2",
        job="tl",
        extra_job=f'wal = {{ slot = "backupd_tl", spool = "{owned_base}/job2/spool" }}\n',
    )
    configs.edit(promoted.config, {"storage.local.path": s.store})
    daemon = OwnedDaemon(promoted).start()
    try:
        assert query(port, "SELECT timeline_id FROM pg_control_checkpoint()") == "2"
        assert query(port, "SELECT count(*) FROM tl_rows") == "10", (
            out / "primary2" / "backupd-restore.log"
        ).read_text()[-3000:]
        wait_for(
            lambda: query(port, "SELECT count(*) FROM pg_replication_slots WHERE active") == "1",
            60,
            what="the slot streaming from the promoted copy",
        )
        query(port, "INSERT INTO tl_rows SELECT 'B' FROM generate_series(1, 20)")
        seg = query(port, "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        assert seg.startswith("00000002")
        query(port, "SELECT pg_switch_wal()")
        try:
            wait_for(
                lambda: _stored(s, seg).exists() and _stored(s, "00000002.history").exists(),
                90,
                what="timeline 2 archived",
            )
        except TimeoutError:
            stored = sorted(p.name for p in (s.store / s.job / "wal").rglob("*.json"))
            raise AssertionError(f"{stored}\n{daemon.logs()[-3000:]}") from None
    finally:
        daemon.stop()
        stop_server(out / "primary2")

    port3 = free_port()
    again = s.restore("after", "--latest", port=port3)
    try:
        assert again.returncode == 0, again.stdout + again.stderr
        assert batches(port3, "tl_rows") == "A10,B20", (
            out / "after" / "backupd-restore.log"
        ).read_text()[-3000:]
        assert query(port3, "SELECT timeline_id FROM pg_control_checkpoint()") == "3"
    finally:
        stop_server(out / "after")


@pytest.mark.slow
def test_verify_restore_drills_into_a_throwaway_server_and_runs_pg_amcheck(
    phys_pg: PgCluster, owned_base: Path
) -> None:
    s = physical_setup(
        phys_pg,
        owned_base / "job",
        job="drill",
        # no verify.target: a physical drill brings its own server
        extra_job='verify = { schedule = "0 6 * * 0", restore = true }\n',
    )
    with s.archiving():
        phys_pg.psql("DROP TABLE IF EXISTS drill_rows; CREATE TABLE drill_rows (i int PRIMARY KEY)")
        s.ok("backup", "-c", str(s.config), s.job)
        phys_pg.psql("INSERT INTO drill_rows SELECT generate_series(1, 5000)")
        s.switch_and_wait_archived()
    t0 = time.monotonic()
    out = s.cli("verify", "-c", str(s.config), s.job, "--restore", timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"verify --restore: {time.monotonic() - t0:.1f}s\n{out.stdout}")
    assert "no gap" in out.stdout
    assert "promoted in" in out.stdout
    assert "pg_amcheck found no corruption in" in out.stdout
    assert out.stdout.strip().endswith("verified: ok")


@pytest.mark.slow
def test_on_s3_a_base_backup_and_its_wal_restore(
    phys_pg: PgCluster, owned_base: Path, s3_server: str, s3_bucket: str
) -> None:
    s = physical_setup(phys_pg, owned_base / "job", job="ons3")
    offsite = configs.s3_storage(s3_server, s3_bucket)
    del offsite["region"], offsite["part_size"]  # as the README's example: the defaults
    configs.edit(s.config, {"job.ons3.storage": ["offsite"], "storage.offsite": offsite})
    with s.archiving():
        phys_pg.psql("DROP TABLE IF EXISTS s3_rows; CREATE TABLE s3_rows (i int)")
        s.ok("backup", "-c", str(s.config), s.job)
        phys_pg.psql("INSERT INTO s3_rows SELECT generate_series(1, 77)")
        s.switch_and_wait_archived()
    assert not list(s.store.iterdir())  # everything went to S3
    out = mkdir_owned(s.base / "restores")
    port = free_port()
    restored = s.restore("latest", "--latest", port=port)
    try:
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert query(port, "SELECT count(*) FROM s3_rows") == "77"
    finally:
        stop_server(out / "latest")
