"""Reading backups back: restore into PostgreSQL, download to a file, verify.

Every read streams the stored object through decryption and decompression,
counting its size and SHA-256 against the manifest on the way, so a restore
or download that succeeds has also proven the object intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from backupd.codecs import Encoder, algorithm_of, decompressor
from backupd.crypto import AgeDecryptor, DecryptionError, load_identities
from backupd.dsn import dsn_params
from backupd.errors import BackupdError, IntegrityError, UsageError
from backupd.manifest import Manifest, ObjectEntry
from backupd.plainsql import PlainFilter, _Scan, quote_ident, split_code
from backupd.sources import postgres
from backupd.storage.base import Store

log = structlog.get_logger("backupd.restore")

Sink = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ReadResult:
    size_bytes: int
    sha256: str
    raw_bytes: int


def _decoders(manifest: Manifest, identity: str | None) -> list[Encoder]:
    decoders: list[Encoder] = []
    if manifest.encryption:
        if identity is None:
            raise DecryptionError(
                f"backup {manifest.stem} is encrypted with age: pass --identity FILE "
                "(the secret key of one of its recipients)"
            )
        decoders.append(AgeDecryptor(load_identities(identity)))
    decoders.append(decompressor(algorithm_of(manifest.compression)))
    return decoders


async def read_object(
    store: Store, manifest: Manifest, entry: ObjectEntry, identity: str | None, sink: Sink | None
) -> ReadResult:
    """Stream one data object, decoded, into `sink`; checks size and SHA-256 at the end."""
    decoders = _decoders(manifest, identity) if sink is not None else []
    digest = hashlib.sha256()
    size = raw = 0

    def decode(data: bytes, final: bool) -> bytes:
        digest.update(data)
        for dec in decoders:
            data = dec.update(data) + (dec.finish() if final else b"")
        return data

    try:
        async for chunk in store.open_read(manifest.object_key(entry)):
            size += len(chunk)
            plain = await asyncio.to_thread(decode, chunk, False) if sink else _hash(digest, chunk)
            if plain and sink is not None:
                raw += len(plain)
                await sink(plain)
        if sink is not None:
            tail = await asyncio.to_thread(decode, b"", True)
            if tail:
                raw += len(tail)
                await sink(tail)
    except DecryptionError:
        raise
    except ValueError as exc:  # a codec refusing corrupted or truncated input
        raise IntegrityError(f"{entry.key}: cannot decode: {exc}") from None
    result = ReadResult(size, digest.hexdigest(), raw)
    if size != entry.size_bytes:
        raise IntegrityError(
            f"{entry.key}: stored size is {size} bytes, manifest says {entry.size_bytes}"
        )
    if result.sha256 != entry.sha256:
        raise IntegrityError(
            f"{entry.key}: SHA-256 {result.sha256} does not match the manifest's {entry.sha256}"
        )
    if sink is not None and raw != entry.raw_bytes:
        raise IntegrityError(f"{entry.key}: decoded {raw} bytes, manifest says {entry.raw_bytes}")
    return result


def _hash(digest: hashlib._Hash, chunk: bytes) -> bytes:
    digest.update(chunk)
    return b""


@dataclass
class RestoreOutcome:
    """What a restore did: the object read, and lines for the operator."""

    read: ReadResult
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


async def restore(
    store: Store,
    manifest: Manifest,
    *,
    database: str | None,
    target_dsn: str,
    globals_: bool = False,
    tables: tuple[str, ...] = (),
    schemas: tuple[str, ...] = (),
    clean: bool = False,
    create: bool = False,
    identity: str | None = None,
    pg_bin_dir: str = "",
    env: dict[str, str] | None = None,
    announce: Callable[[str], None] | None = None,
) -> RestoreOutcome:
    """Restore one database (or the globals) of a backup into `target_dsn`, all or nothing.

    A database restore runs in one transaction (`pg_restore --single-transaction
    --exit-on-error`, `psql -1 -v ON_ERROR_STOP=1`): when it fails, the target
    is as it was. With `create`, the database named in `target_dsn` is created
    first (refused if it exists) and dropped again if the restore fails; the
    archive's own database name is never connected to.
    """
    _refuse_password_in(target_dsn)
    entry = manifest.globals_object() if globals_ else manifest.object_for(database)
    job = _Restore(store, manifest, entry, identity, target_dsn, pg_bin_dir, env, announce)
    if entry.kind == "globals":
        if tables or schemas or clean or create:
            raise UsageError("--table, --schema, --clean and --create do not apply to --globals")
        return await job.globals_()
    if create:
        job.create_as = dsn_params(target_dsn).get("dbname") or None
        if job.create_as is None:
            raise UsageError(
                "--create needs the new database's name in --to "
                "(postgresql://HOST/NEWNAME or 'host=HOST dbname=NEWNAME')"
            )
    if entry.format == "plain":
        if tables or schemas or clean:
            raise UsageError(
                "--table, --schema and --clean need a custom-format dump; this one is plain SQL"
            )
        return await job.plain()
    return await job.custom(tables, schemas, clean)


@dataclass
class _Restore:
    store: Store
    manifest: Manifest
    entry: ObjectEntry
    identity: str | None
    target: str
    pg_bin_dir: str
    env: dict[str, str] | None
    announce: Callable[[str], None] | None
    create_as: str | None = None

    def say(self, line: str) -> None:
        if self.announce is not None:
            self.announce(line)
        log.info("restore_note", note=line)

    def tool(self, name: str) -> str:
        match = re.match(r"\d+", str(self.manifest.tool.get("version", "")))
        major = int(match.group(0)) if match else 0
        return str(postgres.find_tool(name, self.pg_bin_dir, major).path)

    def psql(self, dsn: str, *args: str) -> list[str]:
        return [
            self.tool("psql"),
            "--no-psqlrc",
            "--quiet",
            "--no-password",
            "--set",
            "ON_ERROR_STOP=1",
            *args,
            "--file=-",
            f"--dbname={dsn}",
        ]

    def _say_atomic(self) -> None:
        self.say(
            "restoring in one transaction: if it fails, "
            + (
                f"the new database {self.create_as!r} is dropped again"
                if self.create_as
                else "the target database is left as it was"
            )
        )

    async def custom(
        self, tables: tuple[str, ...], schemas: tuple[str, ...], clean: bool
    ) -> RestoreOutcome:
        pg_restore = self.tool("pg_restore")
        head = b""
        if tables or schemas or self.create_as:
            head = await _archive_head(
                self.store, self.manifest, self.entry, self.identity, pg_restore, self.env
            )
        argv = [pg_restore, "--no-password", "--single-transaction", "--exit-on-error"]
        lines = []
        with tempfile.TemporaryDirectory(prefix="backupd-restore-") as tmp:
            if tables or schemas:
                selected = await _select(pg_restore, head, tables, schemas, self.env)
                listing = Path(tmp) / "toc.list"
                listing.write_text("\n".join(selected) + "\n")
                argv.append(f"--use-list={listing}")
                lines.append(f"selected {len(selected)} archive entries:")
                lines += [f"  {line}" for line in selected]
            if clean:
                argv += ["--clean", "--if-exists"]
            argv.append(f"--dbname={self.target}")
            create_sql: list[bytes] = []
            db_sql = b""
            if self.create_as:
                create_sql, db_sql = await self._database_entries(pg_restore, head, Path(tmp))
            self._say_atomic()
            async with self._created(create_sql, lines):
                async with _Feeder.start(argv, "pg_restore", self.env) as feeder:
                    read = await read_object(
                        self.store, self.manifest, self.entry, self.identity, feeder.write
                    )
                    warnings = await feeder.finish()
                if db_sql:
                    psql = self.psql(self.target, "--single-transaction")
                    warnings += await _run(psql, db_sql, self.env)
                    lines.append(
                        "applied its database-level properties (comment, settings, grants)"
                    )
        return RestoreOutcome(read, lines, warnings)

    async def _database_entries(
        self, pg_restore: str, head: bytes, tmp: Path
    ) -> tuple[list[bytes], bytes]:
        """The archive's database-level entries as SQL about the new database:
        (CREATE DATABASE statements, the rest)."""
        assert self.create_as is not None
        out = await _run_out([pg_restore, "--create", "--list"], head, self.env)
        ids = [line.split(";", 1)[0] for line in out.splitlines() if _DB_TOC.match(line)]
        if not ids:
            return [], b""
        listing = tmp / "database.list"
        listing.write_text("".join(f"{i};\n" for i in ids))
        sql = await _run_bytes(
            [pg_restore, "--create", "--file=-", f"--use-list={listing}"], head, self.env
        )
        filt = PlainFilter(self.entry.database, self.create_as)
        rest = filt.feed(sql) + filt.finish()
        return filt.create_statements, rest

    @contextlib.asynccontextmanager
    async def _created(self, create_sql: list[bytes], lines: list[str]) -> AsyncIterator[None]:
        """Create the typed database (refused if it exists); drop it if the block fails."""
        if self.create_as is None:
            yield
            return
        name = self.create_as
        query = b"SELECT count(*) FROM pg_database WHERE datname = :'name';\n"
        for maintenance_db in ("postgres", "template1"):
            maintenance = postgres.with_database(self.target, maintenance_db)
            try:
                count = await _run_out(
                    self.psql(maintenance, "--tuples-only", "--no-align", "--set", f"name={name}"),
                    query,
                    self.env,
                )
                break
            except BackupdError as exc:
                if maintenance_db != "postgres" or "does not exist" not in str(exc):
                    raise
        if count.strip() != "0":
            raise UsageError(
                f"database {name!r} already exists on the target: --create restores only into "
                "a new database (drop it first, or restore into it without --create)"
            )
        default = f"CREATE DATABASE {quote_ident(name)} TEMPLATE template0;\n".encode()
        await _run(self.psql(maintenance), b"".join(create_sql) or default, self.env)
        lines.append(f"created database {name!r}")
        try:
            yield
        except BaseException:
            drop = f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE);\n".encode()
            try:
                await asyncio.shield(_run(self.psql(maintenance), drop, self.env))
                log.info("restore_new_database_dropped", database=name)
            except BackupdError as exc:
                log.error("restore_new_database_not_dropped", database=name, error=str(exc))
            raise

    async def plain(self) -> RestoreOutcome:
        filt = PlainFilter(self.entry.database, self.create_as)
        argv = self.psql(self.target, "--single-transaction")
        self._say_atomic()
        lines: list[str] = []
        buffered: list[bytes] = []
        async with contextlib.AsyncExitStack() as stack:
            feeder: _Feeder | None = None

            async def start() -> _Feeder:
                await stack.enter_async_context(self._created(filt.create_statements, lines))
                started = await stack.enter_async_context(_Feeder.start(argv, "psql", self.env))
                for block in buffered:
                    await started.write(block)
                buffered.clear()
                return started

            async def sink(data: bytes) -> None:
                nonlocal feeder
                out = filt.feed(data)
                if feeder is not None:
                    await feeder.write(out)
                    return
                buffered.append(out)
                if filt.head_done:
                    feeder = await start()

            read = await read_object(self.store, self.manifest, self.entry, self.identity, sink)
            tail = filt.finish()
            if feeder is None:
                buffered.append(tail)
                feeder = await start()
            else:
                await feeder.write(tail)
            warnings = await feeder.finish()
        if filt.db_entries and not self.create_as:
            lines.append(
                "not applied (they belong to the database itself: restore with --create "
                "to get them): " + "; ".join(filt.db_entries)
            )
        return RestoreOutcome(read, lines, warnings)

    async def globals_(self) -> RestoreOutcome:
        """Roles and tablespaces: create the missing ones, leave the existing ones as they are."""
        chunks: list[bytes] = []

        async def collect(data: bytes) -> None:
            chunks.append(data)

        read = await read_object(self.store, self.manifest, self.entry, self.identity, collect)
        plan = plan_globals(b"".join(chunks), await self._cluster_globals())
        if plan.tablespaces:
            self.say(
                "not one transaction: CREATE TABLESPACE cannot run inside one; each statement "
                "is applied in turn and a failure stops there (what was applied is listed)"
            )
        else:
            self.say("restoring the globals in one transaction: if it fails, nothing is applied")
        args = () if plan.tablespaces else ("--single-transaction",)
        try:
            warnings = await _run(self.psql(self.target, *args), plan.sql, self.env)
        except BackupdError as exc:
            if not plan.tablespaces:
                raise
            now = await self._cluster_globals()
            roles = [r for r in plan.created if ("r", r) in now]
            spaces = [t for t in plan.tablespaces if ("t", t) in now]
            raise BackupdError(
                f"{exc}\napplied before the failure (not one transaction): created roles: "
                f"{', '.join(roles) or 'none'}; created tablespaces: {', '.join(spaces) or 'none'}"
            ) from None
        lines = [
            f"created roles: {', '.join(plan.created) or 'none'}",
            f"existing roles, left as they are: {', '.join(plan.existing) or 'none'}",
        ]
        if plan.tablespaces or plan.existing_tablespaces:
            lines.append(f"created tablespaces: {', '.join(plan.tablespaces) or 'none'}")
            left = ", ".join(plan.existing_tablespaces) or "none"
            lines.append(f"existing tablespaces, left as they are: {left}")
        lines.append(f"skipped {plan.skipped} statement(s) about existing roles or tablespaces")
        return RestoreOutcome(read, lines, warnings)

    async def _cluster_globals(self) -> set[tuple[str, str]]:
        """The target cluster's roles ("r", name) and tablespaces ("t", name)."""
        out = await _run_bytes(
            self.psql(
                self.target,
                "--tuples-only",
                "--no-align",
                "--field-separator-zero",
                "--record-separator-zero",
            ),
            b"SELECT 'r', rolname FROM pg_roles UNION ALL "
            b"SELECT 't', spcname FROM pg_tablespace;\n",
            self.env,
        )
        fields = out.split(b"\0")
        return {
            (fields[i].decode(), fields[i + 1].decode(errors="replace"))
            for i in range(0, len(fields) - 1, 2)
        }


