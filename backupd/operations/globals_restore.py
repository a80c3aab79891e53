"""Restoring the globals (`pg_dumpall --globals-only`): roles and tablespaces.

The missing ones are created; those the target cluster already has are left
as they are (never a changed password or attribute of a role that is
already there); memberships and grants are kept. Without tablespaces it runs
in one transaction; CREATE TABLESPACE cannot run inside one, so with them
each statement is applied in turn and a failure lists what was applied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from backupd.catalog.manifest import Manifest, ObjectEntry
from backupd.errors import ToolFailed
from backupd.operations.pgclient import psql_argv, run, run_bytes
from backupd.operations.plainsql import _Scan, split_code
from backupd.operations.readback import ReadResult, read_back
from backupd.storage.base import Store

_IDENT = rb'("(?:[^"]|"")*"|[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)'
_ROLE_STMT = re.compile(rb"^(CREATE|ALTER) ROLE " + _IDENT)
_COMMENT_ROLE = re.compile(rb"^COMMENT ON ROLE " + _IDENT)
_SPC_STMT = re.compile(rb"^(CREATE|ALTER) TABLESPACE " + _IDENT)
_COMMENT_SPC = re.compile(rb"^COMMENT ON TABLESPACE " + _IDENT)


async def restore_globals(
    store: Store,
    manifest: Manifest,
    entry: ObjectEntry,
    identity: str | None,
    *,
    psql: str,
    target: str,
    env: dict[str, str] | None,
    say: Callable[[str], None],
) -> tuple[ReadResult, list[str], list[str]]:
    """Apply the globals dump `entry` to the cluster of `target`: (read, lines, warnings)."""
    chunks: list[bytes] = []

    async def collect(data: bytes) -> None:
        chunks.append(data)

    read = await read_back(store, manifest, entry, identity, collect)
    plan = plan_globals(b"".join(chunks), await cluster_globals(psql, target, env))
    if plan.tablespaces:
        say(
            "not one transaction: CREATE TABLESPACE cannot run inside one; each statement "
            "is applied in turn and a failure stops there (what was applied is listed)"
        )
    else:
        say("restoring the globals in one transaction: if it fails, nothing is applied")
    args = () if plan.tablespaces else ("--single-transaction",)
    try:
        warnings = await run(psql_argv(psql, target, *args), plan.sql, env)
    except ToolFailed as exc:
        if not plan.tablespaces:
            raise
        now = await cluster_globals(psql, target, env)
        roles = [r for r in plan.created if ("r", r) in now]
        spaces = [t for t in plan.tablespaces if ("t", t) in now]
        raise ToolFailed(
            f"{exc}\napplied before the failure (not one transaction): created roles: "
            f"{', '.join(roles) or 'none'}; created tablespaces: {', '.join(spaces) or 'none'}"
        ) from None
    lines = [
        f"created roles: {', '.join(plan.created) or 'none'}",
        f"existing roles, left as they are: {', '.join(plan.existing) or 'none'}",
    ]
    if plan.tablespaces or plan.existing_tablespaces:
        lines.append(f"created tablespaces: {', '.join(plan.tablespaces) or 'none'}")
        left = ", ".join(plan.existing_tablespaces) or "none"
        lines.append(f"existing tablespaces, left as they are: {left}")
    lines.append(f"skipped {plan.skipped} statement(s) about existing roles or tablespaces")
    return read, lines, warnings


async def cluster_globals(
    psql: str, target: str, env: dict[str, str] | None
) -> set[tuple[str, str]]:
    """The target cluster's roles ("r", name) and tablespaces ("t", name)."""
    out = await run_bytes(
        psql_argv(
            psql,
            target,
            "--tuples-only",
            "--no-align",
            "--field-separator-zero",
            "--record-separator-zero",
        ),
        b"SELECT 'r', rolname FROM pg_roles UNION ALL SELECT 't', spcname FROM pg_tablespace;\n",
        env,
    )
    fields = out.split(b"\0")
    return {
        (fields[i].decode(), fields[i + 1].decode(errors="replace"))
        for i in range(0, len(fields) - 1, 2)
    }


def _unquote(ident: bytes) -> str:
    text = ident.decode(errors="replace")
    if text.startswith('"'):
        return text[1:-1].replace('""', '"')
    return text.lower()


@dataclass
class GlobalsPlan:
    sql: bytes
    created: list[str]
    existing: list[str]
    tablespaces: list[str]
    existing_tablespaces: list[str]
    skipped: int


def plan_globals(dump: bytes, existing: set[tuple[str, str]]) -> GlobalsPlan:
    """The statements of a `pg_dumpall --globals-only` output that are safe to run on a
    cluster that has the roles/tablespaces `existing` ("r"/"t", name): those about
    existing ones are skipped (never a changed password or attribute of a role that
    is already there); memberships and grants are kept."""
    plan = GlobalsPlan(b"", [], [], [], [], 0)
    out: list[bytes] = []
    for stmt in _statements(dump):
        # the statement without the comment lines before it
        code = b"\n".join(
            line for line in stmt.splitlines() if line.strip() and not line.startswith(b"--")
        ).lstrip()
        kind = name = None
        for pattern, k in (
            (_ROLE_STMT, "r"),
            (_COMMENT_ROLE, "r"),
            (_SPC_STMT, "t"),
            (_COMMENT_SPC, "t"),
        ):
            m = pattern.match(code)
            if m:
                kind, name = k, _unquote(m.group(m.lastindex or 1))
                break
        if kind is not None and name is not None:
            if (kind, name) in existing:
                plan.skipped += 1
                if code.startswith(b"CREATE "):
                    (plan.existing if kind == "r" else plan.existing_tablespaces).append(name)
                continue
            if code.startswith(b"CREATE "):
                (plan.created if kind == "r" else plan.tablespaces).append(name)
        out.append(stmt)
    plan.sql = b"".join(out)
    return plan


def _statements(sql: bytes) -> Iterator[bytes]:
    """SQL split into statements (and psql meta-command lines), literals respected."""
    scan = _Scan()
    current: list[bytes] = []
    for line in sql.splitlines(keepends=True):
        if scan.quote is None and not current and line.startswith(b"\\"):
            yield line
            continue
        segments = split_code(line, scan)
        current.append(line)
        code = b"".join(t for is_code, t in segments if is_code).rstrip()
        if scan.quote is None and code.endswith(b";"):
            yield b"".join(current)
            current = []
    if current:
        yield b"".join(current)
