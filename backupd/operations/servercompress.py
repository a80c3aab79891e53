"""Server-side compression of base backups (`compression_at = "server"`, issue 16).

PostgreSQL 15's `pg_basebackup --compress=server-zstd:N` (or server-gzip,
server-lz4) has the server compress the tar stream before it crosses the
network; backupd stores it as is, in the same codec and so the same format
as its own compression would write (restore, verify and drills read it
unchanged). Two things differ from client compression:

- with a tar to stdout pg_basebackup cannot inject its `backup_manifest` into
  an archive it did not compress ("cannot inject manifest into a compressed tar
  file"), so it runs with `--no-manifest`: backupd's own manifest (size,
  SHA-256 of the stored object, size of the decoded tar) is the integrity record;
- the decoded size is measured by decoding the stream on the side as it passes
  (a zstd decode costs a fraction of the encode), which also proves the
  server's stream decodes before it is published.

A server older than 15, or built without the codec's library, cannot do it:
the base backup is then compressed by backupd, the same bytes format, and a
warning says why (a backup taken beats a CPU saved).
"""

from __future__ import annotations

import structlog

from backupd.config.model import Job, PostgresSource
from backupd.sources import postgres
from backupd.stream.codecs import decompressor

log = structlog.get_logger("backupd.physical")

# The server's build options are in pg_config, which only a superuser reads; the
# values `wal_compression` accepts list lz4 and zstd exactly when the server was
# built with them (gzip needs zlib, which no setting reveals: assumed).
_ENUMVALS = "SELECT enumvals FROM pg_settings WHERE name = 'wal_compression'"


def wanted(job: Job) -> bool:
    return job.kind == "physical" and job.compression_at == "server"


async def unsupported_reason(job: Job, source: PostgresSource, password: str | None) -> str | None:
    """Why the server cannot compress this job's base backups, or None when it can."""
    async with postgres.settings_connection(source.dsn, password) as conn:
        num = int(await conn.fetchval("SELECT current_setting('server_version_num')::int"))
        values = await conn.fetchval(_ENUMVALS) if num >= 150000 else None
    return reason_for(job.compression.algorithm, num, values)


def reason_for(algorithm: str, version_num: int, wal_compression_values: object) -> str | None:
    if version_num < 150000:
        return f"PostgreSQL {version_num // 10000} cannot (server-side compression needs 15)"
    if algorithm == "gzip":
        return None
    accepted = wal_compression_values if isinstance(wal_compression_values, list) else []
    if algorithm not in accepted:
        return f"the server was built without {algorithm}"
    return None


def argv_options(job: Job) -> list[str]:
    """What pg_basebackup needs to compress on the server (tar to stdout)."""
    spec = job.compression
    level = "" if spec.level is None else f":{spec.level}"
    return [f"--compress=server-{spec.algorithm}{level}", "--no-manifest"]


class MeasuredPassThrough:
    """Passes the server's compressed stream through unchanged, decoding it on the side:
    `raw_bytes` is the tar's size, and a stream that does not decode fails the backup."""

    def __init__(self, algorithm: str) -> None:
        self._decoder = decompressor(algorithm)
        self.raw_bytes = 0

    def update(self, data: bytes) -> bytes:
        self.raw_bytes += len(self._decoder.update(data))
        return data

    def finish(self) -> bytes:
        self.raw_bytes += len(self._decoder.finish())
        return b""


async def plan(
    job: Job, source: PostgresSource, password: str | None
) -> MeasuredPassThrough | None:
    """The pass-through encoder when the server compresses this base backup, else None
    (client compression; a warning when the job asked for the server's)."""
    if not wanted(job):
        return None
    reason = await unsupported_reason(job, source, password)
    if reason is not None:
        log.warning("server_compression_unavailable", job=job.name, reason=reason)
        return None
    return MeasuredPassThrough(job.compression.algorithm)


__all__ = [
    "MeasuredPassThrough",
    "argv_options",
    "plan",
    "reason_for",
    "unsupported_reason",
    "wanted",
]
