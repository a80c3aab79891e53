"""The WAL archive's names and index: LSNs, segment names, keys, index entries.

Layout, keys relative to the storage root (SPEC "Physical backups"):
    {job}/wal/{timeline}/{segment}[.zst|.gz|.lz4][.age]   the segment's bytes
    {job}/wal/{timeline}/{segment}.json                   its index entry
and the same for `{timeline}.history` files. The index entry is written after
the data object and is what makes a segment exist (as a manifest makes a
backup exist): its name, sizes, the SHA-256 of the stored bytes and of the
WAL itself, how it is encoded, and when it was archived. Entries read from
storage are untrusted and validated (`WalEntry.from_json`).

Writing and reading segments is `operations/wal.py`; the archive as a whole
(listing, the restorable window, retention) is `operations/walchain.py`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from backupd.catalog.manifest import parse_rfc3339
from backupd.errors import IntegrityError, UsageError
from backupd.storage.base import Store

SEGMENT_SIZE = 16 * 1024 * 1024  # wal_segment_size; checked at preflight
SEGMENTS_PER_XLOGID = 0x100000000 // SEGMENT_SIZE
MAX_ENTRY_BYTES = 4096
MAX_HISTORY_BYTES = 1 << 20
SEGMENT_RE = re.compile(r"[0-9A-F]{24}")
HISTORY_RE = re.compile(r"[0-9A-F]{8}\.history")
BACKUP_LABEL_RE = re.compile(r"[0-9A-F]{24}\.[0-9A-F]{8}\.backup")  # archive_command sends these
_COMPRESSION = re.compile(r"(none|gzip|zstd|lz4)(:[0-9]{1,2})?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SUFFIX = re.compile(r"(\.(zst|gz|lz4))?(\.age)?")
INDEX_SUFFIX = ".json"
PARTIAL_SUFFIX = ".partial"


# -- WAL positions ------------------------------------------------------------------------


def parse_lsn(text: str) -> int:
    """`16/B374D848` -> an integer; UsageError if it is not an LSN."""
    match = re.fullmatch(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})", text.strip())
    if match is None:
        raise UsageError(f"{text!r} is not an LSN (like 0/3000028)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_of(timeline: int, lsn: int) -> str:
    """The name of the segment of `timeline` holding `lsn`."""
    segno = lsn // SEGMENT_SIZE
    return f"{timeline:08X}{segno // SEGMENTS_PER_XLOGID:08X}{segno % SEGMENTS_PER_XLOGID:08X}"


def segment_number(name: str) -> tuple[int, int]:
    """(timeline, segment number) of a segment name."""
    return int(name[:8], 16), int(name[8:16], 16) * SEGMENTS_PER_XLOGID + int(name[16:24], 16)


def is_partial_name(name: str) -> bool:
    return name.endswith(PARTIAL_SUFFIX) and bool(SEGMENT_RE.fullmatch(name[:-8]))


def is_wal_name(name: str) -> bool:
    return bool(
        SEGMENT_RE.fullmatch(name) or HISTORY_RE.fullmatch(name) or BACKUP_LABEL_RE.fullmatch(name)
    )


# -- layout -------------------------------------------------------------------------------


def wal_prefix(job: str) -> str:
    return f"{job}/wal/"


def folder_of(job: str, name: str) -> str:
    return f"{wal_prefix(job)}{name[:8]}/"


def index_key(job: str, name: str) -> str:
    return f"{folder_of(job, name)}{name}{INDEX_SUFFIX}"


@dataclass(frozen=True, slots=True)
class WalEntry:
    """One archived segment (or history file): its index entry."""

    name: str
    key: str  # the data object's name in the timeline's folder
    size_bytes: int  # stored
    sha256: str  # of the stored bytes
    raw_bytes: int
    raw_sha256: str  # of the WAL itself: what "the same segment" means
    compression: str
    encrypted: bool
    archived_at: str

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, name: str) -> WalEntry:
        """Validate an index entry read from storage; IntegrityError says why not."""
        try:
            if len(raw) > MAX_ENTRY_BYTES:
                raise ValueError("too large")
            data = json.loads(raw.decode())
            if not isinstance(data, dict):
                raise ValueError("not an object")
            entry = cls(
                name=_str(data, "name"),
                key=_str(data, "key"),
                size_bytes=_int(data, "size_bytes"),
                sha256=_str(data, "sha256"),
                raw_bytes=_int(data, "raw_bytes"),
                raw_sha256=_str(data, "raw_sha256"),
                compression=_str(data, "compression"),
                encrypted=_bool(data, "encrypted"),
                archived_at=_str(data, "archived_at"),
            )
            parse_rfc3339(entry.archived_at)
        except (ValueError, UnicodeDecodeError, TypeError, OverflowError) as exc:
            raise IntegrityError(f"WAL index entry of {name} is invalid: {exc}") from None
        suffix = entry.key.removeprefix(name)
        problems = [
            entry.name != name and "it names another segment",
            (suffix == entry.key or not _SUFFIX.fullmatch(suffix)) and "its key is not its own",
            not _SHA256.fullmatch(entry.sha256) and "sha256 is not a digest",
            not _SHA256.fullmatch(entry.raw_sha256) and "raw_sha256 is not a digest",
            not _COMPRESSION.fullmatch(entry.compression) and "unknown compression",
            SEGMENT_RE.fullmatch(name) and entry.raw_bytes != SEGMENT_SIZE and "wrong size",
        ]
        wrong = [p for p in problems if p]
        if wrong:
            raise IntegrityError(f"WAL index entry of {name} is invalid: {wrong[0]}")
        return entry

    @property
    def archived(self) -> datetime:
        return parse_rfc3339(self.archived_at)


def _str(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or len(value) > 256:
        raise ValueError(f"{key} is not a short string")
    return value


def _int(data: dict[str, Any], key: str) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 40:
        raise ValueError(f"{key} is not a size")
    return value


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data[key]
    if not isinstance(value, bool):
        raise ValueError(f"{key} is not a boolean")
    return value


async def read_entry(store: Store, job: str, name: str) -> WalEntry:
    """The index entry of `name`; NotFound if it is not archived."""
    raw = await store.read_bytes(index_key(job, name))
    return WalEntry.from_json(raw, name)
