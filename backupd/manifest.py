"""The manifest: what a backup is, and how backups are found in storage.

Layout (SPEC "Storage layout"), keys relative to the storage root:
    {job}/{YYYY}/{MM}/{DD}/{stem}.manifest.json
    {job}/{YYYY}/{MM}/{DD}/{stem}/{database}.{dump|sql}[.zst|.gz|.lz4][.age]
with stem = {job}-{YYYYMMDDTHHMMSSZ}-{id}. A backup exists iff its manifest
exists: listing reads manifests only, never infers anything from data keys.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from backupd.errors import NotFound, UsageError
from backupd.storage.base import Store

FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"

log = structlog.get_logger("backupd.manifest")


def new_backup_id() -> str:
    return secrets.token_hex(4)


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def stem_for(job: str, started_at: datetime, backup_id: str) -> str:
    return f"{job}-{started_at.astimezone(UTC):%Y%m%dT%H%M%SZ}-{backup_id}"


def folder_for(job: str, started_at: datetime) -> str:
    return f"{job}/{started_at.astimezone(UTC):%Y/%m/%d}/"


def data_name(database: str, fmt: str, compression_ext: str, encrypted: bool) -> str:
    ext = "dump" if fmt == "custom" else "sql"
    return f"{database}.{ext}{compression_ext}{'.age' if encrypted else ''}"


@dataclass(frozen=True, slots=True)
class ObjectEntry:
    database: str  # "" for the globals (pg_dumpall --globals-only)
    key: str  # relative to the manifest's folder
    size_bytes: int
    raw_bytes: int
    sha256: str
    format: str = "custom"  # the globals object is always plain SQL
    kind: str = "database"  # database | globals (roles and tablespaces)

    @property
    def label(self) -> str:
        return "(globals)" if self.kind == "globals" else self.database


@dataclass(frozen=True, slots=True)
class Manifest:
    id: str
    job: str
    kind: str
    format: str
    compression: str
    encryption: dict[str, Any] | None
    source: dict[str, Any]
    tool: dict[str, Any]
    started_at: str
    finished_at: str
    duration_seconds: float
    objects: tuple[ObjectEntry, ...]
    trigger: str  # schedule | manual | catch-up
    triggered_by: dict[str, Any] | None
    attempts: int
    backupd_version: str
    tables: dict[str, dict[str, int]] = field(default_factory=dict)  # database -> table -> rows
    format_version: int = FORMAT_VERSION

    @property
    def stem(self) -> str:
        return stem_for(self.job, self.started, self.id)

    @property
    def started(self) -> datetime:
        return parse_rfc3339(self.started_at)

    @property
    def folder(self) -> str:
        return folder_for(self.job, self.started)

    @property
    def manifest_key(self) -> str:
        return f"{self.folder}{self.stem}{MANIFEST_SUFFIX}"

    def object_key(self, entry: ObjectEntry) -> str:
        return self.folder + entry.key

    @property
    def size_bytes(self) -> int:
        return sum(o.size_bytes for o in self.objects)

    def object_for(self, database: str | None) -> ObjectEntry:
        """The data object of `database` (default: the only database dumped)."""
        dbs = [o for o in self.objects if o.kind == "database"]
        names = ", ".join(repr(o.database) for o in dbs) or "none"
        if database is None:
            if len(dbs) == 1:
                return dbs[0]
            raise UsageError(
                f"backup {self.stem} holds several databases ({names}): pass --database"
            )
        for o in dbs:
            if o.database == database:
                return o
        hint = (
            " (the roles and tablespaces dump is --globals)"
            if database == "globals" and any(o.kind == "globals" for o in self.objects)
            else ""
        )
        raise NotFound(f"backup {self.stem} has no database {database!r} (it has: {names}){hint}")

    def globals_object(self) -> ObjectEntry:
        """The roles and tablespaces dump (`globals = true`)."""
        for o in self.objects:
            if o.kind == "globals":
                return o
        raise NotFound(f"backup {self.stem} has no globals (the job ran without globals = true)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["objects"] = [asdict(o) for o in self.objects]
        order = ["format_version", "id", "job", "stem"]
        data["stem"] = self.stem
        return {k: data[k] for k in order} | {k: v for k, v in data.items() if k not in order}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format_version {data.get('format_version')!r}")
        data.pop("stem", None)
        objects = _legacy_globals([ObjectEntry(**o) for o in data.pop("objects")])
        known = set(cls.__dataclass_fields__)
        return cls(objects=objects, **{k: v for k, v in data.items() if k in known})


def _legacy_globals(objects: list[ObjectEntry]) -> tuple[ObjectEntry, ...]:
    """Manifests before `kind` named the roles dump database "globals": it is the last
    plain object of that name (backupd wrote it after every database)."""
    if all(o.kind == "database" for o in objects):
        for i in range(len(objects) - 1, -1, -1):
            o = objects[i]
            if o.database == "globals" and o.format == "plain":
                objects[i] = replace(o, database="", kind="globals")
                break
    return tuple(objects)


def globals_name(databases: Iterable[str], fmt: str) -> str:
    """The globals object's name: `globals`, unless a database of this backup would
    get the same data name (then `globals-2`, ...): the two can never collide."""
    taken = {data_name(db, fmt, "", False) for db in databases}
    name, n = "globals", 1
    while data_name(name, "plain", "", False) in taken:
        n += 1
        name = f"globals-{n}"
    return name


async def write_manifest(store: Store, manifest: Manifest) -> None:
    await store.put_bytes(manifest.manifest_key, manifest.to_json())


async def list_backups(store: Store, job: str | None = None) -> list[Manifest]:
    """Every backup in `store` (of `job`, or of all jobs), newest first.

    A manifest that cannot be read is logged and skipped, never guessed at.
    """
    prefix = f"{job}/" if job else ""
    manifests = []
    for info in await store.list(prefix):
        if not info.key.endswith(MANIFEST_SUFFIX):
            continue
        try:
            manifest = Manifest.from_json(await store.read_bytes(info.key))
        except NotFound:
            continue  # deleted between list and read (prune)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("manifest_unreadable", storage=store.name, key=info.key, error=str(exc))
            continue
        if job is None or manifest.job == job:
            manifests.append(manifest)
    manifests.sort(key=lambda m: (m.started_at, m.id), reverse=True)
    return manifests


async def find_backup(store: Store, job: str, which: str | None) -> Manifest:
    """`--backup` resolution: an id, a stem, or `latest` (the default)."""
    backups = await list_backups(store, job)
    if not backups:
        raise NotFound(f"no backups of job {job!r} in storage {store.name!r}")
    if which in (None, "", "latest"):
        return backups[0]
    for m in backups:
        if which in (m.id, m.stem, m.stem + MANIFEST_SUFFIX):
            return m
    raise NotFound(f"no backup {which!r} of job {job!r} in storage {store.name!r}")


def now_utc() -> datetime:
    return datetime.now(UTC)
