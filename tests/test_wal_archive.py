"""wal-push / wal-fetch: stored once, checked, never overwritten with other bytes."""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from backupd.config.model import FilesystemStorage
from backupd.errors import NotFound
from backupd.operations.wal import prefetch
from backupd.storage.filesystem import FilesystemStore
from backupd.stream.age import generate_identity
from tests.helpers import run_cli

SEGMENT = "000000010000000000000007"


def _config(tmp_path: Path, extra: str = "", s3: tuple[str, str] | None = None) -> Path:
    (tmp_path / "pw").write_text("x\n")
    (tmp_path / "pw").chmod(0o600)
    config = tmp_path / "backupd.toml"
    stores = '["local"]'
    s3_block = ""
    if s3 is not None:
        stores = '["local", "offsite"]'
        s3_block = textwrap.dedent(f"""\
        [storage.offsite]
        type = "s3"
        bucket = "{s3[1]}"
        prefix = "prod/"
        endpoint_url = "{s3[0]}"
        access_key_id = {{ env = "BACKUPD_TEST_AWS_KEY" }}
        secret_access_key = {{ env = "BACKUPD_TEST_AWS_SECRET" }}
        """)
    config.write_text(
        textwrap.dedent(f"""\
        [source.main]
        type = "postgres"
        dsn = "host=127.0.0.1 port=1 user=backup"
        password = {{ file = "{tmp_path}/pw" }}

        [storage.local]
        type = "filesystem"
        path = "{tmp_path}/store"

        """)
        + s3_block
        + textwrap.dedent(f"""\

        [job.pitr]
        source = "main"
        kind = "physical"
        storage = {stores}
        """)
        + extra
    )
    (tmp_path / "store").mkdir()
    return config


def _segment(path: Path, fill: bytes) -> Path:
    path.write_bytes(fill * (16 * 1024 * 1024 // len(fill)))
    return path


def test_push_then_fetch_round_trips_and_a_second_push_is_a_no_op(tmp_path: Path) -> None:
    config = _config(tmp_path)
    wal = _segment(tmp_path / SEGMENT, os.urandom(4096))
    assert run_cli("wal-push", "-c", str(config), "pitr", str(wal)).returncode == 0
    entry = json.loads((tmp_path / "store/pitr/wal/00000001" / f"{SEGMENT}.json").read_text())
    assert entry["raw_bytes"] == 16 * 1024 * 1024 and entry["key"] == f"{SEGMENT}.zst"
    again = run_cli("wal-push", "-c", str(config), "pitr", str(wal))
    assert again.returncode == 0, again.stderr
    out = tmp_path / "restored"
    got = run_cli("wal-fetch", "-c", str(config), "pitr", SEGMENT, str(out))
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == wal.read_bytes()


def test_a_segment_is_never_overwritten_with_different_bytes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "a").mkdir()
    first = _segment(tmp_path / "a" / SEGMENT, b"A" * 512)
    assert run_cli("wal-push", "-c", str(config), "pitr", str(first)).returncode == 0
    (tmp_path / "b").mkdir()
    other = _segment(tmp_path / "b" / SEGMENT, b"B" * 512)
    refused = run_cli("wal-push", "-c", str(config), "pitr", str(other))
    assert refused.returncode == 1
    assert "refusing to overwrite" in refused.stderr
    out = tmp_path / "restored"
    assert run_cli("wal-fetch", "-c", str(config), "pitr", SEGMENT, str(out)).returncode == 0
    assert out.read_bytes() == first.read_bytes()


def test_fetch_of_a_missing_or_corrupted_segment_fails_and_writes_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    out = tmp_path / "restored"
    missing = run_cli("wal-fetch", "-c", str(config), "pitr", SEGMENT, str(out))
    assert missing.returncode == 1 and "not in the WAL archive" in missing.stderr
    wal = _segment(tmp_path / SEGMENT, os.urandom(4096))
    assert run_cli("wal-push", "-c", str(config), "pitr", str(wal)).returncode == 0
    stored = tmp_path / "store/pitr/wal/00000001" / f"{SEGMENT}.zst"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    bad = run_cli("wal-fetch", "-c", str(config), "pitr", SEGMENT, str(out))
    assert bad.returncode == 1 and "does not match its index entry" in bad.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".restored*"))


def test_encrypted_wal_needs_the_identity(tmp_path: Path) -> None:
    secret, public = generate_identity()
    config = _config(tmp_path, f'encryption = {{ recipients = ["{public}"] }}\n')
    identity = tmp_path / "identity.txt"
    identity.write_text(secret + "\n")
    identity.chmod(0o600)
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    assert run_cli("wal-push", "-c", str(config), "pitr", str(history)).returncode == 0
    assert (tmp_path / "store/pitr/wal/00000002/00000002.history.zst.age").exists()
    out = tmp_path / "h"
    without = run_cli("wal-fetch", "-c", str(config), "pitr", "00000002.history", str(out))
    assert without.returncode == 1 and "--identity" in without.stderr
    ok = run_cli(
        "wal-fetch",
        "-c",
        str(config),
        "pitr",
        "00000002.history",
        str(out),
        "--identity",
        str(identity),
    )
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes() == history.read_bytes()