# -- the globals dump ---------------------------------------------------------------------

_IDENT = rb'("(?:[^"]|"")*"|[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)'
_ROLE_STMT = re.compile(rb"^(CREATE|ALTER) ROLE " + _IDENT)
_COMMENT_ROLE = re.compile(rb"^COMMENT ON ROLE " + _IDENT)
_SPC_STMT = re.compile(rb"^(CREATE|ALTER) TABLESPACE " + _IDENT)
_COMMENT_SPC = re.compile(rb"^COMMENT ON TABLESPACE " + _IDENT)


def _unquote(ident: bytes) -> str:
    text = ident.decode(errors="replace")
    if text.startswith('"'):
        return text[1:-1].replace('""', '"')
    return text.lower()


@dataclass
class GlobalsPlan:
    sql: bytes
    created: list[str]
    existing: list[str]
    tablespaces: list[str]
    existing_tablespaces: list[str]
    skipped: int


def plan_globals(dump: bytes, existing: set[tuple[str, str]]) -> GlobalsPlan:
    """The statements of a `pg_dumpall --globals-only` output that are safe to run on a
    cluster that has the roles/tablespaces `existing` ("r"/"t", name): those about
    existing ones are skipped (never a changed password or attribute of a role that
    is already there); memberships and grants are kept."""
    plan = GlobalsPlan(b"", [], [], [], [], 0)
    out: list[bytes] = []
    for stmt in _statements(dump):
        # the statement without the comment lines before it
        code = b"\n".join(
            line for line in stmt.splitlines() if line.strip() and not line.startswith(b"--")
        ).lstrip()
        kind = name = None
        for pattern, k in (
            (_ROLE_STMT, "r"),
            (_COMMENT_ROLE, "r"),
            (_SPC_STMT, "t"),
            (_COMMENT_SPC, "t"),
        ):
            m = pattern.match(code)
            if m:
                kind, name = k, _unquote(m.group(m.lastindex or 1))
                break
        if kind is not None and name is not None:
            if (kind, name) in existing:
                plan.skipped += 1
                if code.startswith(b"CREATE "):
                    (plan.existing if kind == "r" else plan.existing_tablespaces).append(name)
                continue
            if code.startswith(b"CREATE "):
                (plan.created if kind == "r" else plan.tablespaces).append(name)
        out.append(stmt)
    plan.sql = b"".join(out)
    return plan


