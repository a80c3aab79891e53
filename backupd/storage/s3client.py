"""The aiobotocore client of one S3 store: credentials, TLS, timeouts, compatibility.

botocore's own retries are off (the store retries each request itself); every
request has a connect and a read timeout, and its socket a TCP user timeout,
so a hung store fails requests instead of holding them. Checksums are sent
only when required (S3-compatible stores often lack the newer defaults), and
DeleteObjects carries the Content-MD5 that older stores demand.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import socket
import ssl
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import botocore.exceptions as botocore_errors
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.loaders import Loader

from backupd.config.model import S3Storage
from backupd.errors import StorageError
from backupd.storage.base import MiB


async def open_client(cfg: S3Storage, exit_stack: AsyncExitStack) -> Any:
    """Resolve the secrets, check the CA bundle, and enter a client on `exit_stack`."""
    credentials = await asyncio.to_thread(_credentials, cfg)
    if cfg.ca_bundle:
        await asyncio.to_thread(_check_ca_bundle, cfg)
    s3_options: dict[str, Any] = {"addressing_style": cfg.addressing_style}
    if cfg.checksum == "crc32" and not cfg.endpoint_url.startswith("http://"):
        # Over TLS the CRC32 header protects each body: no SHA-256 of every part on
        # the event loop for the signature (botocore would skip it for Content-MD5,
        # but does not notice a checksum header set by the caller).
        s3_options["payload_signing_enabled"] = False
    config = AioConfig(
        signature_version="s3v4",
        s3=s3_options,
        retries={"total_max_attempts": 1, "mode": "standard"},  # parts are retried here
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        # One store serves concurrent runs: room for four full-speed uploads and some reads.
        max_pool_connections=4 * cfg.upload_concurrency + 4,
        connector_args={"socket_factory": _socket_factory(cfg.read_timeout)},
        # S3-compatible stores often lack the newer default CRC checksums.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = get_session()
    if credentials:  # static keys: the session makes no client but this one (no STS, SSO)
        await asyncio.to_thread(use_s3_data_only, session)
    try:
        client = await exit_stack.enter_async_context(
            session.create_client(
                "s3",
                region_name=cfg.region or None,
                endpoint_url=cfg.endpoint_url or None,
                config=config,
                # None: botocore's default, AWS_CA_BUNDLE or the system's CAs.
                verify=cfg.ca_bundle or None,
                **credentials,
            )
        )
    except (ValueError, botocore_errors.BotoCoreError) as exc:
        await exit_stack.aclose()
        raise StorageError(f"s3 storage {cfg.name}: cannot set up the client: {exc}") from exc
    client.meta.events.register("before-call.s3.DeleteObjects", _delete_objects_content_md5)
    return client


def use_s3_data_only(session: Any) -> bool:
    """Give `session` botocore's data for S3 alone; True if it took.

    Only for a session that makes no other client: with static credentials, no
    credential provider calls STS or SSO. Two things change, each answering for S3
    exactly as botocore's own (tests/test_storage_s3.py compares them):

    - The data loader checks that S3's models exist by looking at S3's directory
      alone (`S3DataLoader`), not at every service's: ~35 ms less to open a client
      and ~20 ms less for its first listing.
    - The endpoint data: botocore keeps its whole `endpoints.json` (every AWS service,
      1.2 MB of JSON) for the life of a session: ~7 MB of Python objects, 7% of a
      backup's peak memory, to resolve one service. The same file is read here, every
      partition kept whole and only the `s3` entries of its services, and handed to
      the session as its endpoint resolver.

    Where botocore's internals differ (another version), the session is left as it is.
    """
    from botocore.regions import EndpointResolver

    components = getattr(session, "_internal_components", None)
    if components is None or not hasattr(components, "register_component"):
        return False
    loader = S3DataLoader.for_session(session)
    # The file botocore would read (the first found, `.json` before `.json.gz`), parsed
    # into plain dicts: botocore's OrderedDicts would leave ~3 MB more behind once freed.
    for base, ext in itertools.product(loader.search_paths, (".json", ".json.gz")):
        path = os.path.join(base, "endpoints")
        if os.path.isfile(path + ext):
            try:
                with (gzip.open if ext == ".json.gz" else open)(path + ext, "rb") as f:
                    data = json.load(f)
            except (OSError, ValueError):  # botocore's own reading reports it
                return False
            break
    else:
        return False
    partitions = data.get("partitions") if isinstance(data, dict) else None
    if not isinstance(partitions, list) or not all(
        isinstance(p, dict) and isinstance(p.get("services", {}), dict) for p in partitions
    ):
        return False
    lean = {
        **data,
        "partitions": [
            {**p, "services": {k: v for k, v in p.get("services", {}).items() if k == "s3"}}
            for p in partitions
        ],
    }
    del data, partitions
    resolver = EndpointResolver(lean, uses_builtin_data=loader.is_builtin_path(path))
    session.register_component("data_loader", loader)
    components.register_component("endpoint_resolver", resolver)
    return True


class S3DataLoader(Loader):  # type: ignore[misc]  # botocore has no type hints
    """botocore's data loader, for a session that loads the models of S3 alone.

    Before it loads a model (`service-2`, `endpoint-rule-set-1`, `paginators-1`),
    botocore's loader lists the services that have one, to refuse an unknown name: it
    looks into every service directory of every search path (~400 in botocore's data,
    ~20 ms a model type). This one looks into S3's only: the same answer for `s3`, and
    no other service (their names are unknown to it).
    """

    SERVICES = ("s3",)

    @classmethod
    def for_session(cls, session: Any) -> S3DataLoader:
        """The loader botocore would make for `session` (its AWS_DATA_PATH), of this class."""
        paths = session.get_config_variable("data_path")
        if paths is None:
            return cls()
        return cls(
            extra_search_paths=[
                os.path.expanduser(os.path.expandvars(path)) for path in paths.split(os.pathsep)
            ]
        )

    def list_available_services(self, type_name: str) -> list[str]:
        found = set()
        for base, name in itertools.product(self.search_paths, self.SERVICES):
            service = os.path.join(base, name)
            if os.path.isdir(service) and any(
                self.file_loader.exists(os.path.join(service, version, type_name))
                for version in os.listdir(service)
            ):
                found.add(name)
        return sorted(found)


def _socket_factory(read_timeout: float) -> Callable[[Any], socket.socket]:
    """Sockets that the kernel drops once what they sent stays unacknowledged (or the
    peer's window stays shut) for `read_timeout` (TCP_USER_TIMEOUT, Linux).

    A request given up on a store that stopped reading cannot close its
    connection cleanly (asyncio waits to flush the unsent body first): without
    this, every such request would keep a socket and its buffers for as long as
    the store stays hung.
    """

    def make(addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=type_, proto=proto)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(read_timeout * 1000))
                )
        return sock

    return make


def _credentials(cfg: S3Storage) -> dict[str, str]:
    """Static credentials from the config's secrets; empty: botocore's default chain."""
    if cfg.access_key_id is None and cfg.secret_access_key is None:
        return {}
    if cfg.access_key_id is None or cfg.secret_access_key is None:
        raise StorageError(
            f"s3 storage {cfg.name}: set both access_key_id and secret_access_key, or neither"
        )
    return {
        "aws_access_key_id": cfg.access_key_id.resolve(),
        "aws_secret_access_key": cfg.secret_access_key.resolve(),
    }


def _check_ca_bundle(cfg: S3Storage) -> None:
    """`ca_bundle` must be a readable PEM file of CA certificates (checked before use)."""
    where = f"s3 storage {cfg.name}: ca_bundle {cfg.ca_bundle}"
    try:
        with open(cfg.ca_bundle, "rb") as f:
            text = f.read(16 * MiB)
        ssl.create_default_context(cafile=cfg.ca_bundle)
    except ssl.SSLError as exc:  # before OSError, its base class
        raise StorageError(f"{where}: not a PEM file of CA certificates ({exc})") from exc
    except OSError as exc:
        raise StorageError(f"{where}: cannot read it: {exc.strerror or exc}") from exc
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise StorageError(f"{where}: holds no PEM certificate")


def _delete_objects_content_md5(params: dict[str, Any], **_: Any) -> None:
    """DeleteObjects carries a Content-MD5 of its XML body, not botocore's CRC32 header.

    The operation requires an integrity header. botocore >= 1.36 sends
    x-amz-checksum-crc32 even with `request_checksum_calculation="when_required"`,
    and stores that predate flexible checksums (Swift's s3api, MinIO and Ceph
    releases of that era) refuse it: "Missing required header for this request:
    Content-MD5". AWS accepts either, so every DeleteObjects sends Content-MD5.
    """
    body = params.get("body")
    if not isinstance(body, bytes | bytearray):
        return
    params["headers"]["Content-MD5"] = base64.b64encode(
        hashlib.md5(body, usedforsecurity=False).digest()
    ).decode()
    checksum = params.get("context", {}).get("checksum", {})
    checksum.pop("request_algorithm", None)  # botocore then adds no x-amz-checksum-* header
    checksum.pop("request_algorithm_header", None)
