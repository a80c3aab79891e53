"""S3 storage (AWS and S3-compatible stores such as MinIO, R2, Ceph) through aiobotocore.

Small objects are one PutObject; larger ones a multipart upload whose parts go
up in background tasks, at most `upload_concurrency` at a time, so memory
stays near `(upload_concurrency + 1) * part_size`. Parts start at `part_size`
(5 MiB, S3's smallest, by default) and double every 1,000 parts, so any object
S3 allows fits in its 10,000 parts without configuration, a small dump never
pays for large buffers, and memory grows only past ~5 GB at the default.
botocore's own retries are off: every request, and every part on its own, is
retried here on transient errors (stamina), so one bad part never restarts
the upload. Every request has a connect timeout and a read timeout (no
progress sending its body, or no reply, for `read_timeout`): a store that
accepts connections and then stops answering fails the request, never holds
it. An upload's abort takes at most `CLEANUP_DEADLINE`; past it, the upload
is left to the sweeper. S3 errors become backupd's (`s3errors`).

Here: the store, its requests (retries, timeouts, checksums, compatibility
fallbacks found at run time) and `check --connect`. Beside it: the upload
(`s3upload`), the client's setup (`s3client`) and the error mapping (`s3errors`).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import email.utils
import hashlib
import io
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from datetime import UTC
from typing import Any

import botocore.exceptions as botocore_errors
import structlog

from backupd.config.model import S3Checksum, S3Storage
from backupd.errors import (
    NotFound,
    NotSupported,
    PreconditionFailed,
    StorageError,
    TransientStorageError,
)
from backupd.storage.base import (
    MAX_VERSIONED_BYTES,
    BaseStore,
    IncompleteUpload,
    MiB,
    ObjectInfo,
    Versioned,
    check_key,
    check_prefix,
)
from backupd.storage.retry import RetrySettings
from backupd.storage.s3client import open_client
from backupd.storage.s3errors import (
    NOT_FOUND_CODES,
    PRECONDITION_CODES,
    REQUEST_ERRORS,
    error_code,
    translate,
)
from backupd.storage.s3upload import S3Upload

log = structlog.get_logger(__name__)


def _without_checksum(part: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in part.items() if k != "ChecksumCRC32"}


def _digest_base64(data: bytes | io.BytesIO, algorithm: S3Checksum) -> str:
    """CRC32 (big-endian, as S3 wants it) or MD5 of a body, base64; releases the GIL."""
    with data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data) as view:
        if algorithm == "crc32":
            digest = zlib.crc32(view).to_bytes(4, "big")
        else:
            digest = hashlib.md5(view, usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


class S3Store(BaseStore):
    """One bucket (and prefix) reached through one aiobotocore client."""

    MIN_PART_SIZE = 5 * MiB
    MAX_PART_SIZE = 5 * 1024 * MiB
    MAX_PARTS = 10_000
    # Parts double in size every this many parts, so an object of any size S3 allows
    # (5 TiB) fits in MAX_PARTS without configuration, and memory grows only with it.
    PART_GROWTH_EVERY = 1000
    DELETE_BATCH = 1000

    def __init__(
        self, cfg: S3Storage, client: Any, exit_stack: AsyncExitStack, retry: RetrySettings
    ) -> None:
        self.name = cfg.name
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix
        self.part_size = cfg.part_size
        self.upload_concurrency = cfg.upload_concurrency
        # An object that reaches this size is uploaded in parts (smaller: one PutObject);
        # half a part, so the upload's creation overlaps filling the first part.
        self.early_create = cfg.part_size // 2
        self.storage_class = cfg.storage_class
        self.checksum = cfg.checksum
        self._client = client
        self._exit_stack = exit_stack
        self._retry = retry
        self.read_timeout = cfg.read_timeout
        # Over plain HTTP botocore signs every body's SHA-256 (SigV4), which AWS and
        # Ceph RGW check (Swift's s3api 2.30 does not): no Content-MD5 on top of it.
        self._md5_needed = cfg.checksum == "md5" and not cfg.endpoint_url.startswith("http://")
        # Compatibility found at run time (see complete_multipart), and what it changed.
        self._complete_part_checksums = True
        self.compat_notes: builtins.list[str] = []
        self._quote_if_match = True  # HA claims: If-Match "etag" (AWS) or bare (Ceph RGW)
        self._if_match_form_known = False

    def part_size_for(self, number: int) -> int:
        """The size of part `number` (from 1): `part_size`, doubled every PART_GROWTH_EVERY."""
        doublings = min((number - 1) // self.PART_GROWTH_EVERY, 20)
        return min(self.part_size << doublings, self.MAX_PART_SIZE)

    # -- errors and requests -------------------------------------------------

    def _error(
        self, exc: BaseException, action: str, *, bucket_request: bool = False
    ) -> StorageError:
        where = f"s3 storage {self.name}: {action}"
        return translate(exc, where, self.bucket, bucket_request=bucket_request)

    async def _call(
        self,
        action: str,
        operation: str,
        *,
        ignore: frozenset[str] = frozenset(),
        bucket_request: bool = False,
        **params: Any,
    ) -> dict[str, Any]:
        """One S3 request, retried while transient; error codes in `ignore` count as done."""
        method = getattr(self._client, operation)
        body = params.get("Body")
        response: dict[str, Any] = {}
        async for attempt in self._retry.context():
            with attempt:
                if isinstance(body, io.IOBase):
                    body.seek(0)  # every attempt sends the whole body
                try:
                    response = await self._send(method, body, Bucket=self.bucket, **params)
                except botocore_errors.ClientError as exc:
                    if error_code(exc) in ignore:
                        return {}
                    raise self._error(exc, action, bucket_request=bucket_request) from exc
                except REQUEST_ERRORS as exc:
                    raise self._error(exc, action) from exc
        return response

    async def _send(self, method: Any, body: object, **params: Any) -> dict[str, Any]:
        """One request; abandoned (TimeoutError) once its body stops going out.

        aiohttp's read timeout starts only when the whole body is sent: a store
        that stops reading mid-body would hold the request for ever. So the
        body's position is watched: no progress for `read_timeout` ends the
        request; a body handed over entirely gets `2 * read_timeout` (the rest
        to drain, then the reply, which the read timeout also bounds).
        """
        if not isinstance(body, io.BytesIO):
            return await method(**params)  # type: ignore[no-any-return]
        loop = asyncio.get_running_loop()
        start = body.tell()
        size = body.seek(0, io.SEEK_END)  # (getbuffer() would copy a body shared with bytes)
        body.seek(start)
        request = asyncio.ensure_future(method(**params))
        request.add_done_callback(_retrieved)
        sent, since = body.tell(), loop.time()
        try:
            while True:
                done, _ = await asyncio.wait([request], timeout=min(1.0, self.read_timeout / 4))
                if done:
                    return request.result()  # type: ignore[no-any-return]
                now = loop.time()
                if body.tell() != sent:
                    sent, since = body.tell(), now
                    continue
                idle = self.read_timeout * (2 if sent >= size else 1)
                if now - since >= idle:
                    raise TimeoutError(
                        f"no progress for {idle:g}s sending {sent} of {size} bytes (read_timeout)"
                    )
        finally:
            request.cancel()

    async def _paginate(
        self, action: str, operation: str, result_key: str, **params: Any
    ) -> list[dict[str, Any]]:
        """Every item of a paginated listing; the whole listing is retried while transient."""
        items: list[dict[str, Any]] = []
        async for attempt in self._retry.context():
            with attempt:
                items = []
                try:
                    paginator = self._client.get_paginator(operation)
                    async for page in paginator.paginate(Bucket=self.bucket, **params):
                        items.extend(page.get(result_key, []))
                except REQUEST_ERRORS as exc:
                    raise self._error(exc, action) from exc
        return items

    def _checksum_algorithm(self) -> dict[str, Any]:
        """Declared when a multipart upload starts: every part then carries its CRC32."""
        return {"ChecksumAlgorithm": "CRC32"} if self.checksum == "crc32" else {}

    def _storage_class(self) -> dict[str, Any]:
        return {"StorageClass": self.storage_class} if self.storage_class else {}

    async def _checksum(self, body: bytes | io.BytesIO) -> dict[str, Any]:
        """The body's checksum parameter, computed off the event loop.

        `crc32`: x-amz-checksum-crc32, which the store checks and keeps (per part,
        and for the object as a composite of the parts). `md5`: Content-MD5,
        unless SigV4 already signs the body's SHA-256 (plain HTTP).
        """
        if self.checksum == "crc32":
            return {"ChecksumCRC32": await asyncio.to_thread(_digest_base64, body, "crc32")}
        if self._md5_needed:
            return {"ContentMD5": await asyncio.to_thread(_digest_base64, body, "md5")}
        return {}

    # -- primitives used by S3Upload -----------------------------------------

    async def create_multipart(self, object_key: str) -> str:
        response = await self._call(
            f"start upload of {object_key}",
            "create_multipart_upload",
            Key=object_key,
            **self._checksum_algorithm(),
            **self._storage_class(),
        )
        return str(response["UploadId"])

    async def upload_part(
        self, object_key: str, upload_id: str, number: int, data: io.BytesIO
    ) -> dict[str, str]:
        """Upload one part; returns its entry for CompleteMultipartUpload (less the number)."""
        checksum = await self._checksum(data)
        response = await self._call(
            f"upload part {number} of {object_key}",
            "upload_part",
            Key=object_key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            **checksum,
        )
        done = {"ETag": str(response["ETag"])}
        if "ChecksumCRC32" in checksum:
            done["ChecksumCRC32"] = checksum["ChecksumCRC32"]
        return done

    async def complete_multipart(
        self, object_key: str, upload_id: str, parts: list[dict[str, Any]]
    ) -> None:
        """CompleteMultipartUpload, retried; the caller then checks the object's size.

        S3 may answer 200 with an <Error> body: botocore turns that into an error
        reply. A 200 without an ETag (Ceph RGW always answers so) is accepted once
        HeadObject shows the object made of these parts. If a retry finds the
        upload gone, an earlier attempt went through; the caller's size check
        decides. A store that rejects per-part checksums in the request
        (MalformedXML: Swift's s3api) gets it again without them, and from then on.
        """
        action = f"complete upload of {object_key}"
        async for attempt in self._retry.context():
            with attempt:
                try:
                    response = await self._send_complete(object_key, upload_id, parts)
                except botocore_errors.ClientError as exc:
                    if attempt.num > 1 and error_code(exc) == "NoSuchUpload":
                        return
                    raise self._error(exc, action) from exc
                except REQUEST_ERRORS as exc:
                    raise self._error(exc, action) from exc
                if not response.get("ETag"):
                    await self._check_completed(object_key, len(parts), action)

    async def _send_complete(
        self, object_key: str, upload_id: str, parts: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """One CompleteMultipartUpload; again at once without part checksums if refused."""
        if not self._complete_part_checksums:
            parts = [_without_checksum(part) for part in parts]
        request = {"Bucket": self.bucket, "Key": object_key, "UploadId": upload_id}
        try:
            response: dict[str, Any] = await self._client.complete_multipart_upload(
                **request, MultipartUpload={"Parts": parts}
            )
        except botocore_errors.ClientError as exc:
            code = error_code(exc)
            if code != "MalformedXML" or not any("ChecksumCRC32" in part for part in parts):
                raise
            self._drop_part_checksums(code)
            response = await self._client.complete_multipart_upload(
                **request, MultipartUpload={"Parts": [_without_checksum(p) for p in parts]}
            )
        return response

    def _drop_part_checksums(self, code: str) -> None:
        self._complete_part_checksums = False
        note = (
            f"the store refused per-part CRC32 checksums in CompleteMultipartUpload ({code}); "
            "parts still carry x-amz-checksum-crc32, completion lists only their ETags"
        )
        if note not in self.compat_notes:
            self.compat_notes.append(note)
            log.warning("s3_compat_fallback", storage=self.name, fallback=note)

    async def _check_completed(self, object_key: str, part_count: int, action: str) -> None:
        """After a 200 without an ETag: the object must exist, made of `part_count` parts."""
        try:
            head = await self._client.head_object(Bucket=self.bucket, Key=object_key)
        except botocore_errors.ClientError as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                raise TransientStorageError(
                    f"s3 storage {self.name}: {action}: the reply has no ETag and "
                    "the object is not there"
                ) from exc
            raise self._error(exc, action) from exc
        except REQUEST_ERRORS as exc:
            raise self._error(exc, action) from exc
        etag = str(head.get("ETag", "")).strip('"')
        _, dash, count = etag.rpartition("-")
        if dash and count.isdigit() and int(count) != part_count:
            raise StorageError(
                f"s3 storage {self.name}: {action}: the object has {count} parts, "
                f"expected {part_count}"
            )

    async def abort_multipart(self, object_key: str, upload_id: str) -> None:
        await self._call(
            f"abort upload of {object_key}",
            "abort_multipart_upload",
            ignore=frozenset({"NoSuchUpload"}),
            Key=object_key,
            UploadId=upload_id,
        )

    async def put_object(self, object_key: str, body: bytes) -> None:
        await self._call(
            f"write {object_key}",
            "put_object",
            Key=object_key,
            Body=io.BytesIO(body),  # shares the bytes; its position shows the upload's progress
            **await self._checksum(body),
            **self._storage_class(),
        )

    async def object_size(self, object_key: str) -> int:
        response = await self._call(f"check {object_key}", "head_object", Key=object_key)
        return int(response["ContentLength"])

    async def delete_object(self, object_key: str) -> None:
        await self._call(
            f"delete {object_key}",
            "delete_object",
            ignore=frozenset({"NoSuchKey"}),
            Key=object_key,
        )

    # -- the Store protocol --------------------------------------------------

    async def open_upload(self, key: str) -> S3Upload:
        return S3Upload(self, check_key(key))

    async def open_read(self, key: str, chunk_size: int = MiB) -> AsyncIterator[bytes]:
        object_key = self.prefix + check_key(key)
        action = f"read {object_key}"
        response = await self._call(action, "get_object", Key=object_key)
        async with response["Body"] as body:
            try:
                while chunk := await body.read(chunk_size):
                    yield chunk
            except REQUEST_ERRORS as exc:
                raise self._error(exc, action) from exc

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        listed = self.prefix + check_prefix(prefix)
        items = await self._paginate(f"list {listed}", "list_objects_v2", "Contents", Prefix=listed)
        objects = [
            ObjectInfo(
                key=item["Key"][len(self.prefix) :],
                size=int(item["Size"]),
                modified=item["LastModified"].astimezone(UTC),
            )
            for item in items
        ]
        objects.sort(key=lambda info: info.key)
        return objects

    async def delete(self, keys: Sequence[str]) -> builtins.list[str]:
        for key in keys:
            check_key(key)
        failed: builtins.list[str] = []
        for start in range(0, len(keys), self.DELETE_BATCH):
            batch = keys[start : start + self.DELETE_BATCH]
            response = await self._call(
                f"delete {len(batch)} objects under {self.prefix or '/'}",
                "delete_objects",
                Delete={"Objects": [{"Key": self.prefix + key} for key in batch], "Quiet": True},
            )
            for error in response.get("Errors", []):
                if error.get("Code") == "NoSuchKey":
                    continue
                key = str(error["Key"])[len(self.prefix) :]
                log.warning(
                    "delete_failed", storage=self.name, key=key, error=error.get("Code", "")
                )
                failed.append(key)
        return failed

    async def list_incomplete_uploads(self) -> builtins.list[IncompleteUpload]:
        items = await self._paginate(
            f"list uploads under {self.prefix or '/'}",
            "list_multipart_uploads",
            "Uploads",
            Prefix=self.prefix,
        )
        uploads = [
            IncompleteUpload(
                key=item["Key"][len(self.prefix) :],
                upload_id=item["UploadId"],
                started=item["Initiated"].astimezone(UTC),
            )
            for item in items
        ]
        uploads.sort(key=lambda upload: (upload.key, upload.started))
        return uploads

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        await self.abort_multipart(self.prefix + upload.key, upload.upload_id)

    async def check(self) -> None:
        """Prove the write path backups use, or fail with the store's error (`s3check`)."""
        from backupd.storage.s3check import check_write_path

        await check_write_path(self)

    # -- conditional writes (HA claims) --------------------------------------

    async def _conditional_put(self, key: str, data: bytes, **condition: Any) -> str:
        object_key = self.prefix + check_key(key)
        try:
            response = await self._call(
                f"write {object_key} (conditional)",
                "put_object",
                Key=object_key,
                Body=io.BytesIO(data),
                **condition,
                **await self._checksum(data),
            )
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore_errors.ClientError) and error_code(cause) in (
                PRECONDITION_CODES
            ):
                raise PreconditionFailed(
                    f"s3 storage {self.name}: {object_key} exists or changed"
                ) from None
            if isinstance(cause, botocore_errors.ClientError) and (
                error_code(cause) == "NotImplemented"
                or cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501
            ):
                raise NotSupported(
                    f"s3 storage {self.name}: the store does not implement conditional writes "
                    f"(NotImplemented for a PutObject with {', '.join(condition)})"
                ) from None
            if isinstance(exc, NotFound) and "IfMatch" in condition:
                raise PreconditionFailed(f"s3 storage {self.name}: {object_key} is gone") from None
            raise
        etag = str(response.get("ETag") or "")
        if not etag:
            raise StorageError(f"s3 storage {self.name}: no ETag in the reply to {object_key}")
        return etag

    async def create_if_absent(self, key: str, data: bytes) -> str:
        return await self._conditional_put(key, data, IfNoneMatch="*")

    async def replace_if_match(self, key: str, data: bytes, etag: str) -> str:
        """If-Match as AWS spells ETags (quoted); Ceph RGW 16.2 matches only the bare
        value. The first refusal of an ETag that still matches switches the form."""
        bare = etag.strip('"')
        try:
            return await self._conditional_put(
                key, data, IfMatch=f'"{bare}"' if self._quote_if_match else bare
            )
        except PreconditionFailed:
            if self._if_match_form_known:
                raise
            try:
                current = await self.read_versioned(key)
            except NotFound:
                raise PreconditionFailed(f"s3 storage {self.name}: {key} is gone") from None
            self._if_match_form_known = True
            if current.etag.strip('"') != bare:
                raise
            self._quote_if_match = not self._quote_if_match
            note = "the store matches If-Match only against the bare ETag (without quotes)"
            if note not in self.compat_notes:
                self.compat_notes.append(note)
            return await self._conditional_put(key, data, IfMatch=bare)

    async def read_versioned(self, key: str) -> Versioned:
        object_key = self.prefix + check_key(key)
        action = f"read {object_key}"
        response = await self._call(action, "get_object", Key=object_key)
        async with response["Body"] as body:
            try:
                data = await body.read(MAX_VERSIONED_BYTES + 1)
            except REQUEST_ERRORS as exc:
                raise self._error(exc, action) from exc
        if len(data) > MAX_VERSIONED_BYTES:
            raise StorageError(f"s3 storage {self.name}: {object_key} is too large for a claim")
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        try:
            server_now = email.utils.parsedate_to_datetime(str(headers.get("date", "")))
            modified = response["LastModified"]
            age = (server_now - modified).total_seconds()
        except (KeyError, TypeError, ValueError):
            raise StorageError(
                f"s3 storage {self.name}: the reply to {action} lacks a valid Date or "
                "Last-Modified header (needed to judge a claim's age by the store's clock)"
            ) from None
        return Versioned(
            data=data,
            etag=str(response.get("ETag") or ""),
            age=age,
            modified=modified.astimezone(UTC),
        )

    async def aclose(self) -> None:
        await self._exit_stack.aclose()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Done callback of a request whose caller may have stopped waiting: its error is seen."""
    if not task.cancelled():
        task.exception()


async def open_s3_store(cfg: S3Storage, retry: RetrySettings | None = None) -> S3Store:
    """Resolve the secrets now and enter one client; `aclose()` the store to release it."""
    if cfg.part_size < S3Store.MIN_PART_SIZE:
        raise StorageError(
            f"s3 storage {cfg.name}: part_size must be at least 5MiB (S3's smallest part)"
        )
    if cfg.upload_concurrency < 1:
        raise StorageError(f"s3 storage {cfg.name}: upload_concurrency must be at least 1")
    exit_stack = AsyncExitStack()
    client = await open_client(cfg, exit_stack)
    return S3Store(cfg, client, exit_stack, retry or RetrySettings())
