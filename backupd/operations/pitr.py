"""Point-in-time restore: a PostgreSQL data directory from a base backup and the WAL archive.

`backupd restore JOB --data-dir DIR [--time T | --lsn L | --latest]`:
chooses the newest base backup before the target, extracts it into DIR (the tar
stream is checked member by member: only plain files and directories inside
DIR), and configures recovery: `restore_command` runs `backupd wal-fetch`
with this very interpreter and config, the target, promotion at the target,
and `recovery.signal`. With `--start` it starts the server and waits until it
left recovery (reached the target and was promoted).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import stat
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import structlog

from backupd.catalog import walindex
from backupd.catalog.listing import scan_backups
from backupd.catalog.manifest import Manifest, ObjectEntry, rfc3339
from backupd.config.model import Config, Job
from backupd.errors import BackupdError, NotFound, UsageError
from backupd.operations import walchain
from backupd.operations.readback import read_back as read_object
from backupd.sources import postgres
from backupd.storage.base import Store

log = structlog.get_logger("backupd.pitr")

START_TIMEOUT = 3600.0  # seconds --start waits for recovery to end
_MAX_MEMBER_NAME = 1024


@dataclass(frozen=True, slots=True)
class Target:
    time: datetime | None = None
    lsn: int | None = None  # None and no time: the end of the archive

    def describe(self) -> str:
        if self.time is not None:
            return rfc3339(self.time)[:23] + "Z"
        if self.lsn is not None:
            return f"LSN {walindex.format_lsn(self.lsn)}"
        return "the end of the WAL archive"


@dataclass(frozen=True, slots=True)
class PitrOutcome:
    backup: Manifest
    target: Target
    window: walchain.Window
    data_dir: Path
    extract_seconds: float
    recovery_seconds: float | None  # with --start: until promoted
    raw_bytes: int


def parse_time(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageError(f"--time {text!r} is not an RFC 3339 time") from None
    if ts.tzinfo is None:
        raise UsageError(f"--time {text!r} has no time zone offset (add Z or +HH:MM)")
    return ts.astimezone(UTC)


def choose(
    backups: list[Manifest], window: walchain.Window, target: Target, which: str | None
) -> Manifest:
    """The base backup to restore from: `which`, else the newest one before the target.

    A target outside the window is an error that prints the window.
    """
    physical = sorted(
        (m for m in backups if m.wal is not None and m.finished is not None),
        key=lambda m: (m.started_at, m.id),
        reverse=True,
    )
    if not physical:
        raise NotFound("no physical base backup to restore from")
    outside = f"is outside the {window.describe()}"
    if which not in (None, "", "latest"):
        physical = [m for m in physical if which in (m.id, m.stem)]
        if not physical:
            raise NotFound(f"no physical base backup {which!r}")
    if target.time is not None:
        for m in physical:
            assert m.finished is not None
            if m.finished <= target.time <= window.until.get(m.id, m.finished):
                return m
        raise UsageError(f"target {target.describe()} {outside}")
    if target.lsn is not None:
        for m in physical:
            assert m.wal is not None
            if walindex.parse_lsn(m.wal["stop_lsn"]) <= target.lsn:
                if window.latest_lsn is not None and target.lsn > window.latest_lsn:
                    break
                return m
        raise UsageError(
            f"target {target.describe()} {outside} (WAL up to LSN "
            f"{walindex.format_lsn(window.latest_lsn or 0)})"
        )
    newest = physical[0]
    if newest.id in window.broken:
        log.warning("wal_chain_broken", backup=newest.stem, reason=window.broken[newest.id])
    return newest


PREFETCH_DIR = "backupd-prefetch"  # in the data directory; deleted after --start


def restore_command(
    config_path: str,
    job: str,
    store: str | None,
    identity: str | None,
    prefetch: Path | None = None,
) -> str:
    """`backupd wal-fetch` run by this interpreter, as restore_command (%f, %p).

    With `prefetch`, each wal-fetch also fetches (and checks) the next segments
    into that directory, and the command first takes a segment from there with a
    plain `mv`: a Python start-up per PREFETCH_COUNT segments, not per segment.
    """
    argv = [sys.executable, "-m", "backupd", "wal-fetch", "-c", os.path.abspath(config_path)]
    if store is not None:
        argv += ["--storage", store]
    if identity is not None:
        argv += ["--identity", os.path.abspath(identity)]
    if prefetch is not None:
        argv += ["--prefetch", str(prefetch)]
    argv.append(job)
    prefix = []
    if os.environ.get("PYTHONPATH"):  # a source checkout: the server must import it too
        prefix = ["/usr/bin/env", f"PYTHONPATH={os.environ['PYTHONPATH']}"]
    quoted = " ".join(shlex.quote(a).replace("%", "%%") for a in prefix + argv)
    fetch = f"{quoted} %f %p"
    if prefetch is None:
        return fetch
    cached = shlex.quote(str(prefetch)).replace("%", "%%") + "/%f"
    # %f is a WAL file name (hex digits, `.history`), %p a path under pg_wal: no quoting needed
    return f"if [ -f {cached} ]; then mv -f {cached} %p; else {fetch}; fi"


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def recovery_settings(
    command: str, target: Target, port: int | None, data_dir: Path
) -> list[tuple[str, str]]:
    settings = [("restore_command", command)]
    if target.time is not None:
        # recovery_target_time does not take a bare "Z": write the offset
        settings.append(
            ("recovery_target_time", f"{target.time.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}+00:00")
        )
    elif target.lsn is not None:
        settings.append(("recovery_target_lsn", walindex.format_lsn(target.lsn)))
    settings += [
        ("recovery_target_action", "promote"),
        ("recovery_target_timeline", "latest"),
        # A restored copy must not archive into the source's archive; re-enable it
        # deliberately when this copy becomes the primary.
        ("archive_mode", "off"),
    ]
    if port is not None:
        settings += [
            ("port", str(port)),
            ("listen_addresses", "127.0.0.1"),
            ("unix_socket_directories", str(data_dir)),
        ]
    return settings


async def restore_to_dir(
    config: Config,
    job: Job,
    store: Store,
    *,
    data_dir: Path,
    target: Target,
    backup: str | None,
    identity: str | None,
    start: bool,
    port: int,
    announce: Callable[[str], None],
) -> PitrOutcome:
    directory = data_dir  # absolute
    _check_empty(directory)
    listing = await scan_backups(store, job.name)
    backups = [m for m in listing.current if m.wal is not None]
    window = await walchain.window(store, job.name, backups)
    manifest = choose(backups, window, target, backup)
    announce(f"{window.describe()}; restoring {manifest.stem} to {target.describe()}")
    if manifest.id in window.broken:
        until = window.until.get(manifest.id)
        announce(
            f"warning: the WAL chain of {manifest.stem} is broken ({window.broken[manifest.id]}): "
            f"recovery stops at the gap, "
            f"{'around ' + rfc3339(until)[:19] + 'Z' if until else 'at the backup end'}; "
            "the WAL after it cannot be replayed from this backup"
        )
    t0 = time.monotonic()
    existed = await asyncio.to_thread(_check_empty, directory, True)
    entry = next(o for o in manifest.objects if o.kind == "base")
    try:
        raw = await _extract(store, manifest, entry, identity, directory)
    except BaseException:
        # DIR was absent or empty: leave it so, never half a data directory
        await asyncio.shield(asyncio.to_thread(_clear, directory, existed))
        raise
    extract_seconds = time.monotonic() - t0
    command = restore_command(config.path, job.name, store.name, identity, directory / PREFETCH_DIR)
    settings = recovery_settings(command, target, port if start else None, directory)
    await asyncio.to_thread(_write_recovery, directory, settings)
    recovery_seconds = None
    if start:
        source = config.sources[job.source]
        recovery_seconds = await start_and_wait(directory, source.pg_bin_dir, manifest)
        await asyncio.to_thread(shutil.rmtree, directory / PREFETCH_DIR, True)
    return PitrOutcome(manifest, target, window, directory, extract_seconds, recovery_seconds, raw)


def _write_recovery(directory: Path, settings: list[tuple[str, str]]) -> None:
    """Recovery settings appended to postgresql.auto.conf (they win over the copied
    ones), and recovery.signal: the server starts as a recovering primary."""
    with open(directory / "postgresql.auto.conf", "a") as f:
        f.write("\n# added by backupd restore: point-in-time recovery\n")
        for key, value in settings:
            f.write(f"{key} = {_conf_quote(value)}\n")
    with contextlib.suppress(FileNotFoundError):
        (directory / "standby.signal").unlink()
    (directory / "recovery.signal").touch(mode=0o600)


def _clear(directory: Path, keep: bool) -> None:
    if keep:
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    else:
        shutil.rmtree(directory, ignore_errors=True)


def _check_empty(directory: Path, create: bool = False) -> bool:
    """Refuse a DIR that is not absent or empty; with `create`, make it. Whether it existed."""
    try:
        st = directory.lstat()
    except FileNotFoundError:
        if create:
            directory.mkdir(mode=0o700, parents=True)
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"--data-dir {directory} exists and is not a directory")
    if any(directory.iterdir()):
        raise UsageError(f"--data-dir {directory} is not empty: refusing to write into it")
    if create:
        os.chmod(directory, 0o700)  # PostgreSQL refuses a data directory others can read
    return True


# -- the tar stream -----------------------------------------------------------------------


class _Unsafe(BackupdError):
    """A tar member that would land outside the data directory, or is not a plain file."""


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    parts = [p for p in path.parts if p not in ("", ".")]
    if (
        len(name) > _MAX_MEMBER_NAME
        or path.is_absolute()
        or ".." in parts
        or any("\0" in p for p in parts)
    ):
        raise _Unsafe(f"the base backup holds an unsafe path {name[:80]!r}")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _extract_tar(fd: int, directory: Path) -> None:
    """Extract the tar stream on `fd` into `directory`: dirs and regular files only."""
    root_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with (
            os.fdopen(fd, "rb", buffering=1 << 20) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            for member in tar:
                rel = _safe_name(member.name)
                if member.isdir():
                    if str(rel) != ".":
                        os.makedirs(directory / rel, mode=0o700, exist_ok=True)
                    continue
                if not member.isfile():
                    raise _Unsafe(
                        f"the base backup holds {member.name[:80]!r}, which is not a plain "
                        "file or directory (tablespaces are not supported)"
                    )
                target = directory / rel
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(out, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
            # drain: the reader must see EOF, or the writer blocks forever
            while stream.read(1 << 20):
                pass
    except tarfile.TarError as exc:
        raise BackupdError(f"the base backup is not a valid tar stream: {exc}") from None
    except FileExistsError as exc:
        raise _Unsafe(f"the base backup holds {exc.filename} twice") from None
    finally:
        os.close(root_fd)


async def _extract(
    store: Store, manifest: Manifest, entry: ObjectEntry, identity: str | None, directory: Path
) -> int:
    def extract(fd: int) -> int:
        _extract_tar(fd, directory)
        return 0

    read = await _pipe_through(store, manifest, entry, identity, extract, raw=True)
    return read


class _ConsumerGone(BackupdError):
    """The thread reading the stream stopped before its end."""


async def _pipe_through(
    store: Store,
    manifest: Manifest,
    entry: ObjectEntry,
    identity: str | None,
    consume: Callable[[int], int],
    raw: bool = False,
) -> int:
    """Stream the decoded object into `consume(fd)` running in a thread; its result
    (or, with `raw`, the decoded byte count) once the object read back checked."""
    read_fd, write_fd = os.pipe()
    consuming = asyncio.ensure_future(asyncio.to_thread(consume, read_fd))

    async def sink(data: bytes) -> None:
        view = memoryview(data)
        while view:
            if consuming.done():
                raise _ConsumerGone("the tar stream ended early")
            n = await asyncio.to_thread(os.write, write_fd, view)
            view = view[n:]

    try:
        result = await read_object(store, manifest, entry, identity, sink)
    except BaseException as exc:
        os.close(write_fd)  # the consumer sees the end and stops
        await asyncio.wait([consuming])
        failed = None if consuming.cancelled() else consuming.exception()
        if failed is not None and isinstance(exc, OSError | _ConsumerGone):
            raise failed from None  # the consumer stopped first (a bad member): its reason
        raise
    os.close(write_fd)
    value = await consuming
    return result.raw_bytes if raw else value


def _count_tar(fd: int) -> int:
    """Read a tar stream to its end, checking every member name; how many members."""
    n = 0
    try:
        with (
            os.fdopen(fd, "rb", buffering=1 << 20) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            for member in tar:
                _safe_name(member.name)
                n += 1
            while stream.read(1 << 20):
                pass
    except tarfile.TarError as exc:
        raise BackupdError(f"not a valid tar stream: {exc}") from None
    return n


async def check_tar(
    store: Store, manifest: Manifest, entry: ObjectEntry, identity: str | None
) -> int:
    """Read the base backup back, decoded and checked (size, SHA-256), as a tar stream."""
    return await _pipe_through(store, manifest, entry, identity, _count_tar)


# -- --start ------------------------------------------------------------------------------


async def start_and_wait(directory: Path, pg_bin_dir: str, manifest: Manifest) -> float:
    """Start PostgreSQL on `directory`; wait until it is promoted. Seconds it took."""
    major = int(str(manifest.source.get("server_version", "0")).split(".")[0] or 0)
    pg_ctl = postgres.find_tool("pg_ctl", pg_bin_dir, major)
    controldata = postgres.find_tool("pg_controldata", pg_bin_dir, major)
    logfile = directory / "backupd-restore.log"
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(pg_ctl.path),
        "-D",
        str(directory),
        "-l",
        str(logfile),
        "-w",  # until it accepts (read-only) connections: consistent, or already promoted
        "-t",
        str(int(START_TIMEOUT)),
        "start",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise BackupdError(
            f"the restored server did not start: {_log_tail(logfile)} "
            f"(pg_ctl: {out.decode(errors='replace').strip()[-300:]})"
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        # pg_control says "in production" before recovery starts too (copied from the
        # source): recovery is over once recovery.signal is gone as well, and the
        # server accepts connections once postmaster.pid says so.
        if not (directory / "recovery.signal").exists():
            state = await _cluster_state(controldata.path, directory)
            if state == "in production" and _pm_status(directory) == "ready":
                return time.monotonic() - t0
        if not (directory / "postmaster.pid").exists():
            raise BackupdError(f"the restored server stopped during recovery: {_log_tail(logfile)}")
        await asyncio.sleep(0.2)
    raise BackupdError(f"recovery did not end within {START_TIMEOUT:g}s; see {logfile}")


def _pm_status(directory: Path) -> str:
    try:
        lines = (directory / "postmaster.pid").read_text().splitlines()
    except OSError:
        return ""
    return lines[7].strip() if len(lines) > 7 else ""


async def _cluster_state(controldata: Path, directory: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(controldata),
        str(directory),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "LC_ALL": "C"},
    )
    out, _ = await proc.communicate()
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("Database cluster state:"):
            return line.split(":", 1)[1].strip()
    return ""


def _log_tail(logfile: Path) -> str:
    try:
        lines = logfile.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {logfile})"
    picked = [line for line in lines if "FATAL" in line or "PANIC" in line] or lines
    return " | ".join(picked[-3:])[-800:]
