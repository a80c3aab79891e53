"""`backupd verify`: prove a backup is intact, and optionally that it restores.

Without `--restore`, each data object is read back once: its size and SHA-256
are checked against the manifest and, unless it is encrypted and no identity
is given, it is decrypted, decompressed and, for custom-format dumps, read
whole by `pg_restore` (its SQL output discarded). `pg_restore --list` alone
stops after the table of contents and so passes a truncated archive. The
first problem found is reported, the most basic first: missing, size,
SHA-256, decoding, archive.

With `--restore` (a restore drill), each database is restored into a scratch
database on `verify.target`, created and dropped by backupd (also when the
drill fails or is cancelled); its tables and row counts are compared with the
counts recorded at backup time, and every table answers a smoke query.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import asyncpg
import structlog

from backupd.codecs import Encoder, algorithm_of, decompressor
from backupd.config import Config, Job
from backupd.crypto import AgeDecryptor, load_identities
from backupd.dsn import dsn_params, redact_dsn
from backupd.errors import BackupdError, IntegrityError, NotFound, SourceError, UsageError
from backupd.manifest import Manifest, ObjectEntry
from backupd.plainsql import PlainFilter
from backupd.sources import postgres
from backupd.storage.base import Store

log = structlog.get_logger("backupd.verify")

STDERR_LIMIT = 4000  # characters of a tool's error output kept in a report line


@dataclass
class VerifyReport:
    ok: bool = True
    lines: list[str] = field(default_factory=list)
    rto_seconds: float | None = None  # physical drills: restore until promoted (issue 16)

    def fail(self, line: str) -> None:
        self.ok = False
        self.lines.append(f"FAILED: {line}")

    @property
    def failures(self) -> list[str]:
        return [line.removeprefix("FAILED: ") for line in self.lines if line.startswith("FAILED")]


async def verify_backup(
    config: Config,
    job: Job,
    store: Store,
    manifest: Manifest,
    *,
    identity: str | None,
    restore: bool,
) -> VerifyReport:
    """Check every data object of `manifest` in `store`; with `restore`, run a restore drill.

    Raises UsageError when `restore` is asked of a job without `verify.target`.
    """
    if job.kind == "physical":  # issue 16: base backup, WAL chain, drill (backupd/pitr_verify.py)
        from backupd.pitr_verify import verify_physical

        return await verify_physical(config, job, store, manifest, identity, restore)
    target = job.verify.target if job.verify else None
    if restore and not target:
        raise UsageError(
            f'job {job.name}: a restore drill needs `verify = {{ target = "DSN" }}` in the job '
            "(a server where backupd may create and drop scratch databases)"
        )
    report = VerifyReport()
    count = len(manifest.objects)
    report.lines.append(
        f"backup {manifest.stem} of job {manifest.job} in storage {store.name} "
        f"({count} data object{'' if count == 1 else 's'}, started {manifest.started_at})"
    )
    pg_bin_dir = config.sources[job.source].pg_bin_dir
    for entry in manifest.objects:
        try:
            what = await _check_object(store, manifest, entry, identity, pg_bin_dir)
        except BackupdError as exc:
            report.fail(f"{entry.key}: {exc}")
            continue
        report.lines.append(f"ok: {entry.key}: {what}")
    if restore and target and report.ok:
        if manifest.encryption and identity is None:
            report.fail(f"backup {manifest.stem} is encrypted: a restore drill needs --identity")
        else:
            await _drill(config, job, target, store, manifest, identity, report)
    report.lines.append("verified: ok" if report.ok else "verified: FAILED")
    return report


# -- reading an object back --------------------------------------------------------------


@dataclass
class _Read:
    size: int = 0
    raw: int = 0
    sha256: str = ""
    decode_error: str | None = None
    tool_error: str | None = None


def _decoders(manifest: Manifest, identity: str | None) -> list[Encoder]:
    decoders: list[Encoder] = []
    if manifest.encryption:
        assert identity is not None
        decoders.append(AgeDecryptor(load_identities(identity)))
    decoders.append(decompressor(algorithm_of(manifest.compression)))
    return decoders


async def _stream(
    store: Store,
    manifest: Manifest,
    entry: ObjectEntry,
    decoders: list[Encoder] | None,
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
    transform: PlainFilter | None = None,
) -> _Read:
    """Read one data object once: hash every stored byte, decode them with `decoders`,
    and feed the decoded bytes to the process `argv` on its stdin.

    Never stops early on bad data: a decoding error or a tool that exits
    early stops the decoding or the feeding, while the hash still covers the
    whole object, so the report can say which check failed first.
    """
    key = manifest.object_key(entry)
    read = _Read()
    digest = hashlib.sha256()

    def step(chunk: bytes, final: bool) -> bytes:
        digest.update(chunk)
        if decoders is None or read.decode_error is not None:
            return b""
        try:
            for decoder in decoders:
                chunk = decoder.update(chunk) + (decoder.finish() if final else b"")
        # Codecs raise their own types (zstandard.ZstdError, zlib.error, lz4's RuntimeError).
        except Exception as exc:
            read.decode_error = str(exc) or type(exc).__name__
            return b""
        read.raw += len(chunk)
        return chunk

    proc = None
    if argv is not None:
        proc = await _spawn(argv, env)
    feeding = proc is not None
    try:
        try:
            async for chunk in store.open_read(key):
                read.size += len(chunk)
                plain = await asyncio.to_thread(step, chunk, False)
                if plain and transform is not None:
                    plain = transform.feed(plain)
                if plain and feeding:
                    feeding = await _feed(proc, plain)
            tail = await asyncio.to_thread(step, b"", True)
        except NotFound:
            raise IntegrityError(
                f"data object {key} is missing from storage {store.name}"
            ) from None
        if transform is not None:
            tail = transform.feed(tail) + transform.finish()
        if tail and feeding:
            await _feed(proc, tail)
        if proc is not None:
            read.tool_error = await _finish(proc, argv)
    except BaseException:
        if proc is not None:
            await _kill(proc)
        raise
    read.sha256 = digest.hexdigest()
    return read


async def _spawn(argv: list[str], env: dict[str, str] | None) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=env,
            pass_fds=postgres.inherited_fds(env),
        )
    except OSError as exc:
        raise SourceError(f"cannot start {argv[0]}: {exc.strerror}") from None


async def _feed(proc: asyncio.subprocess.Process | None, data: bytes) -> bool:
    """Write to the tool's stdin; False once it stopped reading (its exit status says why)."""
    assert proc is not None and proc.stdin is not None
    try:
        proc.stdin.write(data)
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