def _statements(sql: bytes) -> Iterator[bytes]:
    """SQL split into statements (and psql meta-command lines), literals respected."""
    scan = _Scan()
    current: list[bytes] = []
    for line in sql.splitlines(keepends=True):
        if scan.quote is None and not current and line.startswith(b"\\"):
            yield line
            continue
        segments = split_code(line, scan)
        current.append(line)
        code = b"".join(t for is_code, t in segments if is_code).rstrip()
        if scan.quote is None and code.endswith(b";"):
            yield b"".join(current)
            current = []
    if current:
        yield b"".join(current)


# -- running the client tools -------------------------------------------------------------

MAX_ERRORS_SHOWN = 5
_ERROR_LINE = re.compile(r"\b(?:ERROR|FATAL|PANIC|error):")
_WARNING_LINE = re.compile(r"\b(?:WARNING|warning):")
# pg_restore --list lines of the database-level entries (`--create` only).
_DB_TOC = re.compile(
    r"^\d+; \d+ \d+ (?:DATABASE|DATABASE PROPERTIES|(?:COMMENT|ACL|SECURITY LABEL) - DATABASE) "
)
MAX_HEAD = 256 * 1024 * 1024  # bytes of an archive kept to read its table of contents


def _summary(name: str, rc: int, stderr: str) -> str:
    """The first errors and their count (not the last bytes, where the first error is lost)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if _ERROR_LINE.search(line)]
    if not errors:
        detail = "\n".join(lines[:MAX_ERRORS_SHOWN]) or "no error output"
        return f"{name} exited with status {rc}: {detail}"
    shown = []
    for i in errors[:MAX_ERRORS_SHOWN]:
        shown.append(lines[i])
        # psql/pg_restore put the failing command and details on the next lines
        for follow in lines[i + 1 : i + 4]:
            if _ERROR_LINE.search(follow) or _WARNING_LINE.search(follow):
                break
            if follow.lstrip().startswith(
                ("LINE ", "DETAIL:", "HINT:", "CONTEXT:", "Command was:")
            ):
                shown.append(follow)
    more = len(errors) - MAX_ERRORS_SHOWN
    text = "\n".join(shown) + (f"\n... and {more} more error(s)" if more > 0 else "")
    return f"{name} exited with status {rc}: {len(errors)} error(s), the first:\n{text}"


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if _WARNING_LINE.search(line)]


class _Feeder:
    """A client tool reading a restore on its stdin; its stderr kept whole (bounded)."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.done = False
        assert proc.stderr is not None
        self._stderr = asyncio.ensure_future(_read_capped(proc.stderr))

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls, argv: list[str], name: str, env: dict[str, str] | None
    ) -> AsyncIterator[_Feeder]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=env,
            )
        except OSError as exc:
            raise BackupdError(f"cannot start {argv[0]}: {exc.strerror}") from None
        feeder = cls(proc, name)
        try:
            yield feeder
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await asyncio.shield(proc.wait())
            feeder._stderr.cancel()
            raise

    async def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        if self.done or not data:
            return
        try:
            self.proc.stdin.write(data)
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            # The tool stopped reading: its exit status says why. If it exited 0
            # the rest is still read, to check its size and SHA-256.
            rc = await self.proc.wait()
            if rc != 0:
                raise BackupdError(_summary(self.name, rc, await self._stderr)) from None
            self.done = True

    async def finish(self) -> list[str]:
        """Close stdin and wait; the warnings of a success, or raise with the first errors."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.close()
            await self.proc.stdin.wait_closed()
        rc = await self.proc.wait()
        stderr = await self._stderr
        if rc != 0:
            raise BackupdError(_summary(self.name, rc, stderr))
        return _warnings(stderr)


async def _read_capped(stream: asyncio.StreamReader, limit: int = 4 * 1024 * 1024) -> str:
    """All of a stream, its first `limit` bytes kept (the first errors matter most)."""
    kept = bytearray()
    while block := await stream.read(65536):
        if len(kept) < limit:
            kept += block[: limit - len(kept)]
    return kept.decode(errors="replace")


async def _run(argv: list[str], stdin: bytes, env: dict[str, str] | None) -> list[str]:
    """Run a tool on `stdin`; its warnings, or raise with its first errors."""
    async with _Feeder.start(argv, Path(argv[0]).name, env) as feeder:
        await feeder.write(stdin)
        return await feeder.finish()


async def _run_out(argv: list[str], stdin: bytes, env: dict[str, str] | None) -> str:
    """Run a tool on `stdin` and return its standard output as text; raise if it fails."""
    return (await _run_bytes(argv, stdin, env)).decode(errors="replace")


async def _run_bytes(argv: list[str], stdin: bytes, env: dict[str, str] | None) -> bytes:
    """Run a tool on `stdin` and return its standard output; raise if it fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
    except OSError as exc:
        raise BackupdError(f"cannot start {argv[0]}: {exc.strerror}") from None
    try:
        out, err = await proc.communicate(stdin)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        raise BackupdError(
            _summary(Path(argv[0]).name, proc.returncode or 0, err.decode(errors="replace"))
        )
    return out