@pytest.mark.slow
def test_on_s3_too_every_store_gets_the_segment_and_either_serves_it(
    tmp_path: Path, s3_server: str, s3_bucket: str, s3_client: Any
) -> None:
    config = _config(tmp_path, s3=(s3_server, s3_bucket))
    wal = _segment(tmp_path / SEGMENT, os.urandom(4096))
    pushed = run_cli("wal-push", "-c", str(config), "pitr", str(wal))
    assert pushed.returncode == 0, pushed.stderr
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert keys == {
        f"prod/pitr/wal/00000001/{SEGMENT}.zst",
        f"prod/pitr/wal/00000001/{SEGMENT}.json",
    }
    for storage in ("offsite", "local"):
        out = tmp_path / f"from-{storage}"
        got = run_cli(
            "wal-fetch", "-c", str(config), "pitr", SEGMENT, str(out), "--storage", storage
        )
        assert got.returncode == 0, got.stderr
        assert out.read_bytes() == wal.read_bytes()
    (tmp_path / "b").mkdir()
    other = _segment(tmp_path / "b" / SEGMENT, b"B" * 512)
    refused = run_cli("wal-push", "-c", str(config), "pitr", str(other))
    assert refused.returncode == 1 and "refusing to overwrite" in refused.stderr


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"name": "000000010000000000000008"}, "names another segment"),
        ({"key": "../../../etc/passwd"}, "its key is not its own"),
        ({"compression": "rot13"}, "unknown compression"),
        ({"raw_bytes": 5}, "wrong size"),
        ({"sha256": "x" * 64}, "sha256 is not a digest"),
        ({"archived_at": "yesterday"}, "invalid"),
        ({"encrypted": "no"}, "encrypted is not a boolean"),
    ],
)
def test_a_hostile_index_entry_is_refused(tmp_path: Path, change: dict[str, Any], why: str) -> None:
    config = _config(tmp_path)
    wal = _segment(tmp_path / SEGMENT, os.urandom(4096))
    assert run_cli("wal-push", "-c", str(config), "pitr", str(wal)).returncode == 0
    index = tmp_path / "store/pitr/wal/00000001" / f"{SEGMENT}.json"
    index.write_text(json.dumps(json.loads(index.read_text()) | change))
    out = tmp_path / "restored"
    got = run_cli("wal-fetch", "-c", str(config), "pitr", SEGMENT, str(out))
    assert got.returncode == 1
    assert why in got.stderr
    assert not out.exists()


def test_fetch_prefetches_the_next_segments_checked(tmp_path: Path) -> None:
    config = _config(tmp_path)
    names = [f"0000000100000000000000{n:02X}" for n in (7, 8, 9)]
    originals = {}
    for name in names:
        originals[name] = _segment(tmp_path / name, os.urandom(4096)).read_bytes()
        assert run_cli("wal-push", "-c", str(config), "pitr", str(tmp_path / name)).returncode == 0
    cache = tmp_path / "cache"
    got = run_cli(
        "wal-fetch",
        "-c",
        str(config),
        "pitr",
        names[0],
        str(tmp_path / "first"),
        "--prefetch",
        str(cache),
    )
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "first").read_bytes() == originals[names[0]]
    assert sorted(p.name for p in cache.iterdir()) == names[1:]  # and no further
    for name in names[1:]:
        assert (cache / name).read_bytes() == originals[name]


async def test_prefetch_keeps_segments_before_a_gap_in_any_task_order(tmp_path: Path) -> None:
    """The archive lacks 0A: 08 and 09 are fetched even when 0A's miss is seen first."""
    config = _config(tmp_path)
    names = [f"0000000100000000000000{n:02X}" for n in (7, 8, 9)]
    for name in names:
        _segment(tmp_path / name, os.urandom(4096))
        assert run_cli("wal-push", "-c", str(config), "pitr", str(tmp_path / name)).returncode == 0
    missed = asyncio.Event()

    class MissFirst(FilesystemStore):
        """Reads of archived segments wait until a read has found a gap."""

        async def read_bytes(self, key: str) -> bytes:
            if any(n in key for n in names) and not missed.is_set():
                await asyncio.wait_for(missed.wait(), 10)
            try:
                return await super().read_bytes(key)
            except NotFound:
                missed.set()
                raise

    store = MissFirst(FilesystemStorage(name="local", path=str(tmp_path / "store")))
    await store.open()
    cache = tmp_path / "cache"
    assert await prefetch("pitr", store, names[0], cache, None) == 2
    assert sorted(p.name for p in cache.iterdir()) == names[1:]
