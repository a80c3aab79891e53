"""Stream codecs: compression and decompression with one small interface.

Every codec works on whole chunks (about 1 MiB) and releases the GIL in C, so
a worker thread can run it while the event loop uploads.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Protocol

import lz4.frame
import zstandard

if TYPE_CHECKING:  # the stream takes the config's spec; it does not load configs
    from backupd.config.model import Compression


class Encoder(Protocol):
    def update(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class Identity:
    def update(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        return b""


class _Zstd:
    """zstd in libzstd's own worker thread (`threads=1`, what the zstd CLI does by
    default): `update` hands the input over and returns what is ready, so reading,
    hashing and uploading overlap with compression. Still one standard frame.

    Jobs of 1 MiB instead of libzstd's default (4x the window, 8 MiB at level 3)
    keep its buffers near 10 MiB instead of about 50 MiB, at the same speed and ratio.
    """

    JOB_SIZE = 1 << 20

    def __init__(self, level: int) -> None:
        # write_checksum: a content checksum, as the zstd CLI writes, so corruption fails
        # decompression instead of yielding wrong bytes.
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=1, job_size=self.JOB_SIZE, write_checksum=True
        )
        self._obj = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def update(self, data: bytes) -> bytes:
        return bytes(self._obj.compress(data))

    def finish(self) -> bytes:
        return bytes(self._obj.flush())


class _Gzip:
    def __init__(self, level: int) -> None:
        # wbits 31: a gzip header and trailer, so `gzip -d` reads it.
        self._obj = zlib.compressobj(level, zlib.DEFLATED, 31)

    def update(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def finish(self) -> bytes:
        return self._obj.flush()


class _Lz4:
    def __init__(self, level: int) -> None:
        self._obj = lz4.frame.LZ4FrameCompressor(compression_level=level)
        self._header: bytes | None = self._obj.begin()

    def update(self, data: bytes) -> bytes:
        out = self._obj.compress(data)
        if self._header is not None:
            out, self._header = self._header + out, None
        return bytes(out)

    def finish(self) -> bytes:
        out = self._obj.flush()
        if self._header is not None:
            out, self._header = self._header + out, None
        return bytes(out)


def compressor(spec: Compression) -> Encoder:
    if spec.algorithm == "zstd":
        return _Zstd(3 if spec.level is None else spec.level)
    if spec.algorithm == "gzip":
        return _Gzip(6 if spec.level is None else spec.level)
    if spec.algorithm == "lz4":
        return _Lz4(0 if spec.level is None else spec.level)
    return Identity()


class _ZstdDec:
    def __init__(self) -> None:
        self._obj = zstandard.ZstdDecompressor().decompressobj()

    def update(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self._obj.eof:
            raise ValueError("data after the end of the zstd frame")
        return bytes(self._obj.decompress(data))

    def finish(self) -> bytes:
        if not self._obj.eof:
            raise ValueError("zstd stream is truncated")
        return b""


class _GzipDec:
    def __init__(self) -> None:
        self._obj = zlib.decompressobj(47)

    def update(self, data: bytes) -> bytes:
        return self._obj.decompress(data) if data else b""

    def finish(self) -> bytes:
        if not self._obj.eof:
            raise ValueError("gzip stream is truncated")
        return self._obj.flush()


class _Lz4Dec:
    def __init__(self) -> None:
        self._obj = lz4.frame.LZ4FrameDecompressor()

    def update(self, data: bytes) -> bytes:
        return bytes(self._obj.decompress(data)) if data else b""

    def finish(self) -> bytes:
        if not self._obj.eof:
            raise ValueError("lz4 stream is truncated")
        return b""


class _Checked:
    """Turns each codec library's own error into ValueError: corrupted input, not a bug."""

    def __init__(self, inner: Encoder) -> None:
        self._inner = inner

    def update(self, data: bytes) -> bytes:
        try:
            return self._inner.update(data)
        except (zstandard.ZstdError, zlib.error, RuntimeError) as exc:
            raise ValueError(f"corrupted compressed data: {exc}") from None

    def finish(self) -> bytes:
        try:
            return self._inner.finish()
        except (zstandard.ZstdError, zlib.error, RuntimeError) as exc:
            raise ValueError(f"corrupted compressed data: {exc}") from None


def decompressor(algorithm: str) -> Encoder:
    if algorithm == "zstd":
        return _Checked(_ZstdDec())
    if algorithm == "gzip":
        return _Checked(_GzipDec())
    if algorithm == "lz4":
        return _Checked(_Lz4Dec())
    return Identity()


def algorithm_of(spec: str) -> str:
    """`zstd:3` -> `zstd`: the manifest records the config spelling."""
    return spec.split(":", 1)[0]
