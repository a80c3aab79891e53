"""The storage contract, run unchanged against every backend: filesystem and S3.

S3 runs on moto (fast, default suite) and on the real stores of
tests/objstores.py, Ceph RGW (http, and https with a private CA) and Swift
with s3api, each with both checksum settings (those are `slow`: Ceph takes
20-90 s to start).

What the backup pipeline relies on: bytes read back identical, an upload is
invisible until completed, an aborted, failed or cancelled upload leaves
nothing (no object, no incomplete upload), crashed uploads can be found and
swept, and every backend refuses the same keys.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from backupd.config.model import FilesystemStorage, S3Storage, Secret
from backupd.errors import NotFound, StorageError
from backupd.storage import Store, open_store
from tests.helpers import no_wait_retry
from tests.objstores import S3Target

MiB = 1024 * 1024
PART_SIZE = 5 * MiB
MULTIPART_SIZE = 12 * MiB + 12345  # three parts of 5 MiB
NO_WAIT_RETRY = no_wait_retry()


def s3_config(
    endpoint: str,
    bucket: str,
    key_env: str = "BACKUPD_TEST_AWS_KEY",
    secret_env: str = "BACKUPD_TEST_AWS_SECRET",
    **overrides: object,
) -> S3Storage:
    """The S3 config the tests use: a prefix, credentials from the environment."""
    settings: dict[str, object] = {
        "name": "offsite",
        "bucket": bucket,
        "prefix": "prod/",
        "endpoint_url": endpoint,
        "access_key_id": Secret(env=key_env),
        "secret_access_key": Secret(env=secret_env),
        "part_size": PART_SIZE,
        "upload_concurrency": 2,
    }
    settings.update(overrides)
    return S3Storage(**settings)  # type: ignore[arg-type]


def target_config(target: S3Target, **overrides: object) -> S3Storage:
    """The S3 config for a bucket of tests/objstores.py (with the CA of an https endpoint)."""
    if target.ca_file is not None:
        overrides.setdefault("ca_bundle", str(target.ca_file))
    return s3_config(target.endpoint, target.bucket, target.key_env, target.secret_env, **overrides)


REAL_STORES = ["rgw", "rgw-https", "swift"]
# The first test on a store also starts it (Ceph: up to ~90 s cold on a busy machine).
REAL_STORE_MARKS = [pytest.mark.slow, pytest.mark.timeout(360)]
BACKENDS = [
    "filesystem",
    "s3",
    "s3-md5",
    *(
        pytest.param(f"{store}{mode}", marks=REAL_STORE_MARKS)
        for store in REAL_STORES
        for mode in ("", "-md5")
    ),
]
BUCKET_FIXTURES = {
    "s3": "moto_bucket",
    "rgw": "rgw_bucket",
    "rgw-https": "rgw_https_bucket",
    "swift": "swift_bucket",
}


@pytest.fixture(params=BACKENDS)
def storage_config(
    request: pytest.FixtureRequest, tmp_path: os.PathLike[str]
) -> S3Storage | FilesystemStorage:
    """Each backend; S3 with both its checksum settings (CRC32 flexible checksums, MD5)."""
    if request.param == "filesystem":
        return FilesystemStorage(name="local", path=os.path.join(tmp_path, "store"))
    target: S3Target = request.getfixturevalue(BUCKET_FIXTURES[request.param.removesuffix("-md5")])
    if request.param.endswith("-md5"):
        return target_config(target, checksum="md5")
    return target_config(target)


@pytest.fixture
async def store(storage_config: S3Storage | FilesystemStorage) -> AsyncIterator[Store]:
    opened = await open_store(storage_config, s3_retry=NO_WAIT_RETRY)
    yield opened
    await opened.aclose()


async def write_object(store: Store, key: str, data: bytes, chunk_size: int = MiB) -> int:
    """Write like the pipeline does: chunks, then complete; abort on any failure."""
    upload = await store.open_upload(key)
    try:
        for start in range(0, len(data), chunk_size):
            await upload.write(data[start : start + chunk_size])
        return await upload.complete()
    except BaseException:
        await upload.abort()
        raise


async def read_object(store: Store, key: str) -> bytes:
    return b"".join([chunk async for chunk in store.open_read(key)])


async def assert_nothing_left(store: Store) -> None:
    assert await store.list() == []
    assert await store.list_incomplete_uploads() == []


@pytest.mark.parametrize("size", [0, 1000, MULTIPART_SIZE], ids=["empty", "small", "multipart"])
async def test_written_object_reads_back_identical(store: Store, size: int) -> None:
    data = os.urandom(size)

    assert await write_object(store, "app/2024/db.dump", data) == size

    assert await read_object(store, "app/2024/db.dump") == data
    [info] = await store.list()
    assert (info.key, info.size) == ("app/2024/db.dump", size)
    assert abs(datetime.now(UTC) - info.modified) < timedelta(minutes=5)
    assert await store.list_incomplete_uploads() == []


async def test_writes_of_any_size_make_one_stream(store: Store) -> None:
    data = os.urandom(MULTIPART_SIZE)
    upload = await store.open_upload("odd-chunks.bin")
    position = 0
    for size in [1, 100, 3 * MiB, PART_SIZE - 101, 7 * MiB + 1, 64 * 1024]:
        await upload.write(data[position : position + size])
        position += size
    await upload.write(data[position:])

    assert await upload.complete() == len(data)
    assert await read_object(store, "odd-chunks.bin") == data


async def test_aborted_upload_leaves_nothing(store: Store) -> None:
    upload = await store.open_upload("app/aborted.dump")
    await upload.write(os.urandom(PART_SIZE + MiB))  # past one part: S3 has a multipart upload

    await upload.abort()
    await upload.abort()  # idempotent, never raises

    await assert_nothing_left(store)
    with pytest.raises(StorageError):
        await upload.write(b"more")


async def test_upload_is_invisible_until_completed(store: Store) -> None:
    upload = await store.open_upload("app/pending.dump")
    await upload.write(os.urandom(PART_SIZE + MiB))

    assert await store.list() == []
    with pytest.raises(NotFound):
        await store.read_bytes("app/pending.dump")

    await upload.complete()
    assert [info.key for info in await store.list()] == ["app/pending.dump"]


async def test_cancelled_writer_leaves_nothing(store: Store) -> None:
    first_write_done = asyncio.Event()
    chunk = os.urandom(MiB)

    async def writer() -> None:
        upload = await store.open_upload("app/cancelled.dump")
        for _ in range(1000):  # far more than can be written before the cancel lands
            await upload.write(chunk)
            first_write_done.set()

    task = asyncio.create_task(writer())
    await first_write_done.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await assert_nothing_left(store)


@pytest.mark.parametrize("size", [1000, MULTIPART_SIZE], ids=["small", "multipart"])
async def test_cancelled_complete_leaves_nothing(store: Store, size: int) -> None:
    completing = asyncio.Event()

    async def writer() -> None:
        upload = await store.open_upload("app/cancelled.dump")
        await upload.write(os.urandom(size))
        completing.set()
        await upload.complete()

    task = asyncio.create_task(writer())
    await completing.wait()  # the writer runs on into complete() before this returns
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await assert_nothing_left(store)


@pytest.mark.parametrize("size", [1000, MULTIPART_SIZE], ids=["small", "multipart"])
async def test_abort_from_another_task_during_complete_wins(store: Store, size: int) -> None:
    upload = await store.open_upload("app/aborted.dump")
    await upload.write(os.urandom(size))
    completing = asyncio.Event()

    async def finish() -> int:
        completing.set()
        return await upload.complete()

    task = asyncio.create_task(finish())
    await completing.wait()  # the task runs on into complete() before this returns
    await upload.abort()

    with pytest.raises(StorageError):
        await task
    await assert_nothing_left(store)


async def test_list_filters_by_prefix_and_sorts_by_key(store: Store) -> None:
    for key in ["b/2", "a/2", "ab", "a/10", "a/1", "a/sub/x"]:
        await store.put_bytes(key, key.encode())

    assert [info.key for info in await store.list()] == [
        "a/1",
        "a/10",
        "a/2",
        "a/sub/x",
        "ab",
        "b/2",
    ]
    assert [info.key for info in await store.list("a/")] == ["a/1", "a/10", "a/2", "a/sub/x"]
    assert [info.key for info in await store.list("a/1")] == ["a/1", "a/10"]
    assert [info.key for info in await store.list("a")][-1] == "ab"
    assert await store.list("zzz/") == []
    assert [info.size for info in await store.list("a/sub/")] == [len(b"a/sub/x")]


async def test_delete_removes_objects_and_accepts_missing_keys(store: Store) -> None:
    for key in ["job/1.dump", "job/1.manifest.json", "other/keep.dump"]:
        await store.put_bytes(key, b"x")

    failed = await store.delete(["job/1.dump", "job/1.manifest.json", "job/never-existed"])

    assert failed == []
    assert [info.key for info in await store.list()] == ["other/keep.dump"]
    assert await store.delete([]) == []


async def test_reading_a_missing_key_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.read_bytes("no/such.dump")
    with pytest.raises(NotFound):
        await read_object(store, "no/such.dump")


async def test_crashed_upload_is_listed_and_can_be_aborted(store: Store) -> None:
    upload = await store.open_upload("app/crashed.dump")
    await upload.write(os.urandom(PART_SIZE + MiB))
    # The process "crashes" here: the upload is never completed nor aborted.

    [leftover] = await store.list_incomplete_uploads()
    assert leftover.key == "app/crashed.dump"
    assert leftover.started.tzinfo is not None  # moto reports a fixed date: no age check here

    await store.abort_incomplete(leftover)

    await assert_nothing_left(store)
    await upload.abort()  # releases the test's own handles; nothing is left either way
    await assert_nothing_left(store)


async def test_put_bytes_replaces_and_read_bytes_returns_it(store: Store) -> None:
    await store.put_bytes("job/x.manifest.json", b'{"v": 1}')
    await store.put_bytes("job/x.manifest.json", b'{"v": 2}')

    assert await store.read_bytes("job/x.manifest.json") == b'{"v": 2}'
    assert [(i.key, i.size) for i in await store.list()] == [("job/x.manifest.json", 8)]


async def test_check_passes_and_leaves_nothing(store: Store) -> None:
    await store.check()

    await assert_nothing_left(store)


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../up", "a/../../up", "a//b", "a/./b"])
async def test_keys_that_are_not_plain_relative_paths_are_refused(store: Store, key: str) -> None:
    with pytest.raises(StorageError) as refused:
        await store.open_upload(key)
    assert not isinstance(refused.value, NotFound)
    with pytest.raises(StorageError):
        await store.read_bytes(key)
    with pytest.raises(StorageError):
        await store.delete([key])
