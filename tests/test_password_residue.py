"""The database password never lands on disk, even when backupd is killed (issue 12, finding 6).

`backupd backup` is killed with real signals at each stage of a run (the
dump started; pg_dump waiting on a lock, so the password file is in use),
then the disk is searched for the password: the runtime and temp
directories, /dev/shm and everything written under /tmp since the test began.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO

import pytest

from tests.helpers import BACKUPD, write_config
from tests.pgcluster import PgCluster, wait_for


class Backup:
    """A `backupd backup` subprocess whose JSON log events are read as they come."""

    def __init__(self, cfg: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*BACKUPD, "backup", "app", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
        )
        self.events: list[str] = []
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            try:
                self.events.append(json.loads(line).get("event", ""))
            except ValueError:
                continue

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except OSError:
            return []

    def kill(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def locked_table(pg: PgCluster, sample_db: str) -> Iterator[None]:
    """Another session holds an ACCESS EXCLUSIVE lock: pg_dump waits on it, mid-run."""
    import asyncio

    import asyncpg

    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(pg.dsn(sample_db), password=pg.password))
    loop.run_until_complete(conn.execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE"))
    try:
        yield
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


def files_holding(secret: bytes, roots: list[Path], since: float) -> list[Path]:
    """Regular files under `roots` modified since `since` that contain `secret` (bounded)."""
    found: list[Path] = []
    checked = 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                try:
                    st = path.lstat()
                    if not path.is_file() or path.is_symlink() or st.st_mtime < since:
                        continue
                    if st.st_size > 64 << 20:
                        continue
                    checked += 1
                    if secret in path.read_bytes() and path not in found:
                        found.append(path)
                except OSError:
                    continue
                if checked > 20000:
                    return found
    return found


@pytest.fixture
def own_role(pg: PgCluster) -> Iterator[PgCluster]:
    """A role of this test's own with a password no other file on this machine holds."""
    role = replace(pg, user="bk_" + secrets.token_hex(4), password=secrets.token_urlsafe(24))
    pg.psql(f"CREATE ROLE {role.user} LOGIN SUPERUSER PASSWORD '{role.password}'")
    yield role
    pg.psql(f"DROP ROLE {role.user}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("stage", ["backup_started", "dump_waiting_on_lock"])
def test_killed_backup_leaves_no_password_on_disk(
    pg: PgCluster,
    sample_db: str,
    tmp_path: Path,
    locked_table: None,
    own_role: PgCluster,
    stage: str,
    sig: int,
) -> None:
    since = time.time() - 1
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    role = own_role
    password_file = tmp_path / "role-password"
    password_file.write_text(role.password + "\n")
    password_file.chmod(0o600)
    cfg = write_config(
        tmp_path / "b.toml",
        role,
        password_file=password_file,
        database=sample_db,
        fs_path=tmp_path / "store",
    )
    run = Backup(cfg, {"RUNTIME_DIRECTORY": str(runtime), "TMPDIR": str(tmp_path)})
    try:
        wait_for(lambda: "backup_started" in run.events, 30, what="the backup to start")
        if stage == "dump_waiting_on_lock":

            def waiting() -> bool:
                rows = pg.psql(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'backupd' "
                    "AND wait_event_type = 'Lock'",
                    sample_db,
                )
                return int(rows) >= 1

            wait_for(waiting, 30, what="pg_dump to wait on the lock")
            assert "backup_published" not in run.events
            # While it runs, the password file pg_dump reads is an inherited memory file.
            (child,) = [
                pid
                for pid in run.children()
                if Path(f"/proc/{pid}/comm").read_text().strip() == "pg_dump"
            ]
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            passfile = next(v for v in environ if v.startswith(b"PGPASSFILE="))
            assert passfile.startswith(b"PGPASSFILE=/dev/fd/")
            fd = passfile.split(b"/")[-1].decode()
            assert os.readlink(f"/proc/{child}/fd/{fd}").startswith("/memfd:")
        run.kill(sig)
    finally:
        if run.proc.poll() is None:
            run.kill(signal.SIGKILL)
    roots = [tmp_path, Path("/tmp"), Path("/dev/shm"), Path("/var/tmp")]
    # the only file holding it is the config's secret file
    assert files_holding(role.password.encode(), roots, since) == [password_file]
