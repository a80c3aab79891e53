"""`verify` of a physical job: the base backup, its WAL chain, and the restore drill.

The drill restores the backup to the end of the WAL archive into a temporary
data directory, starts a throwaway server on it (a Unix socket in that
directory only, no TCP, `trust` for that socket only), waits until it replayed
everything and was promoted (the measured RTO), runs `pg_amcheck` on every
database, then stops it and deletes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
from pathlib import Path

import structlog

from backupd.catalog import walindex
from backupd.catalog.manifest import Manifest
from backupd.config.dsn import dsn_params
from backupd.config.model import Config, Job
from backupd.errors import BackupdError
from backupd.operations import pitr, walchain
from backupd.operations.readback import read_back as read_object
from backupd.operations.verify import VerifyReport
from backupd.sources import postgres
from backupd.storage.base import Store

log = structlog.get_logger("backupd.pitr_verify")

AMCHECK_TIMEOUT = 6 * 3600.0


async def verify_physical(
    config: Config,
    job: Job,
    store: Store,
    manifest: Manifest,
    identity: str | None,
    restore: bool,
) -> VerifyReport:
    report = VerifyReport()
    report.lines.append(f"backup {manifest.stem} of job {manifest.job} in storage {store.name}")
    entry = next((o for o in manifest.objects if o.kind == "base"), None)
    if entry is None or manifest.wal is None:
        report.fail(f"backup {manifest.stem} is not a physical base backup")
        return report
    decodable = manifest.encryption is None or identity is not None
    try:
        if decodable:
            members = await pitr.check_tar(store, manifest, entry, identity)
            report.lines.append(
                f"ok: {entry.key}: size and SHA-256 match, a tar of {members} members"
            )
        else:
            await read_object(store, manifest, entry, None, None)
            report.lines.append(f"ok: {entry.key}: size and SHA-256 match (encrypted: not decoded)")
    except BackupdError as exc:
        report.fail(f"{entry.key}: {exc}")
    await _check_chain(store, manifest, report)
    if restore and report.ok:
        if manifest.encryption and identity is None:
            report.fail(f"backup {manifest.stem} is encrypted: a restore drill needs --identity")
        else:
            await _drill(config, job, store, manifest, identity, report)
    report.lines.append("verified: ok" if report.ok else "verified: FAILED")
    return report


async def _check_chain(store: Store, manifest: Manifest, report: VerifyReport) -> None:
    """The WAL from the backup's start to the newest segment: no gap, every index entry
    valid, every data object present with its recorded size."""
    assert manifest.wal is not None
    archive = await walchain.scan(store, manifest.job)
    tli, start = walindex.segment_number(manifest.wal["start_segment"])
    gaps = archive.gaps(tli, start)
    if gaps:
        report.fail(
            f"WAL chain broken: {len(gaps)} segment(s) missing after the backup's start, "
            f"the first {archive.name_of(gaps[0], tli)}: the backup restores only up to the gap"
        )
    checked = 0
    for segno in sorted(n for n in archive.segments if n >= start):
        name = archive.name_of(segno, tli)
        try:
            entry = await walindex.read_entry(store, manifest.job, name)
        except BackupdError as exc:
            report.fail(f"WAL {name}: {exc}")
            continue
        listed = archive.data_keys.get(walindex.folder_of(manifest.job, name) + entry.key)
        if listed is None or listed[1] != entry.size_bytes:
            report.fail(f"WAL {name}: its data object is missing or has another size")
        checked += 1
    newest = archive.newest
    if newest is not None and not gaps:
        report.lines.append(
            f"ok: WAL chain from {manifest.wal['start_segment']} to "
            f"{archive.name_of(newest[0], newest[1])}: {checked} segment(s), no gap"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _drill(
    config: Config,
    job: Job,
    store: Store,
    manifest: Manifest,
    identity: str | None,
    report: VerifyReport,
) -> None:
    source = config.sources[job.source]
    base = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="backupd-drill-"))
    data = base / "data"
    port = _free_port()
    t0 = time.monotonic()
    started = False
    try:
        outcome = await pitr.restore_to_dir(
            config,
            job,
            store,
            data_dir=data,
            target=pitr.Target(),
            backup=manifest.id,
            identity=identity,
            start=False,
            port=port,
            announce=lambda line: log.info("drill", line=line),
        )
        await asyncio.to_thread(_throwaway_settings, data, port)
        started = True
        recovery = await pitr.start_and_wait(data, source.pg_bin_dir, manifest)
        rto = time.monotonic() - t0
        report.rto_seconds = round(rto, 3)
        report.lines.append(
            f"ok: drill: restored {manifest.stem} to the end of the WAL archive and promoted "
            f"in {rto:.1f}s (extract {outcome.extract_seconds:.1f}s, recovery {recovery:.1f}s)"
        )
        checked = await _amcheck(data, port, source.dsn, source.pg_bin_dir, manifest)
        report.lines.append(f"ok: drill: pg_amcheck found no corruption in {checked}")
    except BackupdError as exc:
        report.fail(f"drill: {exc}")
    finally:
        if started:
            await _stop(data, source.pg_bin_dir, manifest)
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, base, True))


def _throwaway_settings(data: Path, port: int) -> None:
    """The drill's server: no TCP, a socket in its own 0700 directory, trust on it only."""
    (data / "pg_hba.conf").write_text("local all all trust\n")
    with open(data / "postgresql.auto.conf", "a") as f:
        f.write(
            f"port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{data}'\n"
            "hot_standby = on\n"
        )


def _major(manifest: Manifest) -> int:
    return int(str(manifest.source.get("server_version", "0")).split(".")[0] or 0)


async def _amcheck(data: Path, port: int, dsn: str, pg_bin_dir: str, manifest: Manifest) -> str:
    """pg_amcheck on every database of the throwaway server; what it checked."""
    user = dsn_params(dsn).get("user") or "postgres"
    conn = await postgres.connect(f"host={data} port={port} user={user} dbname=template1", None)
    try:
        superuser = str(await conn.fetchval("SELECT rolname FROM pg_roles WHERE oid = 10"))
        databases = int(await conn.fetchval("SELECT count(*) FROM pg_database WHERE datallowconn"))
    finally:
        await conn.close()
    tool = postgres.find_tool("pg_amcheck", pg_bin_dir, _major(manifest))
    proc = await asyncio.create_subprocess_exec(
        str(tool.path),
        "--no-password",
        f"--host={data}",
        f"--port={port}",
        f"--username={superuser}",
        "--maintenance-db=template1",
        "--all",
        "--install-missing",  # into the throwaway copy only
        "--heapallindexed",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(AMCHECK_TIMEOUT):
            out, _ = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        text = out.decode(errors="replace").strip()
        raise BackupdError(f"pg_amcheck exited with status {proc.returncode}: {text[-1500:]}")
    return f"{databases} database(s) (heap and every index, --heapallindexed)"


async def _stop(data: Path, pg_bin_dir: str, manifest: Manifest) -> None:
    try:
        tool = postgres.find_tool("pg_ctl", pg_bin_dir, _major(manifest))
    except BackupdError:
        return
    proc = await asyncio.create_subprocess_exec(
        str(tool.path),
        "-D",
        str(data),
        "-m",
        "immediate",
        "-w",
        "stop",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.shield(proc.wait())
