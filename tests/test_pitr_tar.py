"""The base backup's tar stream is hostile input: only plain files and directories inside DIR."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import pytest

from backupd.errors import BackupdError
from backupd.operations.pitr import _extract_tar


def _tar(members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """(name, data or None for a directory, type) -> a tar archive."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc"
            if data is not None and kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _extract(data: bytes, directory: Path) -> None:
    r, w = os.pipe()

    def feed() -> None:
        try:
            os.write(w, data)
        except BrokenPipeError:
            pass
        finally:
            os.close(w)

    t = threading.Thread(target=feed)
    t.start()
    try:
        _extract_tar(r, directory)
    finally:
        t.join(10)


def test_a_plain_data_directory_is_extracted(tmp_path: Path) -> None:
    data = _tar(
        [
            ("PG_VERSION", b"15\n", tarfile.REGTYPE),
            ("./pg_wal/", None, tarfile.DIRTYPE),
            ("pg_wal/000000010000000000000002", b"w" * 100, tarfile.REGTYPE),
        ]
    )
    _extract(data, tmp_path)
    assert (tmp_path / "PG_VERSION").read_bytes() == b"15\n"
    assert (tmp_path / "pg_wal/000000010000000000000002").stat().st_size == 100


@pytest.mark.parametrize(
    ("name", "kind", "why"),
    [
        ("../escaped", tarfile.REGTYPE, "unsafe path"),
        ("/etc/escaped", tarfile.REGTYPE, "unsafe path"),
        ("base/../../escaped", tarfile.REGTYPE, "unsafe path"),
        ("pg_tblspc/16384", tarfile.SYMTYPE, "not a plain file"),
        ("dev", tarfile.CHRTYPE, "not a plain file"),
    ],
)
def test_a_hostile_member_stops_the_restore(
    tmp_path: Path, name: str, kind: bytes, why: str
) -> None:
    target = tmp_path / "data"
    target.mkdir()
    data = _tar([("PG_VERSION", b"15\n", tarfile.REGTYPE), (name, b"x", kind)])
    with pytest.raises(BackupdError, match=why):
        _extract(data, target)
    assert not (tmp_path / "escaped").exists()
    assert not Path("/etc/escaped").exists()
    assert not (target / "pg_tblspc").exists()


def test_the_same_file_twice_is_refused(tmp_path: Path) -> None:
    data = _tar(
        [("PG_VERSION", b"15\n", tarfile.REGTYPE), ("PG_VERSION", b"16\n", tarfile.REGTYPE)]
    )
    with pytest.raises(BackupdError, match="twice"):
        _extract(data, tmp_path)
