"""The manifest: what a backup is, and the validation of one read from storage.

Layout (SPEC "Storage layout"), keys relative to the storage root:
    {job}/{YYYY}/{MM}/{DD}/{stem}.manifest.json
    {job}/{YYYY}/{MM}/{DD}/{stem}/{database}.{dump|sql}[.zst|.gz|.lz4][.age]
with stem = {job}-{YYYYMMDDTHHMMSSZ}-{id}. A backup exists iff its manifest
exists: listing reads manifests only, never infers anything from data keys.

Manifests read from storage are untrusted input (anyone with write access to
the bucket, a bit flip, a future version): `Manifest.from_json` validates every
field it uses, and a listing skips what fails with a warning naming the key and
a short reason (never the content). A skipped manifest is not a backup: it
counts toward no retention rule and retention never deletes it or its data.
A manifest is read only up to MAX_MANIFEST_BYTES, and must sit under the key
its own job, start time and id give (`manifest_key`). Reading, writing and
listing manifests in a store is `listing.py`.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from backupd.catalog.retention import FUTURE_TOLERANCE
from backupd.errors import AmbiguousDatabase, NoSuchDatabase, NotFound, StorageError
from backupd.storage.base import check_key

FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # a real manifest is a few KiB; 1 MiB holds ~5,000 databases
MAX_DEPTH = 32  # nesting of JSON containers; a real manifest has 4


class InvalidManifest(ValueError):
    """A manifest that is not one. The message says what is wrong, never what it holds."""


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
    """The object name of one database's dump: `{database}.{ext}`, the name made safe.

    Any database name PostgreSQL allows is backed up as itself; only its object
    name is escaped (the manifest keeps the real name): characters other than
    letters, digits, `-`, `_`, `.`, `@` and `+` become %XX, so a name with `/`,
    `..`, spaces or control characters stays one object in the backup's folder.
    """
    ext = "dump" if fmt == "custom" else "sql"
    return f"{object_stem(database)}.{ext}{compression_ext}{'.age' if encrypted else ''}"


def object_stem(database: str) -> str:
    return quote(database, safe="-_.@+") or "%00"


@dataclass(frozen=True, slots=True)
class FailedDatabase:
    """A database a run could not back up; the backup published the others."""

    database: str
    error: str  # one line, as the run reported it

    def summary(self) -> str:
        return f"{self.database}: {self.error}"


@dataclass(frozen=True, slots=True)
class ObjectEntry:
    database: str  # "" for the globals (pg_dumpall --globals-only)
    key: str  # relative to the manifest's folder
    size_bytes: int
    raw_bytes: int
    sha256: str
    format: str = "custom"  # the globals object is always plain SQL
    kind: str = "database"  # database | globals (roles and tablespaces) | base (physical)

    @property
    def label(self) -> str:
        if self.kind == "base":
            return "(cluster)"
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
    failed: tuple[FailedDatabase, ...] = ()  # databases this (partial) backup lacks
    node: str = ""  # the daemon that made it ([daemon] node)
    scheduled_for: str = ""  # RFC 3339 UTC: the slot a scheduled or catch-up run ran
    format_version: int = FORMAT_VERSION
    # kind = "physical" only (issue 16): where the base backup sits in the WAL
    # (timeline, start_lsn, stop_lsn, start_segment, stop_segment), and the window of
    # time it can restore to; `list` extends restorable_until with the WAL archive.
    wal: dict[str, Any] | None = None
    restorable_from: str = ""
    restorable_until: str = ""

    @property
    def stem(self) -> str:
        return stem_for(self.job, self.started, self.id)

    @property
    def started(self) -> datetime:
        return parse_rfc3339(self.started_at)

    @property
    def finished(self) -> datetime | None:
        return parse_rfc3339(self.finished_at) if self.finished_at else None

    @property
    def folder(self) -> str:
        return folder_for(self.job, self.started)

    @property
    def manifest_key(self) -> str:
        return f"{self.folder}{self.stem}{MANIFEST_SUFFIX}"

    def object_key(self, entry: ObjectEntry) -> str:
        return self.folder + entry.key

    @property
    def data_keys(self) -> list[str]:
        """The keys of its data objects, in the manifest's order."""
        return [self.object_key(o) for o in self.objects]

    @property
    def size_bytes(self) -> int:
        return sum(o.size_bytes for o in self.objects)

    @property
    def databases(self) -> frozenset[str]:
        """The databases this backup holds (the globals object included)."""
        return frozenset(o.database for o in self.objects)

    def in_future(self, now: datetime) -> bool:
        """Dated more than FUTURE_TOLERANCE after `now` (a wrong clock wrote it)."""
        limit = now + FUTURE_TOLERANCE
        finished = self.finished
        return self.started > limit or (finished is not None and finished > limit)

    def object_for(self, database: str | None) -> ObjectEntry:
        """The data object of `database` (default: the only database dumped)."""
        dbs = [o for o in self.objects if o.kind == "database"]
        names = ", ".join(repr(o.database) for o in dbs) or "none"
        base = [o for o in self.objects if o.kind == "base"]
        if base and database is None:  # a physical backup: the cluster's tar (download)
            return base[0]
        if database is None:
            if len(dbs) == 1:
                return dbs[0]
            raise AmbiguousDatabase(self.stem, names)
        for o in dbs:
            if o.database == database:
                return o
        why = next((f.error for f in self.failed if f.database == database), None)
        if why is not None:
            raise NoSuchDatabase(
                f"backup {self.stem} has no database {database!r}: it failed in this run "
                f"({why}); the backup has: {names}"
            )
        raise NoSuchDatabase(
            f"backup {self.stem} has no database {database!r} (it has: {names})",
            globals_kept=database == "globals" and any(o.kind == "globals" for o in self.objects),
        )

    def globals_object(self) -> ObjectEntry:
        """The roles and tablespaces dump (`globals = true`)."""
        for o in self.objects:
            if o.kind == "globals":
                return o
        raise NotFound(f"backup {self.stem} has no globals (the job ran without globals = true)")

    def holds(self, database: str) -> bool:
        return any(o.database == database for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["objects"] = [asdict(o) for o in self.objects]
        data["failed"] = [asdict(f) for f in self.failed]
        order = ["format_version", "id", "job", "stem"]
        data["stem"] = self.stem
        if self.wal is None:  # a logical backup: no physical fields
            for key in ("wal", "restorable_from", "restorable_until"):
                del data[key]
        return {k: data[k] for k in order} | {k: v for k, v in data.items() if k not in order}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, key: str | None = None) -> Manifest:
        """Parse and validate a manifest; `InvalidManifest` (a ValueError) says why not.

        With `key`, the manifest must be the one that key names: its job,
        start time and id give exactly that key.
        """
        try:
            manifest = _validate(_parse(raw))
        except InvalidManifest:
            raise
        except (TypeError, ValueError, KeyError, OverflowError, RecursionError) as exc:
            raise InvalidManifest(f"malformed ({type(exc).__name__})") from None
        if key is not None and manifest.manifest_key != key:
            raise InvalidManifest("its job, started_at and id do not give the key it is stored at")
        return manifest