async def _finish(proc: asyncio.subprocess.Process, argv: list[str] | None) -> str | None:
    """Close the tool's stdin and wait; its failure as text, or None."""
    assert proc.stdin is not None and proc.stderr is not None and argv is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.close()
        await proc.stdin.wait_closed()
    stderr, rc = await asyncio.gather(proc.stderr.read(), proc.wait())
    if rc == 0:
        return None
    text = stderr.decode(errors="replace").strip()[-STDERR_LIMIT:] or "no error output"
    return f"{os.path.basename(argv[0])} exited with status {rc}: {text}"


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)
    await asyncio.shield(proc.wait())


def _check(read: _Read, entry: ObjectEntry, decoded: bool) -> None:
    """Raise on the first problem: size, SHA-256, decoding, decoded size, then the tool."""
    if read.size != entry.size_bytes:
        how = "truncated" if read.size < entry.size_bytes else "longer than recorded"
        raise IntegrityError(
            f"size mismatch ({how}): the stored object is {read.size} bytes, "
            f"the manifest says {entry.size_bytes}"
        )
    if read.sha256 != entry.sha256:
        raise IntegrityError(
            f"SHA-256 mismatch: the stored bytes hash to {read.sha256}, "
            f"the manifest says {entry.sha256}"
        )
    if read.decode_error is not None:
        raise IntegrityError(f"cannot decrypt or decompress: {read.decode_error}")
    if decoded and read.raw != entry.raw_bytes:
        raise IntegrityError(f"decoded to {read.raw} bytes, the manifest says {entry.raw_bytes}")
    if read.tool_error is not None:
        raise BackupdError(read.tool_error)


