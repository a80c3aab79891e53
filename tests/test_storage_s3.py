"""S3 storage against moto, and through a small fault-injecting proxy in front of it.

The proxy forwards every request to the moto server unless a fault matches,
in which case it answers like a misbehaving S3 would (503 SlowDown, 200 with an
<Error> body, 403 for bad credentials) or holds the request until released.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from backupd.errors import StorageError, TransientStorageError
from backupd.storage import Store, open_store
from tests.pgcluster import free_port
from tests.test_storage_contract import (
    MULTIPART_SIZE,
    NO_WAIT_RETRY,
    read_object,
    s3_config,
    write_object,
)

MiB = 1024 * 1024
_NOT_FORWARDED = {"host", "content-length", "transfer-encoding", "connection", "expect", "date"}


def s3_error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>proxy</RequestId></Error>"
    ).encode()


Match = Callable[[web.Request], bool]


def is_upload_part(number: int | None = None) -> Match:
    return lambda r: (
        r.method == "PUT"
        and "uploadId" in r.query
        and (number is None or r.query.get("partNumber") == str(number))
    )


def is_complete(r: web.Request) -> bool:
    return r.method == "POST" and "uploadId" in r.query


def is_create(r: web.Request) -> bool:
    return r.method == "POST" and "uploads" in r.query


def is_delete_objects(r: web.Request) -> bool:
    return r.method == "POST" and "delete" in r.query


@dataclass
class Fault:
    match: Match
    status: int = 503
    body: bytes = b""
    times: int | None = 1  # None: every matching request
    hold: asyncio.Event | None = None  # hold the request until this is set, then forward
    held: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class FaultProxy:
    upstream: str
    session: aiohttp.ClientSession
    url: str = ""
    faults: list[Fault] = field(default_factory=list)
    seen: list[web.Request] = field(default_factory=list)

    def count(self, match: Match) -> int:
        return sum(1 for request in self.seen if match(request))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(request)
        for fault in self.faults:
            if fault.times != 0 and fault.match(request):
                if fault.times is not None:
                    fault.times -= 1
                if fault.hold is not None:
                    fault.held.set()
                    await fault.hold.wait()
                    break
                return web.Response(
                    status=fault.status, body=fault.body, content_type="application/xml"
                )
        return await self.forward(request, body)

    async def forward(self, request: web.Request, body: bytes) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        target = URL(self.upstream + request.raw_path, encoded=True)
        async with self.session.request(
            request.method, target, headers=headers, data=io.BytesIO(body), auto_decompress=False
        ) as upstream:
            payload = await upstream.read()
            reply = web.Response(status=upstream.status, body=payload or None)
            for name, value in upstream.headers.items():
                if name.lower() not in _NOT_FORWARDED:
                    reply.headers[name] = value
            if request.method == "HEAD" and "Content-Length" in upstream.headers:
                reply.headers["Content-Length"] = upstream.headers["Content-Length"]
            return reply


@pytest.fixture
async def proxy(s3_server: str) -> AsyncIterator[FaultProxy]:
    async with aiohttp.ClientSession() as session:
        proxy = FaultProxy(upstream=s3_server, session=session)
        app = web.Application(client_max_size=64 * MiB)
        app.router.add_route("*", "/{tail:.*}", proxy.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        proxy.url = f"http://127.0.0.1:{port}"
        try:
            yield proxy
        finally:
            for fault in proxy.faults:
                if fault.hold is not None:
                    fault.hold.set()
            await runner.cleanup()


@pytest.fixture
async def store(s3_server: str, s3_bucket: str) -> AsyncIterator[Store]:
    opened = await open_store(s3_config(s3_server, s3_bucket), s3_retry=NO_WAIT_RETRY)
    yield opened
    await opened.aclose()


@pytest.fixture
async def proxied(proxy: FaultProxy, s3_bucket: str) -> AsyncIterator[Store]:
    opened = await open_store(s3_config(proxy.url, s3_bucket), s3_retry=NO_WAIT_RETRY)
    yield opened
    await opened.aclose()


async def assert_nothing_left(store: Store) -> None:
    assert await store.list() == []
    assert await store.list_incomplete_uploads() == []


async def test_multipart_object_has_the_expected_parts_under_the_prefix(
    store: Store, s3_client: Any, s3_bucket: str
) -> None:
    await write_object(store, "app/db.dump", os.urandom(MULTIPART_SIZE))

    head = s3_client.head_object(Bucket=s3_bucket, Key="prod/app/db.dump")
    assert head["ContentLength"] == MULTIPART_SIZE
    assert head["ETag"].strip('"').endswith("-3")


async def test_each_part_sent_gives_the_heap_s_free_pages_back(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backupd.storage import s3upload

    calls: list[int] = []
    release = s3upload.release_free_memory
    monkeypatch.setattr(s3upload, "release_free_memory", lambda: calls.append(1) or release())
    await write_object(store, "app/db.dump", os.urandom(MULTIPART_SIZE))
    assert len(calls) == 3  # one per part, the last one's included


_HELD_FREE_PAGES = """
import ctypes, os, sys
from pathlib import Path
from backupd.storage import s3upload
MiB = 1 << 20
libc = ctypes.CDLL(None)
assert libc.mallopt(-3, 8 * MiB) == 1  # M_MMAP_THRESHOLD: 1 MiB buffers come from the heap
assert libc.mallopt(-1, 1 << 30) == 1  # M_TRIM_THRESHOLD: and free() never shrinks it
def resident():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
buffers, pins = [], []
for _ in range(64):  # 64 MiB written, a live object after each buffer
    buffers.append(bytearray(MiB))
    buffers[-1][:] = b"x" * MiB
    pins.append(bytearray(4096))