# -- validation of untrusted manifests ----------------------------------------------------

_ID = re.compile(r"[0-9a-z]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_TEXT = 4096
_MAX_NAME = 255
_MAX_INT = (1 << 63) - 1
_YEARS = (1970, 9000)  # far enough from datetime's limits for any time zone arithmetic
_FORMAT = re.compile(r"[a-z][a-z0-9-]{0,15}")  # custom, plain; later kinds of object may add more
_COMPRESSION = re.compile(r"(none|gzip|zstd|lz4)(:[0-9]{1,2})?")  # as the config spells it


def _parse(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InvalidManifest(f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidManifest("not UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise InvalidManifest(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except InvalidManifest:
        raise
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise InvalidManifest(f"not valid JSON{where}") from None
    if not _depth_within(data, MAX_DEPTH):
        raise InvalidManifest(f"JSON nested deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        raise InvalidManifest(f"not a JSON object ({_kind(data)})")
    return data


def _no_constant(name: str) -> Any:
    raise InvalidManifest(f"holds {name}, which is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        raise InvalidManifest("an object has the same key twice")
    return data


def _depth_within(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def _kind(value: Any) -> str:
    """The JSON type of `value`, to name in a reason instead of the value itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _field(data: dict[str, Any], name: str, default: Any = ..., where: str = "") -> Any:
    if name not in data:
        if default is ...:
            raise InvalidManifest(f"{where}{name} is missing")
        return default
    return data[name]


def _text(value: Any, what: str, limit: int = _MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise InvalidManifest(f"{what} is {_kind(value)}, expected a string")
    if len(value) > limit:
        raise InvalidManifest(f"{what} is longer than {limit} characters")
    if "\0" in value:
        raise InvalidManifest(f"{what} contains a NUL character")
    return value


def _name(value: Any, what: str) -> str:
    name = _text(value, what, _MAX_NAME)
    if not name:
        raise InvalidManifest(f"{what} is empty")
    return name


def _integer(value: Any, what: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidManifest(f"{what} is {_kind(value)}, expected an integer")
    if not minimum <= value <= _MAX_INT:
        raise InvalidManifest(f"{what} is out of range")
    return value


def _number(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidManifest(f"{what} is {_kind(value)}, expected a number")
    if not math.isfinite(value) or value < 0:
        raise InvalidManifest(f"{what} is out of range")
    return value


def _object(value: Any, what: str, optional: bool = False) -> dict[str, Any] | None:
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        expected = "an object or null" if optional else "an object"
        raise InvalidManifest(f"{what} is {_kind(value)}, expected {expected}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidManifest(f"{what} is {_kind(value)}, expected a list")
    return value


def _timestamp(value: Any, what: str, optional: bool = False) -> str:
    text = _text(value, what, 64)
    if optional and not text:
        return text
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidManifest(f"{what} is not an RFC 3339 time") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise InvalidManifest(f"{what} has no time zone offset")
    if not _YEARS[0] <= parsed.year <= _YEARS[1]:
        raise InvalidManifest(f"{what} is outside the years {_YEARS[0]}..{_YEARS[1]}")
    return text


def _validate(data: dict[str, Any]) -> Manifest:
    version = _field(data, "format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise InvalidManifest(f"unsupported format_version (this backupd reads {FORMAT_VERSION})")
    backup_id = _text(_field(data, "id"), "id", 64)
    if not _ID.fullmatch(backup_id):
        raise InvalidManifest("id is not 1-64 lowercase letters and digits")
    job = _name(_field(data, "job"), "job")
    started_at = _timestamp(_field(data, "started_at"), "started_at")
    stem = stem_for(job, parse_rfc3339(started_at), backup_id)
    objects = _objects(_list(_field(data, "objects"), "objects"), stem)
    encryption = _object(_field(data, "encryption"), "encryption", optional=True)
    triggered_by = _object(_field(data, "triggered_by"), "triggered_by", optional=True)
    return Manifest(
        id=backup_id,
        job=job,
        kind=_text(_field(data, "kind"), "kind", 64),
        format=_text(_field(data, "format"), "format", 64),
        compression=_compression(_field(data, "compression")),
        encryption=encryption,
        source=_object(_field(data, "source"), "source") or {},
        tool=_object(_field(data, "tool"), "tool") or {},
        started_at=started_at,
        finished_at=_timestamp(_field(data, "finished_at"), "finished_at", optional=True),
        duration_seconds=_number(_field(data, "duration_seconds"), "duration_seconds"),
        objects=objects,
        trigger=_text(_field(data, "trigger"), "trigger", 64),
        triggered_by=triggered_by,
        attempts=_integer(_field(data, "attempts"), "attempts"),
        backupd_version=_text(_field(data, "backupd_version"), "backupd_version", 64),
        tables=_tables(_object(_field(data, "tables", {}), "tables") or {}),
        failed=_failed(_list(_field(data, "failed", []), "failed")),
        node=_text(_field(data, "node", ""), "node", 64),
        scheduled_for=_timestamp(_field(data, "scheduled_for", ""), "scheduled_for", optional=True),
        wal=_wal_position(_field(data, "wal", None)),
        restorable_from=_timestamp(
            _field(data, "restorable_from", ""), "restorable_from", optional=True
        ),
        restorable_until=_timestamp(
            _field(data, "restorable_until", ""), "restorable_until", optional=True
        ),
    )


_LSN = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")
_SEGMENT = re.compile(r"[0-9A-F]{24}")


def _wal_position(value: Any) -> dict[str, Any] | None:
    """A physical backup's place in the WAL: every field checked, nothing else kept."""
    data = _object(value, "wal", optional=True)
    if data is None:
        return None
    timeline = _integer(_field(data, "timeline", where="wal."), "wal.timeline", 1)
    if timeline > 0xFFFFFFFF:
        raise InvalidManifest("wal.timeline is out of range")
    out: dict[str, Any] = {"timeline": timeline}
    for name in ("start_lsn", "stop_lsn"):
        lsn = _text(_field(data, name, where="wal."), f"wal.{name}", 17)
        if not _LSN.fullmatch(lsn):
            raise InvalidManifest(f"wal.{name} is not an LSN")
        out[name] = lsn
    for name in ("start_segment", "stop_segment"):
        seg = _text(_field(data, name, where="wal."), f"wal.{name}", 24)
        if not _SEGMENT.fullmatch(seg):
            raise InvalidManifest(f"wal.{name} is not a WAL segment name")
        out[name] = seg
    return out


def _compression(value: Any) -> str:
    spec = _text(value, "compression", 16)
    if not _COMPRESSION.fullmatch(spec):
        raise InvalidManifest("compression is not one backupd knows (none, gzip, zstd, lz4)")
    return spec


def _objects(items: list[Any], stem: str) -> tuple[ObjectEntry, ...]:
    if not items:
        raise InvalidManifest("objects is empty")
    entries: list[ObjectEntry] = []
    for n, item in enumerate(items):
        what = f"objects[{n}]"
        entry = _object(item, what) or {}
        key = _text(_field(entry, "key", where=f"{what}."), f"{what}.key", 1024)
        name = key.removeprefix(f"{stem}/")
        if name == key or "/" in name or name in ("", ".", ".."):
            raise InvalidManifest(f"{what}.key is not a file in the backup's own folder")
        try:
            check_key(key)
        except StorageError:
            raise InvalidManifest(f"{what}.key is not a valid storage key") from None
        sha256 = _text(_field(entry, "sha256", where=f"{what}."), f"{what}.sha256", 64)
        if not _SHA256.fullmatch(sha256):
            raise InvalidManifest(f"{what}.sha256 is not 64 lowercase hex digits")
        fmt = _text(_field(entry, "format", "custom", f"{what}."), f"{what}.format", 16)
        if not _FORMAT.fullmatch(fmt):
            raise InvalidManifest(f"{what}.format is not a format name")
        kind = _text(_field(entry, "kind", "database", f"{what}."), f"{what}.kind", 16)
        if kind not in ("database", "globals", "base"):
            raise InvalidManifest(f"{what}.kind is not database, globals or base")
        database = _field(entry, "database", where=f"{what}.")
        if kind in ("globals", "base"):
            if database != "":
                raise InvalidManifest(f'{what}.database of the {kind} object is not ""')
        else:
            database = _name(database, f"{what}.database")
        entries.append(
            ObjectEntry(
                database=database,
                kind=kind,
                key=key,
                size_bytes=_integer(
                    _field(entry, "size_bytes", where=f"{what}."), f"{what}.size_bytes"
                ),
                raw_bytes=_integer(
                    _field(entry, "raw_bytes", where=f"{what}."), f"{what}.raw_bytes"
                ),
                sha256=sha256,
                format=fmt,
            )
        )
    if not any(isinstance(item, dict) and "kind" in item for item in items):
        entries = list(_legacy_globals(entries))  # written before objects had a kind
    if sum(e.kind == "globals" for e in entries) > 1:
        raise InvalidManifest("objects hold two globals dumps")
    databases = [e.database for e in entries if e.kind == "database"]
    if len(set(databases)) != len(databases):
        raise InvalidManifest("objects name the same database twice")
    if len({e.key for e in entries}) != len(entries):
        raise InvalidManifest("objects name the same key twice")
    return tuple(entries)


def _tables(value: dict[str, Any]) -> dict[str, dict[str, int]]:
    tables: dict[str, dict[str, int]] = {}
    for database, counts in value.items():
        rows = _object(counts, "tables.<database>") or {}
        tables[database] = {
            table: _integer(n, "tables.<database>.<table>") for table, n in rows.items()
        }
    return tables


def _failed(items: list[Any]) -> tuple[FailedDatabase, ...]:
    failed = []
    for n, item in enumerate(items):
        entry = _object(item, f"failed[{n}]") or {}
        failed.append(
            FailedDatabase(
                database=_name(
                    _field(entry, "database", where=f"failed[{n}]."), f"failed[{n}].database"
                ),
                error=_text(_field(entry, "error", where=f"failed[{n}]."), f"failed[{n}].error"),
            )
        )
    return tuple(failed)


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


def now_utc() -> datetime:
    return datetime.now(UTC)
