"""A custom archive's table of contents: what `pg_restore --list` says, and choosing from it.

The head of the archive (up to the end of its table of contents) is read
once and kept, so every later `--list`/`--use-list` run works on it without
reading the object from storage again. Table and schema patterns are
matched by pg_restore itself; one that matches nothing is an error naming
the closest names in the archive.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re

from backupd.catalog.manifest import Manifest, ObjectEntry
from backupd.errors import BackupdError, NothingMatches, UsageError
from backupd.operations.pgclient import Feeder, run_out
from backupd.operations.readback import read_back
from backupd.storage.base import Store

MAX_HEAD = 256 * 1024 * 1024  # bytes of an archive kept to read its table of contents
# pg_restore --list lines of the database-level entries (`--create` only).
_DB_TOC = re.compile(
    r"^\d+; \d+ \d+ (?:DATABASE|DATABASE PROPERTIES|(?:COMMENT|ACL|SECURITY LABEL) - DATABASE) "
)
_NAMED_TOC = re.compile(
    r"^\d+; \d+ \d+ (TABLE|VIEW|MATERIALIZED VIEW|SEQUENCE|FOREIGN TABLE|SCHEMA) (.*)$"
)


class _HeadRead(Exception):
    """pg_restore --list has what it needs: stop reading the object (not a BackupdError,
    so the read-back stops at once)."""


async def archive_head(
    store: Store,
    manifest: Manifest,
    entry: ObjectEntry,
    identity: str | None,
    pg_restore: str,
    env: dict[str, str] | None,
) -> bytes:
    """The start of a custom archive, up to the end of its table of contents.

    Read until `pg_restore --list` (reading it too) has the whole table of
    contents. The full read (and its SHA-256 check) is the restore's.
    """
    head = bytearray()
    async with Feeder.start([pg_restore, "--list", f"--file={os.devnull}"], env) as feeder:

        async def sink(data: bytes) -> None:
            head.extend(data)
            await feeder.write(data)
            if feeder.done or feeder.proc.returncode is not None:
                raise _HeadRead
            if len(head) > MAX_HEAD:
                raise BackupdError(
                    f"{entry.key}: no table of contents in the first {MAX_HEAD} bytes: "
                    "not a custom-format archive?"
                )

        with contextlib.suppress(_HeadRead):
            await read_back(store, manifest, entry, identity, sink)
        await feeder.finish()
    return bytes(head)


async def database_entry_ids(pg_restore: str, head: bytes, env: dict[str, str] | None) -> list[str]:
    """The ids of the archive's database-level entries (its DATABASE, comment, settings,
    grants), as `pg_restore --create --list` numbers them."""
    out = await run_out([pg_restore, "--create", "--list"], head, env)
    return [line.split(";", 1)[0] for line in out.splitlines() if _DB_TOC.match(line)]


def split_qualified(pattern: str) -> tuple[str | None, str]:
    """`schema.table` -> (schema, table); `"a.b"."c d"` quoted parts keep dots and case."""
    parts: list[str] = []
    i, n = 0, len(pattern)
    current = ""
    while i < n:
        c = pattern[i]
        if c == '"':
            end = i + 1
            while True:
                end = pattern.find('"', end)
                if end < 0:
                    raise UsageError(f"table {pattern!r}: unbalanced double quote")
                if pattern[end + 1 : end + 2] == '"':
                    end += 2
                    continue
                break
            current += pattern[i + 1 : end].replace('""', '"')
            i = end + 1
        elif c == "." and len(parts) == 0:
            parts.append(current)
            current = ""
            i += 1
        else:
            current += c
            i += 1
    parts.append(current)
    if any(not p for p in parts):
        raise UsageError(f"table {pattern!r}: empty name")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


async def select_entries(
    pg_restore: str,
    head: bytes,
    tables: tuple[str, ...],
    schemas: tuple[str, ...],
    env: dict[str, str] | None,
) -> list[str]:
    """The archive entries that the table and schema patterns select, in archive order.

    Each pattern is matched by pg_restore itself (`--list` with `-n`/`-t`);
    raises `NothingMatches` for those that match nothing.
    """
    full = (await run_out([pg_restore, "--list"], head, env)).splitlines()
    order = {line: i for i, line in enumerate(full)}
    chosen: set[str] = set()
    selections: list[tuple[str, str, list[str]]] = []  # (kind, pattern, pg_restore args)
    for pattern in tables:
        schema, table = split_qualified(pattern)
        args = ([f"--schema={schema}"] if schema else []) + [f"--table={table}"]
        selections.append(("table", pattern, args))
    for schema in schemas:
        selections.append(("schema", schema, [f"--schema={schema}"]))
        # pg_restore -n selects what is in the schema, not the schema itself
        own = re.compile(rf"^\d+; \d+ \d+ SCHEMA - {re.escape(schema)} ")
        chosen.update(line for line in full if own.match(line))
    missing = []
    for kind, pattern, args in selections:
        out = await run_out([pg_restore, "--list", *args], head, env)
        found = [line for line in out.splitlines() if line and not line.startswith(";")]
        if not found:
            missing.append((kind, pattern))
        chosen.update(found)
    if missing:
        names = _names(full)
        misses = []
        for kind, pattern in missing:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            close += [n for n in names if n.endswith("." + pattern) and n not in close]
            misses.append((kind, pattern, close[:5]))
        raise NothingMatches(misses)
    return sorted(chosen, key=lambda line: order.get(line, len(order)))


def _names(listing: list[str]) -> list[str]:
    """The schema-qualified names of the tables, views, sequences and schemas listed."""
    names = []
    for line in listing:
        m = _NAMED_TOC.match(line)
        if m:
            words = m.group(2).split(" ")
            names.append(words[1] if m.group(1) == "SCHEMA" else ".".join(words[:2]))
    return names
