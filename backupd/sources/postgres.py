"""PostgreSQL: asyncpg preflight, pg_dump selection, and the dump subprocesses.

The password never reaches argv nor any file system: the child gets a
password file that lives in memory only (memfd, mode 0600), inherited as an
open descriptor and named by PGPASSFILE=/dev/fd/N. It vanishes with the last
process holding it, even after SIGKILL, and its entries name the DSN's exact
hosts and ports, so libpq never offers the password to another server.
Database names reach every tool and connection as one quoted keyword=value
parameter (`dsn.for_database`), never pasted into a URL. pg_dump runs in its
own process group so a cancelled run can kill it and everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import asyncpg
import structlog

from backupd.config.dsn import dsn_host, dsn_params, for_database, redact_dsn
from backupd.config.model import Job, PostgresSource
from backupd.errors import SourceError, SourceUnavailable

log = structlog.get_logger("backupd.postgres")

CONNECT_TIMEOUT = 30.0
STDERR_LIMIT = 64 * 1024  # bytes of a tool's stderr kept for the error message
PG_LIB_DIR = Path("/usr/lib/postgresql")

# pg_dump stderr that means the server went away, not that the dump is impossible.
_TRANSIENT_STDERR = re.compile(
    r"could not connect|connection to server .* failed|server closed the connection"
    r"|terminating connection due to administrator command|the database system is "
    r"(starting up|shutting down|in recovery mode)|Connection refused|connection timed out"
    r"|could not receive data from server|SSL SYSCALL error|no connection to the server",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    version: str  # e.g. "15.18"
    major: int
    host: str
    databases: tuple[str, ...]  # the databases this job dumps, resolved
    # databases this job would dump but cannot (a name that is not UTF-8): name -> why
    unusable: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot exported for pg_dump (`--snapshot=ID`), held open by `conn`."""

    id: str
    conn: asyncpg.Connection
    where: str

    async def count_rows(self) -> dict[str, int]:
        """Exact row counts of every user table as this snapshot sees them.

        Meant to run while pg_dump dumps the same snapshot: one backend, no
        parallel workers, so it takes a core at most and ends well before the
        dump (which reads the same tables and more).
        """
        try:
            await self.conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        except (OSError, asyncpg.ConnectionDoesNotExistError) as exc:
            raise SourceUnavailable(f"connection to {self.where} lost: {exc}") from None
        return await _count_rows(self.conn, self.where)


@dataclass(frozen=True, slots=True)
class DumpTool:
    path: Path
    version: str
    major: int


def asyncpg_dsn(dsn: str) -> str:
    """`dsn` (URL or keyword=value) as the URL asyncpg parses, every setting a query value.

    asyncpg only reads URLs; a keyword=value DSN, which libpq and `check` accept,
    is converted here rather than refused at run time.
    """
    params = dsn_params(dsn)
    if "hostaddr" in params and "host" not in params:
        params["host"] = params.pop("hostaddr")  # asyncpg has no hostaddr
    return "postgresql://" + (f"?{urlencode(params)}" if params else "")


def _connect_kwargs(dsn: str, password: str | None, database: str | None) -> dict[str, object]:
    kwargs: dict[str, object] = {"dsn": asyncpg_dsn(dsn), "timeout": CONNECT_TIMEOUT}
    if password is not None:
        kwargs["password"] = password
    if database is not None:
        kwargs["database"] = database
    return kwargs


