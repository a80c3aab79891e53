"""WAL archiving under an HA claim: several daemons on one config, one pg_receivewal per job.

Real `backupd run` daemons (as the cluster's owner) share one physical job and
one filesystem store with `ha.enabled`; each has its own spool, as on separate
hosts. Only the node holding `.backupd-claims/wal-JOB` streams from the slot;
kill -9 it and another node takes the claim over and archives on, and
`restore --latest` reaches a row written after the takeover.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator

import pytest

from tests.pgcluster import PgCluster, free_port, wait_for
from tests.physical import (
    OwnedDaemon,
    PhysicalSetup,
    chown_owner,
    mkdir_owned,
    physical_cluster,
    physical_setup,
    query,
    stop_server,
    temp_base,
    wait_slot_streaming,
)

LEASE = 6.0
SLOT = "backupd_walha"


@pytest.fixture
def ha_pg() -> Iterator[PgCluster]:
    for cluster in physical_cluster("backupd-walha-"):
        # archive_mode = on keeps every segment until archive_command took it: let the
        # server drop WAL the slot no longer needs, as a server without archiving would
        cluster.psql("ALTER SYSTEM SET archive_command = '/bin/true'")
        cluster.psql("SELECT pg_reload_conf()")
        yield cluster


@pytest.fixture
def nodes(ha_pg: PgCluster) -> Iterator[tuple[PhysicalSetup, list[OwnedDaemon]]]:
    for base in temp_base("backupd-walhajob-"):
        s = physical_setup(
            ha_pg, base / "job", job="walha", extra_job=f'wal = {{ slot = "{SLOT}" }}\n'
        )
        daemons = []
        for i in range(2):
            config = s.base / f"n{i}.toml"
            spool = mkdir_owned(s.base / f"spool-n{i}")  # one per node: separate hosts
            config.write_text(
                s.config.read_text()
                .replace(
                    "[daemon]\n",
                    f'[daemon]\nnode = "n{i}"\nha = {{ enabled = true, lease = "{LEASE:g}s" }}\n',
                )
                .replace("/run/control.sock", f"/run/n{i}.sock")
                .replace(f'slot = "{SLOT}"', f'slot = "{SLOT}", spool = "{spool}"')
            )
            chown_owner(config)
            d = OwnedDaemon(dataclasses.replace(s, config=config))
            d.log = s.base / f"n{i}.log"
            daemons.append(d)
        try:
            yield s, daemons
        finally:
            for d in daemons:
                d.stop()


def _events(d: OwnedDaemon, event: str) -> list[dict[str, object]]:
    out = []
    for line in d.logs().splitlines():
        if f'"{event}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _stored(s: PhysicalSetup, segment: str) -> bool:
    return (s.store / s.job / "wal" / segment[:8] / f"{segment}.json").exists()


def _switch_and_wait_stored(s: PhysicalSetup, what: str, daemons: list[OwnedDaemon]) -> str:
    segment = s.pg.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    s.pg.psql("SELECT pg_switch_wal()")
    wait_for(
        lambda: _stored(s, segment),
        60,
        what=f"{segment} ({what}) stored: " + "".join(d.logs()[-1500:] for d in daemons),
    )
    return segment


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_node_archives_and_another_takes_over_after_kill_9(
    nodes: tuple[PhysicalSetup, list[OwnedDaemon]],
) -> None:
    s, daemons = nodes
    pg = s.pg
    for d in daemons:
        d.start()

    def holders() -> list[OwnedDaemon]:
        """The nodes that ran pg_receivewal."""
        return [d for d in daemons if _events(d, "wal_receiver_running")]

    wait_for(lambda: len(holders()) >= 1, 60, what="a node running pg_receivewal")
    wait_slot_streaming(pg, SLOT, 60, lambda: "".join(d.logs()[-1500:] for d in daemons))
    pg.psql("DROP TABLE IF EXISTS ha_rows; CREATE TABLE ha_rows (batch text)")
    s.ok("backup", "-c", str(s.config), s.job)
    pg.psql("INSERT INTO ha_rows SELECT 'A' FROM generate_series(1, 100)")
    _switch_and_wait_stored(s, "rows A", daemons)
    # one node only: the other watched the claim all along and never ran pg_receivewal
    running = holders()
    assert len(running) == 1, [d.logs()[-1500:] for d in running]
    [victim] = running
    [survivor] = [d for d in daemons if d is not victim]
    assert _events(victim, "wal_claim_held")

    # a commit in the growing segment: the holder's spool has it as `.partial` when killed
    spool = s.base / f"spool-n{daemons.index(victim)}"
    pg.psql(
        "SET synchronous_commit = on; INSERT INTO ha_rows SELECT 'P' FROM generate_series(1, 15)"
    )
    wait_for(
        lambda: any(p.name.endswith(".partial") for p in spool.iterdir()),
        30,
        what="the growing segment in the holder's spool",
    )
    victim.kill9()
    killed = time.monotonic()
    pg.psql("INSERT INTO ha_rows SELECT 'B' FROM generate_series(1, 20)")  # no archiver now
    wait_for(
        lambda: bool(_events(survivor, "wal_receiver_running")),
        LEASE + 1 + LEASE / 3 + 30,
        what="the survivor archiving: " + survivor.logs()[-2000:],
    )
    takeover = time.monotonic() - killed
    assert _events(survivor, "wal_claim_held")
    pg.psql("INSERT INTO ha_rows SELECT 'C' FROM generate_series(1, 30)")
    _switch_and_wait_stored(s, "rows C, after the takeover", [survivor])
    archived_after = time.monotonic() - killed
    # The WAL the first node was streaming when killed leaves the server (the slot is
    # past it): its spool's stale `.partial` must not be where streaming resumes.
    [stale] = [p.name[:24] for p in spool.iterdir() if p.name.endswith(".partial")]

    def stale_gone() -> bool:
        pg.psql("SELECT pg_switch_wal()")
        pg.psql("CHECKPOINT")
        return pg.psql(f"SELECT count(*) FROM pg_ls_waldir() WHERE name = '{stale}'") == "0"

    wait_for(stale_gone, 30, interval=0.5, what=f"{stale} removed from the server")

    # The first node comes back (its spool still holds the segment it was streaming
    # when killed) and waits; kill -9 the survivor: it takes over again and archives on.
    victim.start()
    wait_for(
        lambda: len(_events(victim, "daemon_ready")) >= 2,
        60,
        what="the first node back",
    )
    # The stale check above switched segments: the survivor's spool holds the last of
    # them until uploaded (within a second). Killed before that, they would be a gap
    # (README "Several daemons": the slot is past them), which is not what this tests.
    _switch_and_wait_stored(s, "the segments switched while checking", [survivor])
    survivor.kill9()
    pg.psql("INSERT INTO ha_rows SELECT 'D' FROM generate_series(1, 40)")
    wait_for(
        lambda: len(_events(victim, "wal_receiver_running")) >= 2,
        LEASE + 1 + LEASE / 3 + 30,
        what="the first node archiving again: " + victim.logs()[-2000:],
    )
    _switch_and_wait_stored(s, "rows D, after the second takeover", [victim])
    victim.stop()

    out = mkdir_owned(s.base / "restores")
    port = free_port()
    restored = s.cli(
        "restore", "-c", str(s.config), s.job, "--data-dir", str(out / "latest"),
        "--latest", "--start", "--port", str(port), timeout=240,
    )  # fmt: skip
    try:
        assert restored.returncode == 0, restored.stdout + restored.stderr
        got = query(
            port,
            "SELECT string_agg(batch || count, ',') FROM "
            "(SELECT batch, count(*) FROM ha_rows GROUP BY 1 ORDER BY 1) s",
        )
        if got != "A100,B20,C30,D40,P15":
            listing = sorted(
                str(p.relative_to(s.store)) for p in (s.store / s.job / "wal").rglob("*")
            )
            verified = s.cli("verify", "-c", str(s.config), s.job)
            raise AssertionError(
                f"{got}\n{restored.stderr}\n{listing}\n{verified.stdout}\n"
                + "\n".join(
                    line
                    for d in daemons
                    for line in d.logs().splitlines()
                    if "wal" in line or "claim" in line
                )
            )
    finally:
        stop_server(out / "latest")
    verified = s.cli("verify", "-c", str(s.config), s.job)
    assert verified.returncode == 0 and "no gap" in verified.stdout, verified.stdout
    print(
        f"\nWAL HA kill -9: survivor streaming {takeover:.1f}s after the kill, the segment "
        f"written after it stored {archived_after:.1f}s after the kill (lease {LEASE:g}s)"
    )
