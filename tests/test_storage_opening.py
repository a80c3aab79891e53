"""A store still opening (`OpeningStore`) and the pool that opens stores in the background.

A backup's dump starts while its store opens (S3: ~0.4 s of imports and client set-up);
what it writes meanwhile is held, up to `EARLY_BYTES`, and reaches the store in order.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backupd.config.file import load_config
from backupd.config.model import FilesystemStorage
from backupd.daemon import runner as runner_module
from backupd.daemon.events import RunChange
from backupd.daemon.runner import Runner, StorePool
from backupd.errors import StorageError
from backupd.operations.backup import Trigger
from backupd.storage import Store, open_store
from backupd.storage.opening import EARLY_BYTES, OpeningStore
from tests.configs import ConfigFile

MiB = 1 << 20


class Gate:
    """An opening of a real filesystem store that waits until the test lets it go."""

    def __init__(self, cfg: FilesystemStorage, error: StorageError | None = None) -> None:
        self.cfg, self.error = cfg, error
        self.go = asyncio.Event()
        self.task: asyncio.Task[Store] = asyncio.create_task(self._open())

    async def _open(self) -> Store:
        await self.go.wait()
        if self.error is not None:
            raise self.error
        return await open_store(self.cfg)


@pytest.fixture
async def gate(tmp_path: Path) -> AsyncIterator[Gate]:
    gate = Gate(FilesystemStorage(name="local", path=str(tmp_path / "store")))
    yield gate
    gate.go.set()
    store = await gate.task
    await store.aclose()


def chunks(n: int, size: int = 256 << 10) -> list[bytes]:
    return [bytes([i % 251]) * size for i in range(n)]


async def test_an_upload_holds_its_first_bytes_while_the_store_opens(
    gate: Gate, tmp_path: Path
) -> None:
    store = OpeningStore("local", gate.task)
    upload = await store.open_upload("app/x.dump")
    held = chunks(EARLY_BYTES // (256 << 10))
    for chunk in held:  # none of these waits for the store
        await asyncio.wait_for(upload.write(chunk), timeout=5)
    assert not (tmp_path / "store").exists()  # nothing reached it yet
    more = asyncio.create_task(upload.write(b"after"))  # over EARLY_BYTES: waits
    done, _ = await asyncio.wait([more], timeout=0.2)
    assert not done
    gate.go.set()
    await more
    assert await upload.complete() == EARLY_BYTES + 5
    data = (tmp_path / "store" / "app" / "x.dump").read_bytes()
    assert hashlib.sha256(data).digest() == hashlib.sha256(b"".join([*held, b"after"])).digest()
    # once open, the store's own uploads and calls
    assert await store.read_bytes("app/x.dump") == data
    assert [o.key for o in await store.list("app/")] == ["app/x.dump"]
    assert b"".join([c async for c in store.open_read("app/x.dump", 1 * MiB)]) == data


async def test_a_failed_opening_fails_the_upload_and_every_call(tmp_path: Path) -> None:
    why = StorageError("filesystem storage local: cannot create /nowhere: Permission denied")
    gate = Gate(FilesystemStorage(name="local", path=str(tmp_path / "s")), error=why)
    store = OpeningStore("local", gate.task)
    upload = await store.open_upload("app/x.dump")
    await upload.write(b"held")
    gate.go.set()
    with pytest.raises(StorageError, match="Permission denied"):
        await upload.complete()
    with pytest.raises(StorageError, match="already completed or aborted"):
        await upload.write(b"more")  # the failure aborted it
    for call in (store.open_upload("app/y.dump"), store.list(""), store.put_bytes("k", b"")):
        with pytest.raises(StorageError, match="Permission denied"):
            await call
    assert not (tmp_path / "s").exists()


async def test_an_abort_before_the_store_opens_leaves_nothing(gate: Gate, tmp_path: Path) -> None:
    store = OpeningStore("local", gate.task)
    upload = await store.open_upload("app/x.dump")
    await upload.write(b"held")
    await upload.abort()
    with pytest.raises(StorageError, match="already completed or aborted"):
        await upload.write(b"more")
    gate.go.set()
    await gate.task
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == []


async def test_an_abort_while_the_held_bytes_wait_for_the_store(gate: Gate, tmp_path: Path) -> None:
    store = OpeningStore("local", gate.task)
    upload = await store.open_upload("app/x.dump")
    for chunk in chunks(EARLY_BYTES // (256 << 10)):
        await upload.write(chunk)
    writer = asyncio.create_task(upload.complete())  # waits for the store
    await asyncio.wait([writer], timeout=0.05)
    await upload.abort()
    gate.go.set()
    with pytest.raises(StorageError, match="aborted"):
        await writer
    assert sorted(p.name for p in (tmp_path / "store").rglob("*") if p.is_file()) == []


async def test_the_pool_shares_an_opening_and_forgets_a_failed_one(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the store's directory should be")
    cfg = FilesystemStorage(name="local", path=str(blocker / "store"))
    pool = StorePool()
    try:
        early = pool.opening(cfg)
        assert isinstance(early, OpeningStore)
        with pytest.raises(StorageError, match="cannot create"):
            await pool.get(cfg)
        with pytest.raises(StorageError, match="cannot create"):
            await early.list("")
        blocker.unlink()  # the cause is gone: the next call opens it
        store = await pool.get(cfg)
        assert not isinstance(store, OpeningStore)
        assert pool.opening(cfg) is store and await pool.get(cfg) is store
        both = await asyncio.gather(pool.get(cfg), pool.get(cfg))
        assert both == [store, store]
    finally:
        await pool.aclose()


async def test_a_backup_dumps_while_its_store_opens(
    monkeypatch: pytest.MonkeyPatch, sample_db: str, config_file: ConfigFile
) -> None:
    """The store opens only once the dump has written bytes (held), and the backup is whole."""
    config = load_config(config_file(sample_db))
    dumping = asyncio.Event()
    real_open = runner_module.open_store

    async def open_after_the_dump_started(cfg: FilesystemStorage, **kw: object) -> Store:
        try:
            await asyncio.wait_for(dumping.wait(), timeout=60)
        except TimeoutError:
            raise StorageError("the dump did not start before its store opened") from None
        return await real_open(cfg, **kw)  # type: ignore[arg-type]

    def observe(change: RunChange) -> None:
        if change.kind == "bytes":
            dumping.set()

    monkeypatch.setattr(runner_module, "open_store", open_after_the_dump_started)
    pool = StorePool()
    try:
        runner = Runner(config, pool, observers=[observe])
        run = await runner.wait(runner.submit("app", Trigger()))
        assert (run.state, run.error, run.attempts) == ("success", None, 1)
        assert run.manifest is not None
        store = await pool.get(config.storages["local"])
        for entry in run.manifest.objects:
            data = await store.read_bytes(run.manifest.folder + entry.key)
            assert hashlib.sha256(data).hexdigest() == entry.sha256
    finally:
        await pool.aclose()
