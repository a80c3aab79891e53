"""Reading one stored data object back: the one path of restore, download and verify.

Every stored byte is counted and hashed; the bytes are decrypted (age) and
decompressed, and the plain dump goes to a sink (pg_restore, psql, a file).
The whole object is always read, also after decoding or the sink failed, so
the error raised is the most basic problem found, in this order: missing,
size, SHA-256, decoding, decoded size, then the sink's own failure. A
damaged object is therefore reported as damaged, not as the pg_restore
error it caused; where a later stage failed too, its reason follows.

Once decoding or the sink failed, nothing more is decoded or passed on. A
sink that has what it needs stops the read early, unchecked, by raising an
exception that is not a `BackupdError` (it propagates at once, as does
cancellation).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from backupd.catalog.manifest import Manifest, ObjectEntry
from backupd.errors import BackupdError, IdentityRequired, IntegrityError, NotFound
from backupd.storage.base import Store
from backupd.stream.age import AgeDecryptor, DecryptionError, load_identities
from backupd.stream.codecs import Encoder, algorithm_of, decompressor

Sink = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ReadResult:
    size_bytes: int
    sha256: str
    raw_bytes: int


def decoders(manifest: Manifest, identity: str | None) -> list[Encoder]:
    """What turns the stored bytes back into the dump: age (if encrypted), then the codec."""
    chain: list[Encoder] = []
    if manifest.encryption:
        if identity is None:
            raise IdentityRequired(manifest.stem)
        chain.append(AgeDecryptor(load_identities(identity)))
    chain.append(decompressor(algorithm_of(manifest.compression)))
    return chain


@dataclass
class _State:
    size: int = 0
    raw: int = 0
    decode_error: BaseException | None = None
    sink_error: BackupdError | None = None

    @property
    def stopped(self) -> bool:
        return self.decode_error is not None or self.sink_error is not None


async def read_back(
    store: Store,
    manifest: Manifest,
    entry: ObjectEntry,
    identity: str | None,
    sink: Sink | None,
) -> ReadResult:
    """Read `entry` of `manifest` once, decoded into `sink`, and check it against the manifest.

    With `sink` None the stored bytes are only counted and hashed (no identity
    needed). Raises `IntegrityError` (or `DecryptionError`) for the first
    problem, or the sink's own error when the object itself is intact.
    """
    chain = decoders(manifest, identity) if sink is not None else []
    digest = hashlib.sha256()
    state = _State()

    def step(chunk: bytes, final: bool) -> bytes:
        digest.update(chunk)
        if sink is None or state.stopped:
            return b""
        try:
            for decoder in chain:
                chunk = decoder.update(chunk) + (decoder.finish() if final else b"")
        # Codecs raise their own types (zstandard.ZstdError, zlib.error, lz4's RuntimeError).
        except Exception as exc:
            state.decode_error = exc
            return b""
        state.raw += len(chunk)
        return chunk

    async def give(plain: bytes) -> None:
        if not plain or sink is None or state.stopped:
            return
        try:
            await sink(plain)
        except BackupdError as exc:
            state.sink_error = exc

    key = manifest.object_key(entry)
    try:
        async for chunk in store.open_read(key):
            state.size += len(chunk)
            await give(await asyncio.to_thread(step, chunk, False))
    except NotFound:
        raise IntegrityError(f"data object {key} is missing from storage {store.name}") from None
    await give(await asyncio.to_thread(step, b"", True))
    result = ReadResult(state.size, digest.hexdigest(), state.raw)
    _check(result, entry, state, decoded=sink is not None)
    return result


def _check(result: ReadResult, entry: ObjectEntry, state: _State, decoded: bool) -> None:
    """Raise for the first problem, naming the next one too (what the damage caused)."""
    problems: list[BaseException] = []
    if result.size_bytes != entry.size_bytes:
        how = "truncated" if result.size_bytes < entry.size_bytes else "longer than recorded"
        problems.append(
            IntegrityError(
                f"size mismatch ({how}): the stored object is {result.size_bytes} bytes, "
                f"the manifest says {entry.size_bytes}"
            )
        )
    elif result.sha256 != entry.sha256:
        problems.append(
            IntegrityError(
                f"SHA-256 mismatch: the stored bytes hash to {result.sha256}, "
                f"the manifest says {entry.sha256}"
            )
        )
    if state.decode_error is not None:
        error = state.decode_error
        reason = f"cannot decrypt or decompress: {str(error) or type(error).__name__}"
        # A wrong identity is not damage: it keeps its own type.
        kind = DecryptionError if isinstance(error, DecryptionError) else IntegrityError
        problems.append(kind(reason))
    elif state.sink_error is not None:
        problems.append(state.sink_error)
    elif decoded and result.raw_bytes != entry.raw_bytes:
        problems.append(
            IntegrityError(
                f"decoded to {result.raw_bytes} bytes, the manifest says {entry.raw_bytes}"
            )
        )
    if not problems:
        return
    first = problems[0]
    if len(problems) > 1:
        raise type(first)(f"{first} (and so: {problems[1]})")
    raise first
