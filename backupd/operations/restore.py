"""`backupd restore`: one database (or the globals) of a backup into PostgreSQL, all or nothing.

The object is read back once (`readback.read_back`: size, SHA-256, decrypt,
decompress) into pg_restore for a custom archive or psql for a plain dump,
so a restore that succeeds has also proven the object intact. A database
restore runs in one transaction; with `create`, the database named in the
target DSN is created first and dropped again if the restore fails. The
table of contents handling is `toc.py`, the globals `globals_restore.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from backupd.catalog.manifest import Manifest, ObjectEntry
from backupd.config.dsn import dsn_params
from backupd.errors import (
    DatabaseExists,
    PasswordInTarget,
    PlainDumpSelection,
    ToolFailed,
    UsageError,
)
from backupd.operations.globals_restore import restore_globals
from backupd.operations.pgclient import Feeder, psql_argv, run, run_bytes, run_out, tool_path
from backupd.operations.plainsql import PlainFilter, quote_ident
from backupd.operations.readback import ReadResult, read_back
from backupd.operations.toc import archive_head, database_entry_ids, select_entries
from backupd.sources import postgres
from backupd.storage.base import Store

log = structlog.get_logger("backupd.restore")


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
            raise UsageError(
                "selecting tables or schemas, cleaning and creating the database do not "
                "apply to the globals"
            )
        read, lines, warnings = await restore_globals(
            store,
            manifest,
            entry,
            identity,
            psql=job.tool("psql"),
            target=target_dsn,
            env=env,
            say=job.say,
        )
        return RestoreOutcome(read, lines, warnings)
    if create:
        job.create_as = dsn_params(target_dsn).get("dbname") or None
        if job.create_as is None:
            raise UsageError(
                "creating the database needs its name in the target DSN "
                "(postgresql://HOST/NEWNAME or 'host=HOST dbname=NEWNAME')"
            )
    if entry.format == "plain":
        if tables or schemas or clean:
            raise PlainDumpSelection()
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
        return tool_path(name, self.pg_bin_dir, self.manifest)

    def psql(self, dsn: str, *args: str) -> list[str]:
        return psql_argv(self.tool("psql"), dsn, *args)

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
            head = await archive_head(
                self.store, self.manifest, self.entry, self.identity, pg_restore, self.env
            )
        argv = [pg_restore, "--no-password", "--single-transaction", "--exit-on-error"]
        lines = []
        with tempfile.TemporaryDirectory(prefix="backupd-restore-") as tmp:
            if tables or schemas:
                selected = await select_entries(pg_restore, head, tables, schemas, self.env)
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
                async with Feeder.start(argv, self.env) as feeder:
                    read = await read_back(
                        self.store, self.manifest, self.entry, self.identity, feeder.write
                    )
                    warnings = await feeder.finish()
                if db_sql:
                    psql = self.psql(self.target, "--single-transaction")
                    warnings += await run(psql, db_sql, self.env)
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
        ids = await database_entry_ids(pg_restore, head, self.env)
        if not ids:
            return [], b""
        listing = tmp / "database.list"
        listing.write_text("".join(f"{i};\n" for i in ids))
        sql = await run_bytes(
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
                count = await run_out(
                    self.psql(maintenance, "--tuples-only", "--no-align", "--set", f"name={name}"),
                    query,
                    self.env,
                )
                break
            except ToolFailed as exc:
                if maintenance_db != "postgres" or "does not exist" not in str(exc):
                    raise
        if count.strip() != "0":
            raise DatabaseExists(name)
        default = f"CREATE DATABASE {quote_ident(name)} TEMPLATE template0;\n".encode()
        await run(self.psql(maintenance), b"".join(create_sql) or default, self.env)
        lines.append(f"created database {name!r}")
        try:
            yield
        except BaseException:
            drop = f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE);\n".encode()
            try:
                await asyncio.shield(run(self.psql(maintenance), drop, self.env))
                log.info("restore_new_database_dropped", database=name)
            except ToolFailed as exc:
                log.error("restore_new_database_not_dropped", database=name, error=str(exc))
            raise

    async def plain(self) -> RestoreOutcome:
        filt = PlainFilter(self.entry.database, self.create_as)
        argv = self.psql(self.target, "--single-transaction")
        self._say_atomic()
        lines: list[str] = []
        buffered: list[bytes] = []
        async with contextlib.AsyncExitStack() as stack:
            feeder: Feeder | None = None

            async def start() -> Feeder:
                await stack.enter_async_context(self._created(filt.create_statements, lines))
                started = await stack.enter_async_context(Feeder.start(argv, self.env))
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

            read = await read_back(self.store, self.manifest, self.entry, self.identity, sink)
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


def _refuse_password_in(dsn: str) -> None:
    """The target DSN goes into pg_restore's argv, which every local user can read."""
    try:
        params = dsn_params(dsn)
    except ValueError:
        return  # libpq refuses it with its own message
    if params.get("password"):
        raise PasswordInTarget()
