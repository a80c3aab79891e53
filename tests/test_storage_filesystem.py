"""Filesystem storage: private modes, no half-written files, nothing outside the root."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from backupd.config.model import FilesystemStorage
from backupd.errors import NotFound, StorageError
from backupd.storage import IncompleteUpload, base, filesystem, open_store
from backupd.storage.filesystem import FilesystemStore, open_filesystem_store

MiB = 1024 * 1024


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FilesystemStore]:
    opened = await open_filesystem_store(FilesystemStorage(name="local", path=str(tmp_path / "s")))
    yield opened
    await opened.aclose()


async def test_root_directories_and_files_are_private(tmp_path: Path) -> None:
    root = tmp_path / "var" / "backups" / "backupd"
    store = await open_store(FilesystemStorage(name="local", path=str(root)))

    await store.put_bytes("app/2024/01/02/app.manifest.json", b"{}")

    assert [mode(p) for p in (tmp_path / "var", tmp_path / "var" / "backups", root)] == [0o700] * 3
    assert mode(root / "app") == 0o700
    assert mode(root / "app" / "2024" / "01" / "02") == 0o700
    assert mode(root / "app" / "2024" / "01" / "02" / "app.manifest.json") == 0o600
    await store.aclose()


@pytest.fixture
def fdatasyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every os.fdatasync call (the real one still runs), with EARLY_SYNC at 4 MiB."""
    calls: list[int] = []
    real = os.fdatasync
    running = [0]

    def counted(fd: int) -> None:
        calls.append(fd)
        running[0] += 1
        try:
            assert running[0] == 1, "two fdatasyncs at once"
            real(fd)
        finally:
            running[0] -= 1

    monkeypatch.setattr(filesystem, "EARLY_SYNC", 4 * MiB)
    monkeypatch.setattr(os, "fdatasync", counted)
    return calls


async def test_a_large_upload_is_flushed_while_it_is_written(
    store: FilesystemStore, fdatasyncs: list[int]
) -> None:
    data = os.urandom(21 * MiB)
    upload = await store.open_upload("app/big.dump")
    for start in range(0, len(data), MiB):
        await upload.write(data[start : start + MiB])
    synced_while_writing = len(fdatasyncs)

    assert await upload.complete() == len(data)

    # About one per 4 MiB when the disk keeps up (fewer when one fdatasync spans
    # several writes on a busy machine), never more than one at a time (the fixture).
    assert 1 <= synced_while_writing <= 5
    assert (store.root / "app" / "big.dump").read_bytes() == data