async def connect(
    dsn: str, password: str | None, database: str | None = None
) -> asyncpg.Connection:
    """Connect, translating failures into transient or permanent source errors."""
    where = redact_dsn(dsn) if database is None else f"{redact_dsn(dsn)} (database {database})"
    try:
        return await asyncpg.connect(**_connect_kwargs(dsn, password, database))
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        raise SourceError(f"authentication failed for {where}: {exc}") from None
    except asyncpg.InvalidCatalogNameError:
        raise SourceError(f"database does not exist: {where}") from None
    except (asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
        raise SourceUnavailable(f"cannot connect to {where}: {exc}") from None
    except (OSError, TimeoutError, asyncpg.ConnectionDoesNotExistError) as exc:
        reason = (
            exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or "timeout"
        )
        raise SourceUnavailable(f"cannot connect to {where}: {reason}") from None
    except asyncpg.PostgresError as exc:
        raise SourceError(f"cannot connect to {where}: {exc}") from None


@contextlib.asynccontextmanager
async def settings_connection(dsn: str, password: str | None) -> AsyncIterator[asyncpg.Connection]:
    """A connection for reading the server's settings; closed after, and what fails
    while it is used becomes a source error (a lost connection: transient)."""
    where = redact_dsn(dsn)
    conn = await connect(dsn, password)
    try:
        yield conn
    except (OSError, asyncpg.ConnectionDoesNotExistError) as exc:
        raise SourceUnavailable(f"connection to {where} lost: {exc}") from None
    except asyncpg.PostgresError as exc:
        raise SourceError(f"cannot read the server's settings on {where}: {exc}") from None
    finally:
        await conn.close()


async def preflight(source: PostgresSource, job: Job, password: str | None) -> ServerInfo:
    """Reach the server, read its version, resolve `databases`."""
    conn = await connect(source.dsn, password)
    try:
        version_num = int(await conn.fetchval("SHOW server_version_num"))
        version = str(await conn.fetchval("SHOW server_version")).split()[0]
        unusable: tuple[tuple[str, str], ...] = ()
        if job.databases == ("*",):
            databases, unusable = await _every_database(conn)
        elif job.databases:
            databases = job.databases
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname = ANY($1::text[])", list(databases)
            )
            missing = sorted(set(databases) - {r["datname"] for r in rows})
            if missing:
                raise SourceError(
                    f"database does not exist: {', '.join(missing)} on {redact_dsn(source.dsn)}"
                )
        else:
            databases = (str(await conn.fetchval("SELECT current_database()")),)
    except (OSError, asyncpg.ConnectionDoesNotExistError) as exc:
        raise SourceUnavailable(f"connection to {redact_dsn(source.dsn)} lost: {exc}") from None
    finally:
        await conn.close()
    return ServerInfo(
        version=version,
        major=version_num // 10000,
        host=dsn_host(source.dsn) or "localhost",
        databases=databases,
        unusable=unusable,
    )


