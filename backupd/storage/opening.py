"""A store still being opened, usable at once: so a backup's dump need not wait for it.

Opening an S3 store costs ~0.4 s (aiobotocore's imports and its client's models),
which a one-shot `backupd backup` would otherwise spend before pg_dump starts.
`OpeningStore` stands for the store meanwhile: each call waits for the opening
(and raises its error), except `open_upload()`, whose upload holds the first
`EARLY_BYTES` written to it and only then waits. So preflight, the snapshot
export and pg_dump's first seconds run while the store opens; the held bytes go
to the real upload, in order, as soon as it exists.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Sequence
from typing import Any

from backupd.storage.base import (
    BaseUpload,
    IncompleteUpload,
    MiB,
    ObjectInfo,
    Store,
    Upload,
    Versioned,
)

EARLY_BYTES = 1 * MiB
"""Bytes (stored, i.e. compressed) an upload holds before its store is open. Small:
what matters is that pg_dump starts; it then fills its pipe and the stream's queue by
itself, and waits. That wait is real (0.21-0.30 s in every 181 MiB backup to Ceph RGW,
while aiobotocore imports and the client is made), but holding 8 MiB to cover it cost
memory where it was measured with the bench: peak RSS on moto 96 MB median and 102 MB
at most, against 91 and 93 MB (RGW alone had shown no change, 16 alternating runs), for
no speed gain that the bench could tell from its run-to-run noise."""


class OpeningStore:
    """The store `opening` will return, usable before it does (see the module doc)."""

    def __init__(self, name: str, opening: asyncio.Future[Store]) -> None:
        self.name = name
        self._opening = opening

    async def _store(self) -> Store:
        # Shielded: a cancelled caller must not cancel an opening others share.
        return await asyncio.shield(self._opening)

    async def open_upload(self, key: str) -> Upload:
        if self._opening.done():
            return await self._opening.result().open_upload(key)
        return _EarlyUpload(self.name, key, self._opening)

    async def put_bytes(self, key: str, data: bytes) -> None:
        await (await self._store()).put_bytes(key, data)

    async def read_bytes(self, key: str) -> bytes:
        return await (await self._store()).read_bytes(key)

    async def open_read(self, key: str, chunk_size: int = MiB) -> AsyncIterator[bytes]:
        chunks = (await self._store()).open_read(key, chunk_size)
        try:
            async for chunk in chunks:
                yield chunk
        finally:  # the store's stream ends with this one, not when collected
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return await (await self._store()).list(prefix)

    async def delete(self, keys: Sequence[str]) -> builtins.list[str]:
        return await (await self._store()).delete(keys)

    async def list_incomplete_uploads(self) -> builtins.list[IncompleteUpload]:
        return await (await self._store()).list_incomplete_uploads()

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        await (await self._store()).abort_incomplete(upload)

    async def check(self) -> None:
        await (await self._store()).check()

    async def create_if_absent(self, key: str, data: bytes) -> str:
        return await (await self._store()).create_if_absent(key, data)

    async def replace_if_match(self, key: str, data: bytes, etag: str) -> str:
        return await (await self._store()).replace_if_match(key, data, etag)

    async def read_versioned(self, key: str) -> Versioned:
        return await (await self._store()).read_versioned(key)

    async def aclose(self) -> None:
        """Nothing: the store belongs to whoever started the opening (the pool)."""


class _EarlyUpload(BaseUpload):
    """An upload begun before its store is open: holds up to `EARLY_BYTES`, then waits
    for the store, opens the real upload and hands it the held bytes, in order."""

    OVERDUE_NOTE = "the store did not answer in time; the sweeper removes what is left"

    def __init__(self, storage: str, key: str, opening: asyncio.Future[Store]) -> None:
        super().__init__(key)
        self._storage = storage
        self._opening = opening
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._upload: Upload | None = None

    async def _real(self) -> Upload:
        if self._upload is None:
            store = await asyncio.shield(self._opening)  # raises the opening's error
            self._check_not_aborted()
            upload = await store.open_upload(self.key)
            if self._state == "aborted":  # abort() ran while it was being opened
                await upload.abort()
                self._check_not_aborted()
            self._upload = upload
            held, self._held = self._held, []
            while held:  # handed over one by one, so each is freed once written
                await upload.write(held.pop(0))
        return self._upload

    async def _write(self, data: bytes) -> None:
        if (
            self._upload is None
            and not self._opening.done()
            and self._held_bytes + len(data) <= EARLY_BYTES
        ):
            self._held.append(bytes(data))
            self._held_bytes += len(data)
            return
        await (await self._real()).write(data)

    async def _complete(self) -> int:
        return await (await self._real()).complete()

    async def _discard(self) -> None:
        if self._upload is not None:
            await self._upload.abort()

    def _release_buffers(self) -> None:
        self._held = []

    def _where(self) -> dict[str, Any]:
        return {"storage": self._storage, "key": self.key}
