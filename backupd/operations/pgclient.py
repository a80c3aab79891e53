"""Running the PostgreSQL client tools a read-back feeds: pg_restore and psql.

A tool reads the decoded dump on its stdin (`Feeder`); its stderr is kept
whole (bounded) and a failure is reported as its first errors and their
count, not its last bytes, where the first error is lost. Every child runs
in its own session and is killed with its group if the caller fails or is
cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

from backupd.catalog.manifest import Manifest
from backupd.errors import ToolFailed
from backupd.sources import postgres

MAX_ERRORS_SHOWN = 5
STDERR_KEPT = 4 * 1024 * 1024  # bytes of a tool's stderr kept (the first errors matter most)
_ERROR_LINE = re.compile(r"\b(?:ERROR|FATAL|PANIC|error):")
_WARNING_LINE = re.compile(r"\b(?:WARNING|warning):")


def tool_path(name: str, pg_bin_dir: str, manifest: Manifest) -> str:
    """A client tool at least as new as the pg_dump that wrote the backup."""
    match = re.match(r"\d+", str(manifest.tool.get("version", "")))
    return str(postgres.find_tool(name, pg_bin_dir, int(match.group(0)) if match else 0).path)


def error_summary(name: str, rc: int, stderr: str) -> str:
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


@contextlib.asynccontextmanager
async def _spawned(
    argv: list[str], env: dict[str, str] | None, stdout: int
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child reading stdin, killed with its process group if the block fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=stdout,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=env,
            pass_fds=postgres.inherited_fds(env),
        )
    except OSError as exc:
        raise ToolFailed(f"cannot start {argv[0]}: {exc.strerror}") from None
    try:
        yield proc
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await asyncio.shield(proc.wait())
        raise


class Feeder:
    """A client tool reading a dump on its stdin; its stderr kept whole (bounded)."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.done = False
        assert proc.stderr is not None
        self._stderr = asyncio.ensure_future(_read_capped(proc.stderr))

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, argv: list[str], env: dict[str, str] | None) -> AsyncIterator[Feeder]:
        async with _spawned(argv, env, asyncio.subprocess.DEVNULL) as proc:
            feeder = cls(proc, Path(argv[0]).name)
            try:
                yield feeder
            except BaseException:
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
                raise ToolFailed(error_summary(self.name, rc, await self._stderr)) from None
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
            raise ToolFailed(error_summary(self.name, rc, stderr))
        return _warnings(stderr)


async def _read_capped(stream: asyncio.StreamReader, limit: int = STDERR_KEPT) -> str:
    """All of a stream, its first `limit` bytes kept (the first errors matter most)."""
    kept = bytearray()
    while block := await stream.read(65536):
        if len(kept) < limit:
            kept += block[: limit - len(kept)]
    return kept.decode(errors="replace")


async def run(argv: list[str], stdin: bytes, env: dict[str, str] | None) -> list[str]:
    """Run a tool on `stdin`; its warnings, or raise with its first errors."""
    async with Feeder.start(argv, env) as feeder:
        await feeder.write(stdin)
        return await feeder.finish()


async def run_out(argv: list[str], stdin: bytes, env: dict[str, str] | None) -> str:
    """Run a tool on `stdin` and return its standard output as text; raise if it fails."""
    return (await run_bytes(argv, stdin, env)).decode(errors="replace")


async def run_bytes(argv: list[str], stdin: bytes, env: dict[str, str] | None) -> bytes:
    """Run a tool on `stdin` and return its standard output; raise if it fails."""
    async with _spawned(argv, env, asyncio.subprocess.PIPE) as proc:
        out, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        raise ToolFailed(
            error_summary(Path(argv[0]).name, proc.returncode or 0, err.decode(errors="replace"))
        )
    return out


def psql_argv(psql: str, dsn: str, *args: str) -> list[str]:
    """psql reading SQL on stdin into `dsn`, stopping at the first error."""
    return [
        psql,
        "--no-psqlrc",
        "--quiet",
        "--no-password",
        "--set",
        "ON_ERROR_STOP=1",
        *args,
        "--file=-",
        f"--dbname={dsn}",
    ]
