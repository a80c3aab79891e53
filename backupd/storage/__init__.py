"""Storage backends behind one protocol; `open_store` picks the backend for a config."""

from __future__ import annotations

import asyncio
import importlib
import sys

from backupd.config.model import FilesystemStorage, S3Storage
from backupd.storage.base import IncompleteUpload, ObjectInfo, Store, Upload
from backupd.storage.filesystem import open_filesystem_store
from backupd.storage.retry import RetrySettings

__all__ = [
    "IncompleteUpload",
    "ObjectInfo",
    "RetrySettings",
    "Store",
    "Upload",
    "open_store",
]


async def open_store(
    cfg: S3Storage | FilesystemStorage, *, s3_retry: RetrySettings | None = None
) -> Store:
    """Open the backend `cfg` describes; the caller must `await store.aclose()`.

    `s3_retry` overrides how S3 requests are retried (tests use zero waits).
    """
    if isinstance(cfg, S3Storage):
        # Imported here: aiobotocore and aiohttp take ~0.3 s to import, which a
        # `backupd backup` to the filesystem (or `--help`) should not pay. And in a
        # worker thread, so the event loop goes on meanwhile (a backup's preflight
        # and pg_dump start while its S3 store opens: `opening.py`).
        if "backupd.storage.s3" not in sys.modules:
            await asyncio.to_thread(importlib.import_module, "backupd.storage.s3")
        from backupd.storage.s3 import open_s3_store

        return await open_s3_store(cfg, s3_retry)
    return await open_filesystem_store(cfg)