async def _check_object(
    store: Store, manifest: Manifest, entry: ObjectEntry, identity: str | None, pg_bin_dir: str
) -> str:
    """Read one object back and check it; returns what was proven."""
    if manifest.encryption and identity is None:
        _check(await _stream(store, manifest, entry, None), entry, decoded=False)
        return (
            f"{entry.size_bytes} bytes, SHA-256 matches; encrypted: not decrypted "
            "(pass --identity FILE to decrypt and read the archive)"
        )
    argv = None
    if entry.format == "custom":
        argv = [str(_tool("pg_restore", pg_bin_dir, manifest).path), f"--file={os.devnull}"]
    read = await _stream(store, manifest, entry, _decoders(manifest, identity), argv)
    _check(read, entry, decoded=True)
    what = "archive read whole by pg_restore" if argv else "plain SQL"
    return f"{entry.size_bytes} bytes, SHA-256 matches; decoded to {read.raw} bytes; {what}"


def _tool(name: str, pg_bin_dir: str, manifest: Manifest) -> postgres.DumpTool:
    """A client tool at least as new as the pg_dump that wrote the backup."""
    match = re.match(r"\d+", str(manifest.tool.get("version", "")))
    return postgres.find_tool(name, pg_bin_dir, int(match.group(0)) if match else 0)


# -- the restore drill -------------------------------------------------------------------


def scratch_name(manifest: Manifest, index: int, database: str) -> str:
    """The scratch database for one object: recognisable, and the same on every attempt."""
    name = f"backupd_verify_{manifest.id}_{index}_{database}".lower()
    return re.sub(r"[^a-z0-9_]", "_", name)[:63]


async def _drill(
    config: Config,
    job: Job,
    target: str,
    store: Store,
    manifest: Manifest,
    identity: str | None,
    report: VerifyReport,
) -> None:
    password = _target_password(config, job, target)
    pg_bin_dir = config.sources[job.source].pg_bin_dir
    for index, entry in enumerate(manifest.objects):
        if entry.kind == "globals":
            report.lines.append(
                "skipped: globals: roles and tablespaces are cluster-wide, "
                "not restored into a scratch database"
            )
            continue
        if manifest.kind == "data-only":
            report.lines.append(
                f"skipped: {entry.database}: a data-only dump needs its schema first, "
                "not restored into an empty scratch database"
            )
            continue
        scratch = scratch_name(manifest, index, entry.database)
        try:
            async with _scratch_database(target, password, scratch):
                await _restore(
                    store, manifest, entry, identity, target, scratch, password, pg_bin_dir
                )
                restored = await postgres.table_row_counts(target, password, scratch)
                _compare(entry.database, scratch, manifest, restored, report)
                await _smoke(target, password, entry.database, scratch, restored, report)
            report.lines.append(f"ok: {entry.database}: scratch database {scratch} dropped")
        except BackupdError as exc:
            report.fail(f"{entry.database}: restore drill in scratch database {scratch}: {exc}")
        log.info("restore_drill_done", backup=manifest.stem, database=entry.database)


def _target_password(config: Config, job: Job, target: str) -> str | None:
    """The source's password, only when `target` is the same login on the same server;
    any other target authenticates as libpq does (PGPASSFILE, ~/.pgpass, PGPASSWORD)."""
    source = config.sources[job.source]
    if source.password is None or _login(source.dsn) != _login(target):
        return None
    return source.password.resolve()


def _login(dsn: str) -> tuple[str, str, str]:
    params = dsn_params(dsn)
    host = params.get("host") or params.get("hostaddr") or ""
    return host, params.get("port") or "5432", params.get("user") or ""