class _HeadRead(Exception):
    """pg_restore --list has what it needs: stop reading the object."""


async def _archive_head(
    store: Store,
    manifest: Manifest,
    entry: ObjectEntry,
    identity: str | None,
    pg_restore: str,
    env: dict[str, str] | None,
) -> bytes:
    """The start of a custom archive, up to the end of its table of contents.

    Read until `pg_restore --list` (reading it too) has the whole table of
    contents, so later `--list`/`--use-list` runs work on it without reading
    the object from storage again. The full read (and its SHA-256 check) is
    the restore's.
    """
    head = bytearray()
    async with _Feeder.start(
        [pg_restore, "--list", f"--file={os.devnull}"], "pg_restore", env
    ) as feeder:

        async def sink(data: bytes) -> None:
            head.extend(data)
            await feeder.write(data)
            if feeder.done or feeder.proc.returncode is not None:
                raise _HeadRead
            if len(head) > MAX_HEAD:
                raise BackupdError(
                    f"{entry.key}: no table of contents in the first {MAX_HEAD} bytes: "
                    "not a custom-format archive?"
                )

        with contextlib.suppress(_HeadRead):
            await read_object(store, manifest, entry, identity, sink)
        await feeder.finish()
    return bytes(head)


def split_qualified(pattern: str) -> tuple[str | None, str]:
    """`schema.table` -> (schema, table); `"a.b"."c d"` quoted parts keep dots and case."""
    parts: list[str] = []
    i, n = 0, len(pattern)
    current = ""
    while i < n:
        c = pattern[i]
        if c == '"':
            end = i + 1
            while True:
                end = pattern.find('"', end)
                if end < 0:
                    raise UsageError(f"--table {pattern!r}: unbalanced double quote")
                if pattern[end + 1 : end + 2] == '"':
                    end += 2
                    continue
                break
            current += pattern[i + 1 : end].replace('""', '"')
            i = end + 1
        elif c == "." and len(parts) == 0:
            parts.append(current)
            current = ""
            i += 1
        else:
            current += c
            i += 1
    parts.append(current)
    if any(not p for p in parts):
        raise UsageError(f"--table {pattern!r}: empty name")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


