"""`check --connect` for S3: the write path a backup uses, proven on the store itself.

Beside `s3.py` (whose `S3Store.check` calls this): a probe that is run once per
check, not on every backup, and reaches into the store's request helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import secrets
from typing import TYPE_CHECKING

import botocore.exceptions as botocore_errors

from backupd.errors import StorageError
from backupd.storage.s3 import _digest_base64
from backupd.storage.s3errors import REQUEST_ERRORS

if TYPE_CHECKING:
    from backupd.storage.s3 import S3Store


async def check_write_path(store: S3Store) -> None:
    """Prove the write path backups use, or fail with the store's error.

    Under the prefix: a multipart upload of one small part with the configured
    checksum, its completion, a read-back, a small PutObject, and one
    DeleteObjects of both probes (what prune and the sweeper send). Then
    whether the store verifies the configured checksum at all: a PutObject
    with a wrong one must be refused (noted in `compat_notes` if not).
    """
    await store._call("reach the bucket", "head_bucket", bucket_request=True)
    token = secrets.token_hex(8)
    probes = [f".backupd-check-{token}-multipart", f".backupd-check-{token}-small"]
    body = secrets.token_bytes(64 * 1024)
    object_key = store.prefix + probes[0]
    try:
        upload_id = await store.create_multipart(object_key)
        try:
            part = await store.upload_part(object_key, upload_id, 1, io.BytesIO(body))
            await store.complete_multipart(object_key, upload_id, [{"PartNumber": 1, **part}])
        except BaseException:
            await asyncio.shield(store.abort_multipart(object_key, upload_id))
            raise
        if await store.object_size(object_key) != len(body):
            raise StorageError(
                f"s3 storage {store.name}: {object_key} has the wrong size after upload"
            )
        if await store.read_bytes(probes[0]) != body:
            raise StorageError(f"s3 storage {store.name}: {object_key} reads back different bytes")
        await store.put_object(store.prefix + probes[1], b"backupd write check\n")
        failed = await store.delete(probes)
        if failed:
            raise StorageError(
                f"s3 storage {store.name}: DeleteObjects did not delete {', '.join(failed)}"
            )
    except BaseException:
        for probe in probes:
            with contextlib.suppress(StorageError):
                await asyncio.shield(store.delete_object(store.prefix + probe))
        raise
    await _probe_checksum_check(store, f"{store.prefix}.backupd-check-{token}-bad-checksum")


async def _probe_checksum_check(store: S3Store, object_key: str) -> None:
    """Send a wrong checksum of the configured kind; note it if the store keeps the object."""
    body = b"backupd checksum check\n"
    wrong = await asyncio.to_thread(_digest_base64, b"not the body", store.checksum)
    header = "x-amz-checksum-crc32" if store.checksum == "crc32" else "Content-MD5"
    param = "ChecksumCRC32" if store.checksum == "crc32" else "ContentMD5"
    try:
        await store._client.put_object(
            Bucket=store.bucket, Key=object_key, Body=body, **{param: wrong}
        )
    except botocore_errors.ClientError:
        return  # refused: the store checks it
    except REQUEST_ERRORS as exc:
        raise store._error(exc, f"write {object_key}") from exc
    await store.delete_object(object_key)
    note = (
        f"the store accepted a wrong {header}: it does not verify it; the SHA-256 "
        "in each manifest (checked by verify and restore) is the end-to-end check"
    )
    if note not in store.compat_notes:
        store.compat_notes.append(note)
