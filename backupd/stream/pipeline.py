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

from backupd.storage.base import Upload
from backupd.stream.codecs import Encoder

CHUNK_SIZE = 256 << 10  # bytes read from the pipe at once (1 MiB held ~5 MB more at the peak)
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


@dataclass(frozen=True, slots=True)
class _Failed:
    """The worker's exception, carried to the event loop through the queue."""

    error: BaseException


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
    # `credits` bounds the queue: the worker takes one per chunk, the loop gives
    # it back once every target has the chunk. So the worker waits only while
    # QUEUE_DEPTH chunks are outstanding, never for a round trip through the loop
    # (which, on a busy machine, costs a scheduler time slice per chunk).
    queue: asyncio.Queue[bytes | _Failed | None] = asyncio.Queue()
    credits = threading.Semaphore(QUEUE_DEPTH)
    stop = threading.Event()
    digest = hashlib.sha256()
    counts = {"raw": 0, "stored": 0}

    def put(item: bytes | _Failed | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def hand_over(data: bytes) -> None:
        while not credits.acquire(timeout=0.5):
            if stop.is_set():
                raise _Stop
        if stop.is_set():
            raise _Stop
        put(data)

    def work() -> bool:
        """Read to EOF; False if the consumer gave up first."""
        pending: list[bytes] = []
        size = 0
        try:
            while not stop.is_set():
                data = os.read(fd, CHUNK_SIZE)
                final = not data
                counts["raw"] += len(data)
                for enc in encoders:
                    data = enc.update(data) + (enc.finish() if final else b"")
                if data:
                    digest.update(data)
                    counts["stored"] += len(data)
                    pending.append(data)
                    size += len(data)
                # Compressed output comes in uneven pieces: hand over about a chunk at a time.
                if pending and (final or size >= CHUNK_SIZE):
                    hand_over(pending[0] if len(pending) == 1 else b"".join(pending))
                    pending, size = [], 0
                if final:
                    return True
            return False
        finally:
            os.close(fd)

    def run_worker() -> None:
        try:
            finished = work()
        except _Stop:
            return
        except BaseException as exc:  # reported to the event loop, never lost
            put(_Failed(exc))
        else:
            if finished:
                put(None)  # after os.close(fd): the caller gets the fd closed

    threading.Thread(target=run_worker, name="backupd-stream", daemon=True).start()
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, _Failed):
                raise item.error
            if len(uploads) == 1:
                await uploads[0].write(item)
            else:
                await asyncio.gather(*(u.write(item) for u in uploads))
            credits.release()
            if on_bytes is not None:
                on_bytes(len(item))
    except BaseException:
        # The worker may still be blocked reading the pipe: it ends (and closes
        # the fd) once the caller kills the dump tool. Never wait for it here.
        stop.set()
        raise
    return StreamResult(counts["raw"], counts["stored"], digest.hexdigest())


async def abort_all(uploads: Mapping[str, Upload] | Sequence[Upload]) -> None:
    """Abort every upload at once; aborts never raise, and each takes at most
    `CLEANUP_DEADLINE` (an abort goes on in the background if this is cancelled)."""
    items = list(uploads.values()) if isinstance(uploads, Mapping) else list(uploads)
    await asyncio.gather(*(u.abort() for u in items), return_exceptions=True)
