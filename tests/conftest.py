"""Shared fixtures: a real PostgreSQL cluster and a real (moto) S3 server.

Both are session-scoped; each test gets its own database and bucket.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import configs
from tests.daemon_proc import DaemonProcess
from tests.faultproxy import FaultProxy
from tests.helpers import BIG_SQL, moto_client, write_config
from tests.objstores import (
    ObjectStore,
    S3Target,
    StoreStartError,
    new_bucket,
    start_rgw,
    start_swift,
)
from tests.pgcluster import (
    SAMPLE_SQL,
    PgCluster,
    free_port,
    scratch_database,
    temp_cluster,
)

# Never reach for instance metadata or real AWS from a test.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ["BACKUPD_TEST_AWS_KEY"] = "testing"
os.environ["BACKUPD_TEST_AWS_SECRET"] = "testing-secret"
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    yield from temp_cluster("backupd-pg-")


@pytest.fixture
def sample_db(pg: PgCluster) -> Iterator[str]:
    """A fresh database with a few tables, a schema, a view and indexes."""
    yield from scratch_database(pg, SAMPLE_SQL, "app_")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new empty bucket on the moto server."""
    name = "bkt-" + uuid.uuid4().hex[:12]
    moto_client(s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_client(s3_server: str):  # type: ignore[no-untyped-def]
    return moto_client(s3_server)


@pytest.fixture
def pg_password_file(tmp_path: Path, pg: PgCluster) -> Path:
    path = tmp_path / "pg-password"
    path.write_text(pg.password + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def config_file(
    request: pytest.FixtureRequest, tmp_path: Path, pg: PgCluster, pg_password_file: Path
) -> configs.ConfigFile:
    """`config_file(database, **keys)`: `helpers.write_config` for this test's cluster and
    password file, written to `tmp_path / "b.toml"` unless `path=` says otherwise, with the
    filesystem store in `tmp_path / "store"` unless `fs_path=` says otherwise (None: none);
    `s3=True` adds the test's moto bucket (`s3_server`, `s3_bucket`)."""

    def write(
        database: str,
        *,
        path: Path | None = None,
        fs_path: Path | None = tmp_path / "store",
        s3: tuple[str, str] | bool | None = None,
        **keys: Any,
    ) -> Path:
        if s3 is True:
            s3 = (request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket"))
        return write_config(
            path or tmp_path / "b.toml",
            pg,
            password_file=pg_password_file,
            database=database,
            fs_path=fs_path,
            s3=s3 or None,
            **keys,
        )

    return write


@pytest.fixture(scope="module")
def big_db(pg: PgCluster) -> Iterator[str]:
    """A database whose uncompressed dump spans several 5 MiB S3 parts (`BIG_SQL`);
    read-only, shared by the module."""
    yield from scratch_database(pg, BIG_SQL, "big_")


@pytest.fixture
def proxy(s3_server: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the moto server (`tests/faultproxy.py`)."""
    with FaultProxy(s3_server, seed=8) as fp:
        yield fp


@pytest.fixture
def proxied_config(
    tmp_path: Path, config_file: configs.ConfigFile, s3_bucket: str
) -> configs.ConfigFile:
    """`proxied_config(database, endpoint=proxy.url, **keys)`: a config whose store
    `offsite` is `s3_bucket` behind a proxy (path-style addressing, which the proxy needs),
    written to `tmp_path / "backupd.toml"`."""

    def write(
        database: str,
        *,
        endpoint: str,
        bucket: str = s3_bucket,
        fs_path: Path | None = None,
        **keys: Any,
    ) -> Path:
        extra = configs.merge({"addressing_style": "path"}, keys.pop("s3_extra", None))
        path = tmp_path / "backupd.toml"
        s3 = (endpoint, bucket)
        return config_file(database, path=path, fs_path=fs_path, s3=s3, s3_extra=extra, **keys)

    return write


def _object_store(kind: str) -> Iterator[ObjectStore]:
    """Start a real store for the session; failing to start is an error, never a skip."""
    base = Path(tempfile.mkdtemp(prefix=f"backupd-{kind}-"))
    try:
        store = (start_rgw if kind == "rgw" else start_swift)(base)
    except StoreStartError as exc:
        pytest.fail(f"{kind} did not start (state kept in {base}): {exc}", pytrace=False)
    print(f"\n{kind} started in {store.startup_seconds:.1f}s")  # shown with -s
    try:
        yield store
    finally:
        store.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def rgw_server() -> Iterator[ObjectStore]:
    """Ceph RGW 16.2 (one monitor, one OSD) on loopback, http and https with a private CA."""
    yield from _object_store("rgw")


@pytest.fixture(scope="session")
def swift_server() -> Iterator[ObjectStore]:
    """OpenStack Swift 2.30 with s3api and tempauth on loopback."""
    yield from _object_store("swift")


@pytest.fixture
def rgw_bucket(rgw_server: ObjectStore) -> S3Target:
    return new_bucket(rgw_server, "BACKUPD_TEST_RGW_KEY", "BACKUPD_TEST_RGW_SECRET")


@pytest.fixture
def rgw_https_bucket(rgw_server: ObjectStore) -> S3Target:
    return new_bucket(rgw_server, "BACKUPD_TEST_RGW_KEY", "BACKUPD_TEST_RGW_SECRET", https=True)


@pytest.fixture
def swift_bucket(swift_server: ObjectStore) -> S3Target:
    return new_bucket(swift_server, "BACKUPD_TEST_SWIFT_KEY", "BACKUPD_TEST_SWIFT_SECRET")


@pytest.fixture
def moto_bucket(s3_server: str, s3_bucket: str) -> S3Target:
    return S3Target("moto", s3_server, s3_bucket, "BACKUPD_TEST_AWS_KEY", "BACKUPD_TEST_AWS_SECRET")


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """`backupd run` subprocesses a test starts (append them): each is stopped at the end
    (SIGTERM, then SIGKILL after 30 s), whether it still runs or already exited."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.stop()


@pytest.fixture
def no_backoff() -> Iterator[None]:
    """Notification retries (stamina) happen, 3 attempts, without their backoff sleeps."""
    import stamina

    with stamina.set_testing(True, attempts=3):
        yield
