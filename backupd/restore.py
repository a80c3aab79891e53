"""Reading backups back: restore into PostgreSQL, download to a file, verify.

Every read streams the stored object through decryption and decompression,
counting its size and SHA-256 against the manifest on the way, so a restore
or download that succeeds has also proven the object intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from backupd.codecs import Encoder, algorithm_of, decompressor
from backupd.crypto import AgeDecryptor, DecryptionError, load_identities
from backupd.dsn import dsn_params
from backupd.errors import BackupdError, IntegrityError, UsageError
from backupd.manifest import Manifest, ObjectEntry
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


async def restore(
    store: Store,
    manifest: Manifest,
    *,
    database: str | None,
    target_dsn: str,
    tables: tuple[str, ...] = (),
    clean: bool = False,
    create: bool = False,
    identity: str | None = None,
    pg_bin_dir: str = "",
    env: dict[str, str] | None = None,
) -> ReadResult:
    """Stream one database of a backup into pg_restore (custom) or psql (plain)."""
    _refuse_password_in(target_dsn)
    entry = manifest.object_for(database)
    if entry.format == "plain":
        if tables or clean or create:
            raise UsageError(
                "--table, --clean and --create need a custom-format dump; this one is plain SQL"
            )
        tool = postgres.find_tool("psql", pg_bin_dir, 0)
        argv = [
            str(tool.path),
            "--no-psqlrc",
            "--quiet",
            "--set",
            "ON_ERROR_STOP=1",
            "--no-password",
            f"--dbname={target_dsn}",
        ]
    else:
        tool = postgres.find_tool("pg_restore", pg_bin_dir, 0)
        argv = [str(tool.path), "--no-password", f"--dbname={target_dsn}"]
        argv += [f"--table={t}" for t in tables]
        if clean:
            argv += ["--clean", "--if-exists"]
        if create:
            argv.append("--create")
    log.info("restore_started", backup=manifest.stem, database=entry.database, tool=tool.path.name)
    return await _into_process(store, manifest, entry, identity, argv, tool.path.name, env)


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


async def _into_process(
    store: Store,
    manifest: Manifest,
    entry: ObjectEntry,
    identity: str | None,
    argv: list[str],
    name: str,
    env: dict[str, str] | None = None,
) -> ReadResult:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stderr is not None
    stdin = proc.stdin
    stderr_task = asyncio.ensure_future(proc.stderr.read())

    tool_done = False

    async def sink(data: bytes) -> None:
        nonlocal tool_done
        if tool_done:
            return
        try:
            stdin.write(data)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            # The tool stopped reading: its exit status says why. If it exited 0 the
            # rest is still read, to check its size and SHA-256.
            if await proc.wait() != 0:
                raise
            tool_done = True

    try:
        try:
            result = await read_object(store, manifest, entry, identity, sink)
        except (BrokenPipeError, ConnectionResetError):
            result = None  # the tool exited early; its status and stderr say why
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.close()
            await stdin.wait_closed()
        rc = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await asyncio.shield(proc.wait())
        stderr_task.cancel()
        raise
    stderr = (await stderr_task).decode(errors="replace").strip()
    if rc != 0 or result is None:
        raise BackupdError(f"{name} exited with status {rc}: {stderr[-4000:] or 'no error output'}")
    return result


async def download(
    store: Store, manifest: Manifest, *, database: str | None, output: str, identity: str | None
) -> ReadResult:
    """Write one database's dump, decrypted and decompressed, to `output` (or "-" for stdout).

    A file appears under its name only once complete and checked.
    """
    entry = manifest.object_for(database)
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