async def _every_database(
    conn: asyncpg.Connection,
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """`databases = ["*"]`: every database that accepts connections, template1 and
    user templates included (only template0, which refuses connections, is left out).

    Names are read as bytes: a SQL_ASCII cluster can hold a name that is not
    UTF-8, which is reported as unusable instead of failing the whole listing.
    """
    rows = await conn.fetch(
        "SELECT convert_to(datname::text, 'UTF8') AS raw, datallowconn, datistemplate "
        "FROM pg_database ORDER BY datname"
    )
    databases: list[str] = []
    unusable: list[tuple[str, str]] = []
    skipped: list[str] = []
    for row in rows:
        raw = bytes(row["raw"])
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            shown = raw.decode(errors="backslashreplace")
            unusable.append((shown, "the database name is not valid UTF-8"))
            continue
        if not row["datallowconn"]:
            skipped.append(name)
        else:
            databases.append(name)
    if skipped:
        log.info(
            "databases_skipped",
            databases=skipped,
            reason="datallowconn is false: the database accepts no connections, so no dump",
        )
    return tuple(databases), tuple(unusable)


async def table_row_counts(dsn: str, password: str | None, database: str) -> dict[str, int]:
    """Exact row counts of every user table ("schema.table" -> rows), e.g. of a restored copy."""
    conn = await connect(dsn, password, database)
    try:
        return await _count_rows(conn, f"{redact_dsn(dsn)} (database {database})")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def exported_snapshot(
    dsn: str, password: str | None, database: str
) -> AsyncIterator[Snapshot]:
    """Open a REPEATABLE READ transaction on `database` and export its snapshot.

    The transaction stays open until the block ends, so a pg_dump started inside
    with `--snapshot=ID` dumps exactly the rows `Snapshot.count_rows` counts: the
    counts recorded in the manifest are those of the dump, not of a moment before it.
    """
    where = f"{redact_dsn(dsn)} (database {database})"
    conn = await connect(dsn, password, database)
    try:
        try:
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snapshot_id = str(await conn.fetchval("SELECT pg_export_snapshot()"))
        except (OSError, asyncpg.ConnectionDoesNotExistError) as exc:
            raise SourceUnavailable(f"connection to {where} lost: {exc}") from None
        except asyncpg.PostgresError as exc:
            raise SourceError(f"cannot export a snapshot on {where}: {exc}") from None
        yield Snapshot(snapshot_id, conn, where)
    finally:
        await conn.close()


async def _count_rows(conn: asyncpg.Connection, where: str) -> dict[str, int]:
    try:
        rows = await conn.fetch(
            "SELECT format('%I.%I', n.nspname, c.relname) AS name FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%' AND NOT c.relispartition ORDER BY 1"
        )
        counts = {}
        for row in rows:
            # The name comes from format('%I.%I'): quoted by the server itself.
            query = f"SELECT count(*) FROM {row['name']}"  # noqa: S608
            counts[row["name"]] = int(await conn.fetchval(query))
        return counts
    except (OSError, asyncpg.ConnectionDoesNotExistError) as exc:
        raise SourceUnavailable(f"connection to {where} lost: {exc}") from None
    except asyncpg.PostgresError as exc:
        raise SourceError(f"cannot count rows on {where}: {exc}") from None


_versions: dict[tuple[Path, int, int, int], tuple[str, int] | None] = {}


def _tool_version(path: Path) -> tuple[str, int] | None:
    """`path --version`, parsed; remembered per binary until the file changes (an upgrade
    replaces it), so a run does not start a subprocess per tool on every attempt."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _versions:
        _versions[key] = _run_version(path)
    return _versions[key]


def _run_version(path: Path) -> tuple[str, int] | None:
    import subprocess

    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)(?:\.(\d+))?", out)
    if not match:
        return None
    return match.group(0), int(match.group(1))


def candidate_bin_dirs(pg_bin_dir: str) -> list[Path]:
    if pg_bin_dir:
        return [Path(pg_bin_dir)]
    dirs = sorted(
        (p / "bin" for p in PG_LIB_DIR.glob("*") if p.name.isdigit()),
        key=lambda p: int(p.parent.name),
        reverse=True,
    )
    on_path = shutil.which("pg_dump")
    if on_path:
        dirs.append(Path(on_path).parent)
    return dirs


def find_tool(name: str, pg_bin_dir: str, server_major: int) -> DumpTool:
    """The newest `name` (pg_dump, pg_dumpall) whose major version is >= the server's."""
    seen = []
    for bindir in candidate_bin_dirs(pg_bin_dir):
        path = bindir / name
        if not os.access(path, os.X_OK):
            continue
        found = _tool_version(path)
        if found is None:
            continue
        seen.append(f"{path} ({found[0]})")
        if found[1] >= server_major:
            return DumpTool(path, found[0], found[1])
    where = f"pg_bin_dir {pg_bin_dir}" if pg_bin_dir else f"{PG_LIB_DIR}/*/bin and PATH"
    have = ", ".join(seen) if seen else "none found"
    raise SourceError(
        f"no {name} can dump a PostgreSQL {server_major} server (looked in {where}: {have}); "
        f"install postgresql-client-{server_major} or newer, or set pg_bin_dir"
    )


# CVE-2024-7348: a race during pg_dump lets a role that can create objects run SQL
# as the role running pg_dump (often a superuser). Fixed in the August 2024 minor
# releases below; majors 17 and later never had it, majors before 12 never got the fix.
CVE_2024_7348_FIXED = {12: 20, 13: 16, 14: 13, 15: 8, 16: 4}
_FIRST_SAFE_MAJOR = 17


def cve_2024_7348_fix(version: str) -> str | None:
    """None when pg_dump `version` ("15.2", "16.4") has the CVE-2024-7348 fix, else what does.

    An unparseable version counts as outdated: the warning is cheap, a missed one is not.
    """
    match = re.match(r"(\d+)(?:\.(\d+))?", version)
    if match is None:
        return "a release with the fix (12.20, 13.16, 14.13, 15.8, 16.4, or 17 and later)"
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    if major >= _FIRST_SAFE_MAJOR:
        return None
    fixed = CVE_2024_7348_FIXED.get(major)
    if fixed is None:
        return "a supported major release (12.20, 13.16, 14.13, 15.8, 16.4, or 17 and later)"
    return None if minor >= fixed else f"{major}.{fixed}"


def warn_if_outdated(tool: DumpTool) -> None:
    """Log `pg_dump_outdated` when `tool` predates the CVE-2024-7348 fix for its major."""
    fixed_in = cve_2024_7348_fix(tool.version)
    if fixed_in is not None:
        log.warning(
            "pg_dump_outdated",
            path=str(tool.path),
            version=tool.version,
            fixed_in=fixed_in,
            cve="CVE-2024-7348",
            note="upgrade the PostgreSQL client packages; until then do not dump as a superuser",
        )


def dump_argv(tool: DumpTool, job: Job, dsn: str, database: str) -> list[str]:
    """pg_dump's argument list: never a shell, never a password."""
    argv = [str(tool.path), "--no-password", f"--dbname={for_database(dsn, database)}"]
    if job.format == "custom":
        argv += ["--format=custom", "--compress=0"]
    else:
        argv += ["--format=plain"]
    if job.kind != "data-only" and not has_line_break(database):
        # The database's own properties (comment, settings, grants, owner, encoding,
        # locale) too; `restore --create` maps them to the typed name. pg_dump refuses
        # --create for a name with a line break (CVE-2025-8715): such a database is
        # dumped without its properties rather than not at all (run_backup warns).
        argv.append("--create")
    if job.kind == "schema-only":
        argv.append("--schema-only")
    elif job.kind == "data-only":
        argv.append("--data-only")
    argv += [f"--table={t}" for t in job.tables]
    argv += [f"--exclude-table={t}" for t in job.exclude_tables]
    argv += [f"--exclude-table-data={t}" for t in job.exclude_table_data]
    return argv


def has_line_break(name: str) -> bool:
    return "\n" in name or "\r" in name


def dumpall_globals_argv(tool: DumpTool, dsn: str) -> list[str]:
    return [str(tool.path), "--no-password", "--globals-only", f"--dbname={dsn}"]


def with_database(dsn: str, database: str) -> str:
    """The DSN pointing at `database`: a keyword=value string with the name quoted
    (see `dsn.for_database`); never a URL with the name pasted in."""
    return for_database(dsn, database)


def passfile_lines(dsn: str, password: str) -> str:
    """.pgpass entries giving `password` to the DSN's own hosts and ports only.

    libpq matches the host as given (a socket directory too; "localhost" when
    none is given) and the port (5432 by default); PGHOST/PGPORT stand in when
    the DSN names none, as they do for libpq.
    """
    params = dsn_params(dsn)
    hosts = (params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "").split(
        ","
    )
    ports = (params.get("port") or os.environ.get("PGPORT") or "").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    escaped = _pgpass_escape(password)
    lines = []
    for host, port in zip(hosts, ports, strict=False):
        names = {host or "localhost"}
        if not host or host in ("/run/postgresql", "/var/run/postgresql", "/tmp"):
            names |= {"localhost"}  # libpq's default socket directory matches localhost
        for name in sorted(names):
            lines.append(f"{_pgpass_escape(name)}:{_pgpass_escape(port or '5432')}:*:*:{escaped}")
    return "".join(f"{line}\n" for line in lines)


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


@contextlib.contextmanager
def passfile_env(password: str | None, dsn: str) -> Iterator[dict[str, str]]:
    """The child's environment; with a password, PGPASSFILE names an in-memory file.

    The file is a memfd (never on any file system, gone with the last process
    holding it, so nothing survives a SIGKILL), mode 0600 as libpq demands,
    passed to the child as an inherited descriptor (`inherited_fds`).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGPASSFILE")}
    env.setdefault("PGAPPNAME", "backupd")
    env.setdefault("PGCONNECT_TIMEOUT", str(int(CONNECT_TIMEOUT)))
    if password is None:
        yield env
        return
    fd = os.memfd_create("backupd-pgpass", os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        data = passfile_lines(dsn, password).encode()
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        env["PGPASSFILE"] = f"/dev/fd/{fd}"
        yield env
    finally:
        os.close(fd)


def inherited_fds(env: dict[str, str] | None) -> tuple[int, ...]:
    """The descriptors a child started with `env` must inherit (its in-memory passfile)."""
    path = (env or {}).get("PGPASSFILE", "")
    if path.startswith("/dev/fd/") and path[len("/dev/fd/") :].isdigit():
        return (int(path[len("/dev/fd/") :]),)
    return ()


class DumpProcess:
    """One running dump tool writing to a pipe; stderr kept for the error message."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self._stderr = bytearray()
        assert proc.stderr is not None
        self._stderr_task = asyncio.ensure_future(self._drain(proc.stderr))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while block := await stream.read(65536):
            self._stderr += block
            if len(self._stderr) > STDERR_LIMIT:
                del self._stderr[: len(self._stderr) - STDERR_LIMIT]

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace").strip()

    async def wait(self) -> int:
        rc = await self.proc.wait()
        await self._stderr_task
        return rc

    def kill(self) -> None:
        """Kill the whole process group (pg_dump and anything it started)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def kill_and_reap(self) -> None:
        self.kill()
        with contextlib.suppress(Exception):
            await asyncio.shield(self.wait())


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it if backupd dies (even by kill -9).

    A dump waiting on a lock writes nothing, so it would never notice its
    reader is gone; outside systemd (whose cgroup kill covers this) it would
    outlive the daemon. Only an async-signal-safe prctl runs here.
    """
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@contextlib.asynccontextmanager
async def spawn(
    argv: list[str], env: dict[str, str], stdout_fd: int, name: str
) -> AsyncIterator[DumpProcess]:
    """Start a dump tool writing to `stdout_fd`; killed and reaped if the block fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout_fd,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            pass_fds=inherited_fds(env),
        )
    except OSError as exc:
        raise SourceError(f"cannot start {argv[0]}: {exc.strerror}") from None
    finally:
        os.close(stdout_fd)  # the child holds the write end; EOF comes when it exits
    dump = DumpProcess(proc, name)
    try:
        yield dump
    except BaseException:
        await dump.kill_and_reap()
        raise


def exit_error(dump: DumpProcess, rc: int) -> str:
    what = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
    detail = dump.stderr or "no error output"
    return f"{dump.name} {what}: {detail}"


def is_transient_failure(stderr: str) -> bool:
    return bool(_TRANSIENT_STDERR.search(stderr))


__all__ = [
    "DumpProcess",
    "DumpTool",
    "ServerInfo",
    "Snapshot",
    "cve_2024_7348_fix",
    "dump_argv",
    "dumpall_globals_argv",
    "exit_error",
    "exported_snapshot",
    "find_tool",
    "inherited_fds",
    "is_transient_failure",
    "passfile_env",
    "preflight",
    "spawn",
    "table_row_counts",
    "warn_if_outdated",
]
