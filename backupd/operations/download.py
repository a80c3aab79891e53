"""`backupd download`: one database's dump, decrypted and decompressed, to a file or stdout.

The object is read back once (`readback.read_back`), so a download that
succeeds has also proven it intact. A file appears under its name only once
complete and checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from backupd.catalog.manifest import Manifest
from backupd.operations.readback import ReadResult, read_back
from backupd.storage.base import Store


async def download(
    store: Store,
    manifest: Manifest,
    *,
    database: str | None,
    output: str,
    identity: str | None,
    globals_: bool = False,
) -> ReadResult:
    """Write one database's dump (or the globals) to `output`, "-" for stdout."""
    entry = manifest.globals_object() if globals_ else manifest.object_for(database)
    if output == "-":
        out = os.fdopen(os.dup(1), "wb")

        async def to_stdout(data: bytes) -> None:
            await asyncio.to_thread(out.write, data)

        try:
            return await read_back(store, manifest, entry, identity, to_stdout)
        finally:
            out.close()
    path = Path(output)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:

            async def to_file(data: bytes) -> None:
                await asyncio.to_thread(f.write, data)

            result = await read_back(store, manifest, entry, identity, to_file)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return result
