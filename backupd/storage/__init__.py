"""Storage backends behind one protocol; `open_store` picks the backend for a config."""

from __future__ import annotations

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
        # Imported here: aiobotocore and aiohttp take ~0.2 s to import, which a
        # `backupd backup` to the filesystem (or `--help`) should not pay.
        from backupd.storage.s3 import open_s3_store

        return await open_s3_store(cfg, s3_retry)
    return await open_filesystem_store(cfg)
