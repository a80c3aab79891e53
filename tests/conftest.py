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

import pytest

from tests.pgcluster import SAMPLE_SQL, PgCluster, free_port, make_cluster

# Never reach for instance metadata or real AWS from a test.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ["BACKUPD_TEST_AWS_KEY"] = "testing"
os.environ["BACKUPD_TEST_AWS_SECRET"] = "testing-secret"
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    base = Path(tempfile.mkdtemp(prefix="backupd-pg-"))
    os.chmod(base, 0o755)
    cluster = make_cluster(base / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sample_db(pg: PgCluster) -> Iterator[str]:
    """A fresh database with a few tables, a schema, a view and indexes."""
    name = "app_" + uuid.uuid4().hex[:8]
    pg.createdb(name)
    pg.psql(SAMPLE_SQL, name)
    yield name
    pg.dropdb(name)


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
    import boto3

    name = "bkt-" + uuid.uuid4().hex[:12]
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_client(s3_server: str):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
    )


@pytest.fixture
def pg_password_file(tmp_path: Path, pg: PgCluster) -> Path:
    path = tmp_path / "pg-password"
    path.write_text(pg.password + "\n")
    path.chmod(0o600)
    return path