async def test_a_failed_background_flush_fails_the_upload(
    store: FilesystemStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel reports a writeback error once: the final fsync would not see it again."""

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(filesystem, "EARLY_SYNC", 2 * MiB)
    monkeypatch.setattr(os, "fdatasync", eio)
    upload = await store.open_upload("app/big.dump")

    with pytest.raises(StorageError, match="input/output error") as failed:
        for _ in range(8):
            await upload.write(os.urandom(MiB))
        await upload.complete()

    assert str(store.root / "app" / "big.dump") in str(failed.value)
    assert all_files(store.root) == []


@pytest.fixture
def file_size_limit() -> Iterator[int]:
    """Limit file sizes for this process so a write fails for real (EFBIG)."""
    limit = 2 * MiB
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


async def test_failed_write_is_a_clear_error_and_leaves_no_temp_file(
    store: FilesystemStore, file_size_limit: int
) -> None:
    upload = await store.open_upload("app/big.dump")

    with pytest.raises(StorageError) as failed:
        for _ in range(file_size_limit // MiB + 1):
            await upload.write(os.urandom(MiB))

    assert str(store.root / "app" / "big.dump") in str(failed.value)
    assert "file too large" in str(failed.value)
    assert all_files(store.root) == []
    await upload.abort()  # already discarded: a no-op


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, to fill up for real; skipped where mounting is not allowed."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


async def test_full_disk_names_the_path_and_leaves_no_temp_file(tiny_filesystem: Path) -> None:
    store = await open_store(FilesystemStorage(name="local", path=str(tiny_filesystem)))
    upload = await store.open_upload("app/big.dump")

    with pytest.raises(StorageError) as failed:
        for _ in range(4):
            await upload.write(os.urandom(MiB))
        await upload.complete()

    assert f"{tiny_filesystem}/app/big.dump: no space left on device" in str(failed.value)
    assert all_files(tiny_filesystem) == []
    await store.aclose()


@pytest.mark.parametrize("key", ["../evil", "a/../../evil", "/tmp/evil", "a/.x.partial-1"])
async def test_keys_cannot_reach_outside_the_root_or_temp_files(
    store: FilesystemStore, tmp_path: Path, key: str
) -> None:
    with pytest.raises(StorageError):
        await store.put_bytes(key, b"x")
    with pytest.raises(StorageError):
        await store.delete([key])

    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert all_files(store.root) == []


async def test_delete_prunes_empty_directories_up_to_the_root(store: FilesystemStore) -> None:
    await store.put_bytes("job/2024/01/a.dump", b"a")
    await store.put_bytes("job/2024/02/b.dump", b"b")

    await store.delete(["job/2024/01/a.dump"])
    assert sorted(p.name for p in (store.root / "job" / "2024").iterdir()) == ["02"]

    await store.delete(["job/2024/02/b.dump"])
    assert store.root.is_dir()
    assert list(store.root.iterdir()) == []


async def test_aborted_upload_prunes_the_directories_it_made(store: FilesystemStore) -> None:
    upload = await store.open_upload("job/2024/03/c.dump")
    await upload.write(b"partial")

    await upload.abort()

    assert list(store.root.iterdir()) == []


async def test_a_directory_is_not_an_object(store: FilesystemStore) -> None:
    await store.put_bytes("job/a.dump", b"a")

    with pytest.raises(NotFound):
        await store.read_bytes("job")


async def test_crashed_upload_reports_when_it_was_last_written(store: FilesystemStore) -> None:
    upload = await store.open_upload("job/x.dump")
    await upload.write(os.urandom(2 * MiB))

    [leftover] = await store.list_incomplete_uploads()

    assert leftover.key == "job/x.dump"
    assert abs(datetime.now(UTC) - leftover.started) < timedelta(minutes=1)
    await upload.abort()


async def test_sweeping_refuses_to_remove_a_complete_object(store: FilesystemStore) -> None:
    await store.put_bytes("job/a.dump", b"a")
    forged = IncompleteUpload(key="job/a.dump", upload_id="job/a.dump", started=datetime.now(UTC))

    with pytest.raises(StorageError):
        await store.abort_incomplete(forged)

    assert await store.read_bytes("job/a.dump") == b"a"


async def test_check_fails_clearly_when_the_root_is_gone(store: FilesystemStore) -> None:
    store.root.rmdir()  # e.g. the backup disk was unmounted

    with pytest.raises(StorageError, match="no such file or directory"):
        await store.check()


async def test_a_root_that_is_a_file_is_refused_at_open(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")

    with pytest.raises(StorageError, match="not-a-dir"):
        await open_store(FilesystemStorage(name="local", path=str(tmp_path / "not-a-dir")))


async def test_a_write_stuck_in_the_kernel_bounds_abort_and_removes_the_file_later(
    store: FilesystemStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung disk: the write thread cannot be interrupted. abort() returns at the
    deadline (once for the upload, however many callers), and the temporary file
    goes as soon as the write returns."""
    deadline = 0.5
    monkeypatch.setattr(base, "CLEANUP_DEADLINE", deadline)
    entered, released = threading.Event(), threading.Event()
    write = filesystem._PartialFile.write

    def stuck(self: filesystem._PartialFile, chunks: list[bytes]) -> None:
        entered.set()
        released.wait(30)
        write(self, chunks)

    monkeypatch.setattr(filesystem._PartialFile, "write", stuck)
    upload = await store.open_upload("app/stuck.dump")
    writer = asyncio.create_task(upload.write(b"x" * filesystem.WRITE_BATCH))
    async with asyncio.timeout(10):
        while not entered.is_set():
            await asyncio.sleep(0.01)  # until the write is in its worker thread
    try:
        with structlog.testing.capture_logs() as logs:
            writer.cancel()
            started = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await writer
            first = time.monotonic() - started
            started = time.monotonic()
            await upload.abort()
            second = time.monotonic() - started

        assert deadline <= first < deadline + 2
        assert second < 0.2
        assert [e["event"] for e in logs] == ["upload_abort_overdue"]
        assert len(all_files(store.root)) == 1  # the temporary file, until the write returns
    finally:
        released.set()
    async with asyncio.timeout(10):
        while all_files(store.root):
            await asyncio.sleep(0.02)
