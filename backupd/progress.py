"""The live progress line of `trigger --wait`, `backup`, `restore`, `download` and `verify`.

Drawn on stderr only when stderr is a terminal (and `--quiet` is not given):
bytes, rate and elapsed time, plus percentage and ETA when the total is known.
Log lines and messages written meanwhile go through `TerminalStream`, which
clears the line first, so the two never mix.

The read-back commands get their bytes from `CountingStore`, a Store wrapper
that reports every chunk `open_read` yields to a `progress(done_bytes,
total_bytes | None)` callback: the read functions themselves are unchanged.
"""

from __future__ import annotations

import builtins
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import IO, Any

from backupd.observe.overview import human_duration, human_rate, human_size
from backupd.storage.base import IncompleteUpload, ObjectInfo, Store, Upload, Versioned

Progress = Callable[[int, int | None], None]
"""progress(done_bytes, total_bytes or None)."""

REDRAW = 0.1  # seconds between redraws

_CLEAR = "\r\x1b[K"
_active: ProgressLine | None = None


class ProgressLine:
    """One self-overwriting status line on a terminal; does nothing elsewhere."""

    def __init__(
        self,
        label: str,
        *,
        quiet: bool = False,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.__stderr__ or sys.stderr
        self.enabled = not quiet and _isatty(self.stream)
        self.label = label
        self._clock = clock
        self._started = clock()
        self._drawn = 0.0
        self._shown = False

    def __call__(self, done: int, total: int | None = None) -> None:
        """The `Progress` callback: redraw, at most every REDRAW seconds."""
        self.update(done, total)

    def update(
        self,
        done: int,
        total: int | None = None,
        *,
        elapsed: float | None = None,
        rate: float | None = None,
        force: bool = False,
    ) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if not force and self._shown and now - self._drawn < REDRAW:
            return
        self._drawn = now
        if elapsed is None:
            elapsed = now - self._started
        if rate is None:
            rate = done / elapsed if elapsed > 0 else None
        self._write(_CLEAR + self.render(done, total, elapsed, rate))
        self._shown = True
        global _active
        _active = self

    def render(self, done: int, total: int | None, elapsed: float, rate: float | None) -> str:
        parts = [self.label]
        if total:
            share = min(done / total, 1.0)
            parts.append(f"{share * 100:3.0f}% {human_size(done)} of {human_size(total)}")
        else:
            parts.append(human_size(done))
        parts.append(human_rate(rate) if rate else "-/s")
        parts.append(human_duration(elapsed))
        if total and rate and done < total:
            parts.append(f"ETA {human_duration((total - done) / rate)}")
        return "  ".join(parts)

    def clear(self) -> None:
        """Remove the line (before other output, and at the end)."""
        global _active
        if self._shown:
            self._write(_CLEAR)
            self._shown = False
        if _active is self:
            _active = None

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: stop drawing
            self.enabled = False


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class TerminalStream:
    """stderr for log lines and messages: clears an active progress line before each write."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if _active is not None:
            _active.clear()
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return _isatty(self._stream)

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class CountingStore:
    """A Store that reports the bytes of every data object read through it."""

    def __init__(self, store: Store, progress: Progress, total: int | None) -> None:
        self._store = store
        self._progress = progress
        self.total = total
        self.done = 0
        self.name = store.name

    async def open_read(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        async for chunk in self._store.open_read(key, chunk_size):
            self.done += len(chunk)
            self._progress(self.done, self.total)
            yield chunk

    async def open_upload(self, key: str) -> Upload:
        return await self._store.open_upload(key)

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self._store.put_bytes(key, data)

    async def read_bytes(self, key: str) -> bytes:
        return await self._store.read_bytes(key)

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return await self._store.list(prefix)

    async def delete(self, keys: Sequence[str]) -> builtins.list[str]:
        return await self._store.delete(keys)

    async def list_incomplete_uploads(self) -> builtins.list[IncompleteUpload]:
        return await self._store.list_incomplete_uploads()

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        await self._store.abort_incomplete(upload)

    async def check(self) -> None:
        await self._store.check()

    async def create_if_absent(self, key: str, data: bytes) -> str:
        return await self._store.create_if_absent(key, data)

    async def replace_if_match(self, key: str, data: bytes, etag: str) -> str:
        return await self._store.replace_if_match(key, data, etag)

    async def read_versioned(self, key: str) -> Versioned:
        return await self._store.read_versioned(key)

    async def aclose(self) -> None:
        await self._store.aclose()