_NAMED_TOC = re.compile(
    r"^\d+; \d+ \d+ (TABLE|VIEW|MATERIALIZED VIEW|SEQUENCE|FOREIGN TABLE|SCHEMA) (.*)$"
)


async def _select(
    pg_restore: str,
    head: bytes,
    tables: tuple[str, ...],
    schemas: tuple[str, ...],
    env: dict[str, str] | None,
) -> list[str]:
    """The archive entries that `--table`/`--schema` select, in archive order.

    Each pattern is matched by pg_restore itself (`--list` with `-n`/`-t`); one
    that matches nothing is an error naming the closest names in the archive.
    """
    full = (await _run_out([pg_restore, "--list"], head, env)).splitlines()
    order = {line: i for i, line in enumerate(full)}
    chosen: set[str] = set()
    missing = []
    selections: list[tuple[str, list[str]]] = []
    for pattern in tables:
        schema, table = split_qualified(pattern)
        args = ([f"--schema={schema}"] if schema else []) + [f"--table={table}"]
        selections.append((f"--table {pattern}", args))
    for schema in schemas:
        selections.append((f"--schema {schema}", [f"--schema={schema}"]))
        # pg_restore -n selects what is in the schema, not the schema itself
        own = re.compile(rf"^\d+; \d+ \d+ SCHEMA - {re.escape(schema)} ")
        chosen.update(line for line in full if own.match(line))
    for what, args in selections:
        out = await _run_out([pg_restore, "--list", *args], head, env)
        found = [line for line in out.splitlines() if line and not line.startswith(";")]
        if not found:
            missing.append(what)
        chosen.update(found)
    if missing:
        names = []
        for line in full:
            m = _NAMED_TOC.match(line)
            if m:
                words = m.group(2).split(" ")
                names.append(words[1] if m.group(1) == "SCHEMA" else ".".join(words[:2]))
        hints = []
        for what in missing:
            word = what.split(" ", 1)[1]
            close = difflib.get_close_matches(word, names, n=5, cutoff=0.5)
            close += [n for n in names if n.endswith("." + word) and n not in close]
            hints.append(f"{what} (close: {', '.join(close[:5])})" if close else what)
        raise UsageError(
            "nothing in the backup matches " + "; ".join(hints) + " — a pattern that matches "
            "nothing would restore nothing"
        )
    return sorted(chosen, key=lambda line: order.get(line, len(order)))