del buffers
before = resident()
if sys.argv[1] == "release":
    s3upload.release_free_memory()
print(before, resident(), s3upload._MALLOC_TRIM is not None)
"""


@pytest.mark.parametrize("release", [True, False])
def test_releasing_free_memory_hands_freed_heap_pages_back(release: bool) -> None:
    """glibc keeps freed buffers that lie between live objects (made certain here, in a
    process of its own, by fixing its thresholds); the release hands their pages back.
    This machine's C library is glibc, so the call is not a no-op here."""
    out = subprocess.run(
        [sys.executable, "-c", _HELD_FREE_PAGES, "release" if release else "keep"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    before, after, has_trim = int(out[0]), int(out[1]), out[2] == "True"
    assert has_trim
    if release:
        assert before - after > 48 * MiB, (before, after)
    else:  # what the test relies on: without the release, the pages stay
        assert before - after < 4 * MiB, (before, after)


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


async def test_every_part_carries_its_crc32_and_the_store_keeps_the_composite(
    proxy: FaultProxy, proxied: Store, s3_client: Any, s3_bucket: str
) -> None:
    data = os.urandom(MULTIPART_SIZE)
    await write_object(proxied, "app/db.dump", data)

    [create] = [r for r in proxy.seen if is_create(r)]
    assert create.headers["x-amz-checksum-algorithm"] == "CRC32"
    parts = [data[i : i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    sent = {
        int(r.query["partNumber"]): r.headers.get("x-amz-checksum-crc32")
        for r in proxy.seen
        if is_upload_part()(r)
    }
    assert sent == {n: crc32_b64(part) for n, part in enumerate(parts, 1)}
    # S3's composite: the CRC32 of the parts' CRC32s (AWS appends "-<parts>", moto does not).
    composite = crc32_b64(b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts))
    head = s3_client.head_object(Bucket=s3_bucket, Key="prod/app/db.dump", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"].removesuffix(f"-{len(parts)}") == composite


async def test_a_small_object_carries_its_crc32(proxy: FaultProxy, proxied: Store) -> None:
    await proxied.put_bytes("app/manifest.json", b'{"id": "x"}')

    [put] = [r for r in proxy.seen if r.method == "PUT"]
    assert put.headers["x-amz-checksum-crc32"] == crc32_b64(b'{"id": "x"}')


async def test_checksum_md5_sends_no_flexible_checksum(proxy: FaultProxy, s3_bucket: str) -> None:
    """For stores that reject x-amz-checksum-*: over plain HTTP SigV4 signs each body's
    SHA-256, so nothing else is sent (over HTTPS, Content-MD5)."""
    store = await open_store(
        s3_config(proxy.url, s3_bucket, checksum="md5"), s3_retry=NO_WAIT_RETRY
    )
    try:
        data = os.urandom(MULTIPART_SIZE)
        await write_object(store, "app/db.dump", data)
        assert await read_object(store, "app/db.dump") == data
    finally:
        await store.aclose()

    writes = [r for r in proxy.seen if r.method in ("PUT", "POST")]
    assert len(writes) == 5  # create, 3 parts, complete
    for request in writes:
        assert not [h for h in request.headers if h.lower().startswith("x-amz-checksum")]
        assert "Content-MD5" not in request.headers
        assert len(request.headers["x-amz-content-sha256"]) == 64  # the signed body digest


@pytest.mark.parametrize("size", [1000, MULTIPART_SIZE], ids=["small", "multipart"])
async def test_storage_class_is_applied(
    s3_server: str, s3_bucket: str, s3_client: Any, size: int
) -> None:
    store = await open_store(
        s3_config(s3_server, s3_bucket, storage_class="STANDARD_IA"), s3_retry=NO_WAIT_RETRY
    )
    await write_object(store, "app/db.dump", os.urandom(size))
    await store.aclose()

    head = s3_client.head_object(Bucket=s3_bucket, Key="prod/app/db.dump")
    assert head["StorageClass"] == "STANDARD_IA"


async def test_missing_bucket_is_a_permanent_error_naming_it(s3_server: str) -> None:
    store = await open_store(s3_config(s3_server, "no-such-bucket"), s3_retry=NO_WAIT_RETRY)
    try:
        for operation in (store.check(), store.list(), store.put_bytes("a", b"x")):
            with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as e:
                await operation
            assert not e.value.transient
    finally:
        await store.aclose()


async def test_unreachable_endpoint_is_transient(s3_bucket: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    store = await open_store(s3_config(closed, s3_bucket), s3_retry=NO_WAIT_RETRY)
    try:
        with pytest.raises(TransientStorageError):
            await store.list()
    finally:
        await store.aclose()


async def test_throttled_part_is_retried_without_restarting_the_upload(
    proxy: FaultProxy, proxied: Store, store: Store
) -> None:
    slow_down = s3_error("SlowDown", "Please reduce your request rate.")
    proxy.faults.append(Fault(is_upload_part(2), status=503, body=slow_down, times=2))
    data = os.urandom(MULTIPART_SIZE)

    assert await write_object(proxied, "app/db.dump", data) == len(data)

    assert await store.read_bytes("app/db.dump") == data
    assert proxy.count(is_create) == 1
    assert proxy.count(is_upload_part()) == 3 + 2


async def test_complete_answered_200_with_an_error_body_fails(
    proxy: FaultProxy, proxied: Store
) -> None:
    internal = s3_error("InternalError", "We encountered an internal error. Please try again.")
    proxy.faults.append(Fault(is_complete, status=200, body=internal, times=None))

    with pytest.raises(StorageError):
        await write_object(proxied, "app/db.dump", os.urandom(MULTIPART_SIZE))

    await assert_nothing_left(proxied)


async def test_rejected_credentials_are_a_permanent_error_without_the_secret(
    proxy: FaultProxy, proxied: Store
) -> None:
    denied = s3_error("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist.")
    proxy.faults.append(Fault(lambda r: True, status=403, body=denied, times=None))

    with pytest.raises(StorageError, match="rejected the credentials") as failed:
        await proxied.put_bytes("app/x.manifest.json", b"{}")

    assert not failed.value.transient
    assert os.environ["BACKUPD_TEST_AWS_SECRET"] not in str(failed.value)


async def test_part_refused_for_good_leaves_nothing(proxy: FaultProxy, proxied: Store) -> None:
    denied = s3_error("AccessDenied", "Access Denied")
    proxy.faults.append(Fault(is_upload_part(2), status=403, body=denied, times=None))

    with pytest.raises(StorageError, match="access denied") as failed:
        await write_object(proxied, "app/db.dump", os.urandom(MULTIPART_SIZE))

    assert not failed.value.transient
    await assert_nothing_left(proxied)


async def test_part_failing_on_every_attempt_is_transient_and_leaves_nothing(
    proxy: FaultProxy, proxied: Store
) -> None:
    unavailable = s3_error("ServiceUnavailable", "Service Unavailable")
    proxy.faults.append(Fault(is_upload_part(1), status=503, body=unavailable, times=None))

    with pytest.raises(TransientStorageError):
        await write_object(proxied, "app/db.dump", os.urandom(MULTIPART_SIZE))

    assert proxy.count(is_upload_part(1)) == NO_WAIT_RETRY.attempts
    await assert_nothing_left(proxied)


async def test_cancel_with_parts_in_flight_leaves_nothing(
    proxy: FaultProxy, proxied: Store
) -> None:
    stall = Fault(is_upload_part(1), hold=asyncio.Event())
    proxy.faults.append(stall)
    task = asyncio.create_task(write_object(proxied, "app/db.dump", os.urandom(MULTIPART_SIZE)))

    await stall.held.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await assert_nothing_left(proxied)


async def test_delete_returns_the_keys_the_store_refused(proxy: FaultProxy, proxied: Store) -> None:
    result = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult>'
        b"<Error><Key>prod/job/b.dump</Key><Code>AccessDenied</Code>"
        b"<Message>Access Denied</Message></Error></DeleteResult>"
    )
    proxy.faults.append(Fault(is_delete_objects, status=200, body=result))

    assert await proxied.delete(["job/a.dump", "job/b.dump"]) == ["job/b.dump"]


async def test_delete_sends_batches_of_at_most_1000_keys(proxy: FaultProxy, proxied: Store) -> None:
    keys = [f"job/{n:05}.dump" for n in range(2500)]

    assert await proxied.delete(keys) == []

    assert proxy.count(is_delete_objects) == 3


async def test_part_size_below_the_s3_minimum_is_refused(s3_server: str, s3_bucket: str) -> None:
    config = s3_config(s3_server, s3_bucket, part_size=MiB)

    with pytest.raises(StorageError, match="part_size"):
        await open_store(config)


async def test_config_without_credentials_uses_the_default_chain(
    s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    config = s3_config(s3_server, s3_bucket, access_key_id=None, secret_access_key=None)
    store = await open_store(config, s3_retry=NO_WAIT_RETRY)
    try:
        await store.check()
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("endpoint", "checksum", "unsigned"),
    [
        ("https://s3.example.invalid", "crc32", True),
        ("", "crc32", True),  # AWS itself: https
        ("https://s3.example.invalid", "md5", False),  # botocore skips it for Content-MD5
        ("http://127.0.0.1:9", "crc32", False),  # no TLS: SigV4 signs every body
    ],
)
async def test_bodies_are_hashed_for_the_signature_only_without_tls_or_a_checksum(
    endpoint: str, checksum: str, unsigned: bool
) -> None:
    """botocore signs each part's SHA-256 on the event loop unless told not to; over
    TLS the CRC32 header already protects the body. (No TLS store here: the client's
    settings are checked, not a request.)"""
    store = await open_store(
        s3_config(endpoint, "b", checksum=checksum, access_key_id=None, secret_access_key=None),
        s3_retry=NO_WAIT_RETRY,
    )
    try:
        options = store._client.meta.config.s3  # type: ignore[attr-defined]
        assert (options.get("payload_signing_enabled") is False) == unsigned
    finally:
        await store.aclose()


# -- botocore's data for S3 alone (s3client.use_s3_data_only) ---------------------------


def _sessions() -> tuple[Any, Any]:
    from aiobotocore.session import get_session

    from backupd.storage.s3client import use_s3_data_only

    whole, lean = get_session(), get_session()
    assert use_s3_data_only(lean)  # this botocore's internals are the ones it knows
    return whole, lean


def _outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except Exception as exc:  # the same error, as much as the same answer
        return type(exc).__name__


def test_lean_endpoint_data_resolves_s3_exactly_as_the_whole_file() -> None:
    whole, lean = _sessions()
    full = whole._get_internal_component("endpoint_resolver")
    s3_only = lean._get_internal_component("endpoint_resolver")
    assert full is not s3_only
    regions = {
        region for partition in full._endpoint_data["partitions"] for region in partition["regions"]
    } | {"aws-global", "us-east-1", "eu-west-1", "garage", "localhost"}
    assert len(regions) > 30
    for region in sorted(regions):
        for dualstack in (False, True):
            for fips in (False, True):
                args = ("s3", region)
                kwargs = {"use_dualstack_endpoint": dualstack, "use_fips_endpoint": fips}
                ours = _outcome(s3_only.construct_endpoint, *args, **kwargs)
                theirs = _outcome(full.construct_endpoint, *args, **kwargs)
                assert ours == theirs, (region, dualstack, fips)
        assert _outcome(s3_only.get_partition_for_region, region) == _outcome(
            full.get_partition_for_region, region
        )
    assert s3_only.get_available_endpoints("s3") == full.get_available_endpoints("s3")
    assert s3_only.get_available_partitions() == full.get_available_partitions()
    # and it holds only S3: the other services are what it leaves out
    assert full.get_available_endpoints("ec2") and not s3_only.get_available_endpoints("ec2")


def test_the_lean_loader_finds_and_loads_s3_models_as_botocore_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import UnknownServiceError

    from backupd.storage.s3client import S3DataLoader

    whole, lean = _sessions()
    full, s3_only = whole.get_component("data_loader"), lean.get_component("data_loader")
    assert isinstance(s3_only, S3DataLoader) and not isinstance(full, S3DataLoader)
    assert s3_only.search_paths == full.search_paths
    for model in ("service-2", "paginators-1", "waiters-2", "endpoint-rule-set-1", "nothing-9"):
        everything = full.list_available_services(model)
        assert s3_only.list_available_services(model) == [s for s in everything if s == "s3"]
        if "s3" in everything:
            assert s3_only.load_service_model("s3", model) == full.load_service_model("s3", model)
    assert "ec2" in full.list_available_services("service-2")
    with pytest.raises(UnknownServiceError):  # the names it leaves out are unknown to it
        s3_only.load_service_model("ec2", "service-2")
    # AWS_DATA_PATH is searched first, as botocore does: a model there is the one loaded
    custom = tmp_path / "s3" / "2006-03-01"
    custom.mkdir(parents=True)
    (custom / "paginators-1.json").write_text('{"pagination": {"Custom": {}}}')
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    whole, lean = _sessions()
    loaded = lean.get_component("data_loader").load_service_model("s3", "paginators-1")
    assert loaded["pagination"]["Custom"] == {}  # (with botocore's extras merged in)
    assert loaded == whole.get_component("data_loader").load_service_model("s3", "paginators-1")


async def test_clients_on_lean_endpoint_data_are_the_same_clients() -> None:
    keys = {"aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "secret"}
    for endpoint_url, region in [
        ("http://127.0.0.1:9000", "us-east-1"),
        ("https://s3.example.net", "garage"),
        (None, "eu-central-1"),
        (None, "us-east-1"),
        (None, "cn-north-1"),
    ]:
        seen = []
        for session in _sessions():
            async with session.create_client(
                "s3", region_name=region, endpoint_url=endpoint_url, **keys
            ) as client:
                url = await client.generate_presigned_url(
                    "get_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=60
                )
                seen.append((client.meta.endpoint_url, client.meta.region_name, url.split("?")[0]))
        assert seen[0] == seen[1], (endpoint_url, region)


def test_a_broken_endpoints_file_is_left_to_botocore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A custom data path (AWS_DATA_PATH) whose endpoints.json does not parse: the
    session is left as it is, for botocore's own reading to report."""
    from aiobotocore.session import get_session

    from backupd.storage.s3client import use_s3_data_only

    (tmp_path / "endpoints.json").write_text("{not json")
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    session = get_session()
    assert use_s3_data_only(session) is False
    with pytest.raises(ValueError):
        session._get_internal_component("endpoint_resolver")
