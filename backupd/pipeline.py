"""Dump bytes -> compress -> encrypt -> hash -> every storage target at once.

One worker thread per data object reads the dump tool's stdout pipe with
large blocking reads and runs the encoders and SHA-256 (all of which release
the GIL), handing finished chunks to the event loop through a small bounded
queue. The event loop writes each chunk to every target and only then takes
the next one, so memory is bounded by the queue depth times the chunk size
(plus each backend's own bounded buffers) and the slowest target slows the
dump through the pipe instead of piling up bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backupd.codecs import Encoder
from backupd.storage.base import Upload

CHUNK_SIZE = 1 << 20  # bytes read from the pipe at once
QUEUE_DEPTH = 4  # encoded chunks waiting for the targets
PIPE_SIZE = 1 << 20  # kernel pipe buffer asked for (F_SETPIPE_SZ)
_F_SETPIPE_SZ = 1031


@dataclass(frozen=True, slots=True)
class StreamResult:
    raw_bytes: int  # bytes the dump tool wrote
    size_bytes: int  # bytes stored (after compression and encryption)
    sha256: str  # of the stored bytes


def make_pipe() -> tuple[int, int]:
    """A pipe for a dump tool's stdout, with a larger buffer where the kernel allows."""
    r, w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


class _Stop(Exception):
    """Raised in the worker thread when the consumer has given up."""


async def stream_fd(
    fd: int,
    encoders: Sequence[Encoder],
    uploads: Sequence[Upload],
    on_bytes: Callable[[int], None] | None = None,
) -> StreamResult:
    """Read `fd` to EOF through `encoders` into every upload; returns counts and digest.

    Does not complete or abort the uploads: the caller decides once the dump
    tool's exit status is known. Closes `fd`. On failure or cancellation the
    worker stops reading, so a writer blocked on the pipe gets EPIPE.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_DEPTH)
    stop = threading.Event()
    digest = hashlib.sha256()
    counts = {"raw": 0, "stored": 0}

    def hand_over(item: bytes | None) -> None:
        if stop.is_set():
            raise _Stop
        fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        while True:
            try:
                fut.result(timeout=0.5)
                return
            except TimeoutError:
                if stop.is_set():
                    fut.cancel()
                    raise _Stop from None

    def encode(data: bytes, final: bool) -> None:
        for enc in encoders:
            data = enc.update(data) + (enc.finish() if final else b"")
        if data:
            digest.update(data)
            counts["stored"] += len(data)
            hand_over(data)

    def work() -> None:
        try:
            while not stop.is_set():
                block = os.read(fd, CHUNK_SIZE)
                if not block:
                    break
                counts["raw"] += len(block)
                encode(block, final=False)
            else:
                return
            encode(b"", final=True)
            hand_over(None)
        finally:
            os.close(fd)

    worker: asyncio.Future[None] = loop.create_future()

    def run_worker() -> None:
        try:
            work()
        except BaseException as exc:  # reported to the event loop, never lost
            loop.call_soon_threadsafe(_settle, worker, exc)
        else:
            loop.call_soon_threadsafe(_settle, worker, None)

    threading.Thread(target=run_worker, name="backupd-stream", daemon=True).start()
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            waiters: set[asyncio.Future[Any]] = {getter, worker}
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                await worker  # raises the worker's error; a clean exit always queues None first
                continue
            chunk = getter.result()
            if chunk is None:
                break
            await asyncio.gather(*(u.write(chunk) for u in uploads))
            if on_bytes is not None:
                on_bytes(len(chunk))
        await worker
    except BaseException:
        # The worker may still be blocked reading the pipe: it ends (and closes
        # the fd) once the caller kills the dump tool. Never wait for it here.
        stop.set()
        while not queue.empty():
            queue.get_nowait()
        raise
    return StreamResult(counts["raw"], counts["stored"], digest.hexdigest())


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None or isinstance(exc, _Stop):
        fut.set_result(None)
    else:
        fut.set_exception(exc)
    fut.exception()  # mark retrieved: the consumer may already be gone


async def abort_all(uploads: Mapping[str, Upload] | Sequence[Upload]) -> None:
    """Abort every upload; aborts never raise, and run even while being cancelled."""
    items = list(uploads.values()) if isinstance(uploads, Mapping) else list(uploads)
    await asyncio.shield(asyncio.gather(*(u.abort() for u in items), return_exceptions=True))