def _refuse_password_in(dsn: str) -> None:
    """The target DSN goes into pg_restore's argv, which every local user can read."""
    try:
        params = dsn_params(dsn)
    except ValueError:
        return  # libpq refuses it with its own message
    if params.get("password"):
        raise UsageError(
            "the --to DSN contains a password, which would be visible in the process list: "
            "remove it and set PGPASSWORD or use a ~/.pgpass file (PGPASSFILE)"
        )


async def download(
    store: Store,
    manifest: Manifest,
    *,
    database: str | None,
    output: str,
    identity: str | None,
    globals_: bool = False,
) -> ReadResult:
    """Write one database's dump, decrypted and decompressed, to `output` (or "-" for stdout).

    A file appears under its name only once complete and checked.
    """
    entry = manifest.globals_object() if globals_ else manifest.object_for(database)
    if output == "-":
        out = os.fdopen(os.dup(1), "wb")

        async def to_stdout(data: bytes) -> None:
            await asyncio.to_thread(out.write, data)

        try:
            return await read_object(store, manifest, entry, identity, to_stdout)
        finally:
            out.close()
    path = Path(output)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:

            async def to_file(data: bytes) -> None:
                await asyncio.to_thread(f.write, data)

            result = await read_object(store, manifest, entry, identity, to_file)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return result