@contextlib.asynccontextmanager
async def _scratch_database(target: str, password: str | None, name: str) -> AsyncIterator[None]:
    """A fresh empty database on `target`, dropped when the block ends however it ends.

    A leftover of a crashed drill (same backup, same name) is dropped first.
    """
    # `name` is made of [a-z0-9_] only (scratch_name): safe to quote as an identifier.
    drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    await _admin(target, password, drop, f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield
    finally:
        await _admin(target, password, drop)


async def _admin(target: str, password: str | None, *statements: str) -> None:
    conn = await postgres.connect(target, password)
    try:
        for statement in statements:
            await conn.execute(statement)
    except asyncpg.PostgresError as exc:
        raise SourceError(f"verify target {redact_dsn(target)}: {exc}") from None
    finally:
        await conn.close()


async def _restore(
    store: Store,
    manifest: Manifest,
    entry: ObjectEntry,
    identity: str | None,
    target: str,
    scratch: str,
    password: str | None,
    pg_bin_dir: str,
) -> None:
    """Stream the object into pg_restore (custom) or psql (plain) on the scratch database.

    Ownership and privileges are not restored: the drill target need not have
    the source's roles. A plain dump restores as written, owners included.
    """
    dsn = postgres.with_database(target, scratch)
    # A plain dump made with --create connects to its own database name: the
    # filter drops that (and the database-level entries) so all of it goes into
    # the scratch database.
    transform = None
    if entry.format == "custom":
        tool = _tool("pg_restore", pg_bin_dir, manifest)
        argv = [str(tool.path), "--no-password", "--exit-on-error", "--no-owner"]
        argv += ["--no-privileges", f"--dbname={dsn}"]
    else:
        tool = _tool("psql", pg_bin_dir, manifest)
        argv = [str(tool.path), "--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1"]
        argv += ["--no-password", f"--dbname={dsn}"]
        transform = PlainFilter(entry.database)
    with _auth_env(password, target) as env:
        decoders = _decoders(manifest, identity)
        read = await _stream(store, manifest, entry, decoders, argv, env, transform)
    _check(read, entry, decoded=True)


@contextlib.contextmanager
def _auth_env(password: str | None, target: str) -> Iterator[dict[str, str] | None]:
    """The tool's environment: a passfile with `password` for `target`'s hosts, else
    backupd's own environment."""
    if password is None:
        yield None
        return
    with postgres.passfile_env(password, target) as env:
        yield env


def _compare(
    database: str,
    scratch: str,
    manifest: Manifest,
    restored: dict[str, int],
    report: VerifyReport,
) -> None:
    total = sum(restored.values())
    done = f"{database}: restored into {scratch}: {len(restored)} tables, {total} rows"
    expected = manifest.tables.get(database)
    if expected is None:
        report.lines.append(
            f"ok: {done} (the backup recorded no row counts to compare: "
            "only full dumps without table filters record them)"
        )
        return
    problems = []
    for table in sorted(set(expected) | set(restored)):
        if table not in restored:
            problems.append(f"{table} is missing ({expected[table]} rows recorded)")
        elif table not in expected:
            problems.append(f"{table} was not in the backup's record")
        elif expected[table] != restored[table]:
            problems.append(
                f"{table}: restored {restored[table]} rows, the backup recorded {expected[table]}"
            )
    if problems:
        report.fail(f"{done}; tables or row counts differ from the backup: " + "; ".join(problems))
    else:
        report.lines.append(f"ok: {done}; row counts match those recorded at backup time")


async def _smoke(
    dsn: str,
    password: str | None,
    database: str,
    scratch: str,
    tables: dict[str, int],
    report: VerifyReport,
) -> None:
    conn = await postgres.connect(dsn, password, scratch)
    try:
        failed = 0
        for table in tables:
            try:
                # Names from table_row_counts: already quoted by format('%I.%I').
                # Each row is turned into text by the server (every column's output
                # function runs) and only a count comes back: no client-side decoding
                # of user-defined types.
                await conn.fetchval(
                    f"SELECT count(length(t::text)) FROM (SELECT * FROM {table} LIMIT 1) t"  # noqa: S608
                )
            except asyncpg.PostgresError as exc:
                failed += 1
                report.fail(f"{database}: smoke query on {table}: {exc}")
        if not failed:
            report.lines.append(f"ok: {database}: smoke query answered by all {len(tables)} tables")
    finally:
        await conn.close()
