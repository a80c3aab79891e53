"""Publishing a backup, shared by logical (`backup.py`) and physical (`physical.py`) runs.

A run streams each tool's output into one new data object on every store
(`stream_to_stores`), notes each object as it completes, and writes the
manifest to every store last (`publish`): only then is it a backup. Any
failure, cancellation included, aborts the open uploads and deletes the data
objects the attempt already completed (`discard`), within one
`CLEANUP_DEADLINE` for the whole cleanup (`Cleanup`): what it could not remove
by then is logged and left to the sweeper.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from backupd.catalog.listing import write_manifest
from backupd.catalog.manifest import Manifest, folder_for, new_backup_id, now_utc, stem_for
from backupd.config.model import Job, PostgresSource
from backupd.errors import BackupdError, DumpFailed
from backupd.sources import postgres
from backupd.storage.base import CLEANUP_DEADLINE, Store, Upload
from backupd.stream.age import AgeEncryptor
from backupd.stream.codecs import Encoder, compressor
from backupd.stream.pipeline import StreamResult, abort_all, make_pipe, stream_fd

log = structlog.get_logger("backupd.backup")

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class NewBackup:
    """The backup one attempt writes: when it started, its id, its folder and stem."""

    started: datetime
    t0: float  # time.monotonic() at the start, for the duration
    id: str
    folder: str
    stem: str

    @classmethod
    def start(cls, job: str) -> NewBackup:
        started = now_utc()
        t0 = time.monotonic()
        backup_id = new_backup_id()
        return cls(
            started, t0, backup_id, folder_for(job, started), stem_for(job, started, backup_id)
        )

    def duration(self) -> float:
        return round(time.monotonic() - self.t0, 3)


def encryption_field(job: Job) -> dict[str, Any] | None:
    """The manifest's `encryption`: the age recipients a backup of `job` is encrypted to."""
    if not job.encryption:
        return None
    return {"type": "age", "recipients": list(job.encryption.recipients)}


def source_field(source: PostgresSource, host: str, server_version: str) -> dict[str, Any]:
    """The manifest's `source`: the server a backup was taken from."""
    return {"type": "postgres", "name": source.name, "host": host, "server_version": server_version}


def job_encoders(job: Job) -> list[Encoder]:
    """What a job's data goes through before storage: its compression, then age if set."""
    encoders: list[Encoder] = [compressor(job.compression)]
    if job.encryption is not None:
        encoders.append(AgeEncryptor(job.encryption.recipients))
    return encoders


def emit(progress: Progress | None, event: dict[str, Any]) -> None:
    if progress is not None:
        progress(event)


class Cleanup:
    """The cleanup of one failed attempt: every step of it within one `CLEANUP_DEADLINE`,
    counted from the first step.

    Each step runs in its own task, so a caller cancelled once more (a second
    `cancel`, a second SIGTERM) stops waiting at once, and the deadline cancels
    the step whoever still waits for it. Failures are logged, never raised.
    """

    def __init__(self) -> None:
        self._until: float | None = None

    async def run(self, what: str, step: Awaitable[Any]) -> None:
        loop = asyncio.get_running_loop()
        if self._until is None:
            self._until = loop.time() + CLEANUP_DEADLINE
        task = asyncio.ensure_future(step)
        timer = loop.call_at(self._until, task.cancel)

        def done(task: asyncio.Future[Any]) -> None:
            timer.cancel()
            if task.cancelled():
                log.warning(
                    "cleanup_abandoned",
                    what=what,
                    deadline_seconds=CLEANUP_DEADLINE,
                    note="the store did not answer in time; the sweeper removes what is "
                    "left after abandoned_upload_grace",
                )
            elif (exc := task.exception()) is not None:
                log.warning("cleanup_failed", what=what, error=str(exc))

        task.add_done_callback(done)
        await asyncio.wait([task])


async def stream_to_stores(
    argv: list[str],
    env: dict[str, str],
    tool: str,
    encoders: list[Encoder],
    stores: Mapping[str, Store],
    key: str,
    completed: dict[str, list[str]],
    cleanup: Cleanup,
    on_bytes: Callable[[str, int], None] | None,
) -> tuple[StreamResult, str]:
    """Run `tool` and stream its stdout through `encoders` into one new object `key` on
    every store; completes them only once the tool exited 0 and the stream ended.

    Each completed object is noted in `completed[store name]` at once (if another store
    fails then, it must be deleted: `abort()` no longer reaches it). On any failure the
    uploads are aborted within `cleanup` and the error raised. Returns the stream's
    result and the tool's stderr.
    """
    uploads: dict[str, Upload] = {}

    def counted(n: int) -> None:
        if on_bytes is not None:
            for name in stores:
                on_bytes(name, n)

    try:
        for name, store in stores.items():
            uploads[name] = await store.open_upload(key)
        read_fd, write_fd = make_pipe()
        try:
            # spawn() always closes write_fd; stream_fd() owns read_fd once called.
            async with postgres.spawn(argv, env, write_fd, tool) as proc:
                fd, read_fd = read_fd, -1
                result = await stream_fd(fd, encoders, list(uploads.values()), counted)
                rc = await proc.wait()
                if rc != 0:
                    err = DumpFailed(postgres.exit_error(proc, rc))
                    err.transient = postgres.is_transient_failure(proc.stderr)
                    raise err
                stderr = proc.stderr
        finally:
            if read_fd >= 0:
                os.close(read_fd)

        async def complete(name: str, upload: Upload) -> None:
            size = await upload.complete()
            # Noted at once, not after every target: if another target fails now,
            # this finished object must be deleted (abort() no longer reaches it).
            completed[name].append(key)
            if size != result.size_bytes:
                raise BackupdError(
                    f"storage {name} stored {size} bytes of {key}, expected {result.size_bytes}"
                )

        await asyncio.gather(*(complete(name, upload) for name, upload in uploads.items()))
        return result, stderr
    except BaseException:
        await cleanup.run(f"abort the uploads of {key}", abort_all(uploads))
        raise


async def publish(
    stores: Mapping[str, Store],
    manifest: Manifest,
    cleanup: Cleanup,
    before_publish: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Write the manifest to every store; if one fails, take back the others.

    `before_publish` (HA: confirm the run's claim) runs first; if it raises, nothing
    is written."""
    if before_publish is not None:
        await before_publish()
    written: list[Store] = []
    try:
        for store in stores.values():
            await write_manifest(store, manifest)
            written.append(store)
    except BaseException:
        if written:
            await cleanup.run(
                f"take back the manifest {manifest.manifest_key}",
                asyncio.gather(
                    *(s.delete([manifest.manifest_key]) for s in written), return_exceptions=True
                ),
            )
        raise


async def discard(
    stores: Mapping[str, Store],
    completed: dict[str, list[str]],
    noted: dict[str, list[str]] | None = None,
) -> None:
    """Delete data objects of a failed attempt or database (no manifest names them, so
    they are not backups); the keys are also struck from `noted`, the attempt's record."""

    async def one(name: str) -> None:
        keys = completed.get(name) or []
        if noted is not None:
            noted[name] = [k for k in noted.get(name, []) if k not in keys]
        if not keys:
            return
        failed = await stores[name].delete(keys)
        if failed:
            log.warning(
                "discard_incomplete",
                storage=name,
                keys=failed,
                note="the sweeper removes them after abandoned_upload_grace",
            )

    await asyncio.gather(*(one(name) for name in stores), return_exceptions=True)
