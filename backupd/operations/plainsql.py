"""Reading pg_dump's plain SQL output as a stream, to restore it under a name the user typed.

A plain dump made with `pg_dump --create` begins with `CREATE DATABASE src`,
`\\connect src`, and holds database-level entries (its comment, settings,
grants) that name the SOURCE database: fed as it is to psql, it would write
into `src` on whatever server it is restored to. `PlainFilter` reads the
stream line by line, knows where SQL string literals, quoted identifiers,
dollar-quoted bodies, comments and COPY data begin and end, and:

- drops every `\\connect` line (the restore connects to the typed database only);
- finds pg_dump's database-level entries by their `-- Name: ...; Type: ...`
  headers and either drops them (a restore into an existing database, like
  `pg_restore` without `-C`) or rewrites the database name in them to the
  typed one (`--create`), refusing any database reference it cannot map;
- hands the `CREATE DATABASE` statement to the caller, which runs it on the
  maintenance database before the rest is restored into the new one.

The same filter turns `pg_restore -C -f -` output of a custom archive's
database-level entries into statements about the typed database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from backupd.errors import UnsafeDump

_HEADER = re.compile(rb"^-- (?:Data for )?Name: (.*); Type: (.*); Schema: (.*); Owner: (.*)$")
_DB_LEVEL_TYPES = {b"DATABASE", b"DATABASE PROPERTIES"}
_DB_OBJECT_TYPES = {b"COMMENT", b"ACL", b"SECURITY LABEL"}
# What may start a literal, a quoted identifier or a comment in SQL code.
_SPECIAL = re.compile(rb"""[eE]'|'|"|\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$|--|/\*""")
_DB_REF = re.compile(rb'DATABASE\s+("(?:[^"]|"")*"|[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)')
_DATABASE_WORD = re.compile(rb"(?<![A-Za-z0-9_\x80-\xff])DATABASE(?![A-Za-z0-9_\x80-\xff])")
_COPY = re.compile(rb"^COPY .* FROM stdin;\r?$")


def quote_ident(name: str) -> str:
    """An SQL identifier that means exactly `name` (always double-quoted)."""
    return '"' + name.replace('"', '""') + '"'


def _ident_forms(name: str) -> set[bytes]:
    """How pg_dump may have written `name` as an identifier: quoted, or bare if simple."""
    forms = {quote_ident(name).encode()}
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        forms.add(name.encode())
    return forms


@dataclass
class _Scan:
    """Where a line ends up: inside a literal/comment that goes on, or in code."""

    quote: bytes | None = None  # b"'", b"E'", b'"', b"$tag$", b"/*"
    depth: int = 0  # nesting of /* */ comments


def split_code(line: bytes, scan: _Scan) -> list[tuple[bool, bytes]]:
    """Split `line` into (is_code, text) segments, carrying literal state in `scan`."""
    out: list[tuple[bool, bytes]] = []
    pos = 0
    n = len(line)
    while pos < n:
        if scan.quote is None:
            m = _SPECIAL.search(line, pos)
            if m is None:
                out.append((True, line[pos:]))
                break
            start = m.start()
            tok = m.group(0)
            if tok[:1] in b"eE" and start > 0 and _is_ident_char(line[start - 1]):
                # an identifier ending in e followed by a quote is still a plain literal start
                out.append((True, line[pos : start + 1]))
                pos = start + 1
                continue
            if tok[:1] == b"$" and start > 0 and _is_ident_char(line[start - 1]):
                out.append((True, line[pos : start + 1]))  # `a$b`: part of an identifier
                pos = start + 1
                continue
            out.append((True, line[pos:start]))
            if tok == b"--":
                out.append((False, line[start:]))
                break
            scan.quote = b"'" if tok == b"'" else (b"E'" if tok[:1] in b"eE" else tok)
            scan.depth = 1 if tok == b"/*" else 0
            pos = start + len(tok)
            literal_start = start
        else:
            literal_start = pos
        quoted_ident = scan.quote == b'"'
        end = _literal_end(line, pos, scan)
        # A quoted identifier is code (a name), not a literal.
        out.append((quoted_ident, line[literal_start:end]))
        pos = end
    return out


def _is_ident_char(c: int) -> bool:
    return c == 0x5F or c == 0x24 or 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c >= 0x80


def _literal_end(line: bytes, pos: int, scan: _Scan) -> int:
    """Scan a literal/comment from `pos`; returns where it ends (or len(line) if it goes on)."""
    q = scan.quote
    assert q is not None
    n = len(line)
    if q == b"/*":
        while pos < n:
            o = line.find(b"/*", pos)
            c = line.find(b"*/", pos)
            if c < 0:
                return n
            if 0 <= o < c:
                scan.depth += 1
                pos = o + 2
                continue
            scan.depth -= 1
            pos = c + 2
            if scan.depth == 0:
                scan.quote = None
                return pos
        return n
    if q.startswith(b"$"):
        c = line.find(q, pos)
        if c < 0:
            return n
        scan.quote = None
        return c + len(q)
    closing = b'"' if q == b'"' else b"'"
    while pos < n:
        c = line.find(closing, pos)
        if q == b"E'":
            b = line.find(b"\\", pos)
            if 0 <= b < (c if c >= 0 else n):
                pos = b + 2
                continue
        if c < 0:
            return n
        if c + 1 < n and line[c + 1 : c + 2] == closing:
            pos = c + 2  # doubled: an escaped quote
            continue
        scan.quote = None
        return c + 1
    return n


@dataclass
class PlainFilter:
    """A streaming filter of pg_dump plain output; see the module docstring.

    `create_as`: the typed name when restoring with --create (database-level
    entries rewritten to it), None to drop them (restore into an existing database).
    """

    archive_db: str
    create_as: str | None = None
    create_statements: list[bytes] = field(default_factory=list)
    head_done: bool = False  # the DATABASE entry is behind us (or cannot come any more)
    dropped_connects: int = 0
    db_entries: list[str] = field(default_factory=list)  # "COMMENT DATABASE x", ...
    _partial: bytes = b""
    _scan: _Scan = field(default_factory=_Scan)
    _copy: bool = False
    _region: bytes | None = None  # the Type of the current database-level entry

    def feed(self, data: bytes) -> bytes:
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        return b"".join(self._line(line) for line in data[:cut].splitlines(keepends=True))

    def finish(self) -> bytes:
        tail, self._partial = self._partial, b""
        out = self._line(tail) if tail else b""
        self.head_done = True
        return out

    def _line(self, line: bytes) -> bytes:
        if self._copy:
            if line.rstrip(b"\r\n") == b"\\.":
                self._copy = False
            return line
        if self._scan.quote is None:
            bare = line.rstrip(b"\r\n")
            header = _HEADER.match(bare)
            if header is not None:
                self._enter(header.group(1), header.group(2))
                return line
            if bare.startswith((b"\\connect", b"\\c ", b"\\encoding")) or bare == b"\\c":
                self.dropped_connects += 1
                return b""
            if self._region is None and _COPY.match(bare):
                self._copy = True
                return line
        at_start = self._scan.quote is None
        segments = split_code(line, self._scan)
        if b"\\" in line:
            self._check_meta(line, segments, at_start)
        if self._region is None:
            return line
        if self.create_as is None:
            return b""
        text = self._rewrite(segments)
        if self._region == b"DATABASE" and text.lstrip().startswith(b"CREATE DATABASE "):
            self.create_statements.append(text)
            return b""
        return text

    def _check_meta(self, line: bytes, segments: list[tuple[bool, bytes]], at_start: bool) -> None:
        """psql runs a backslash outside literals as a meta-command (\\connect, \\!): only
        pg_dump's own \\restrict and \\unrestrict lines may have one."""
        if at_start and line.startswith((b"\\restrict ", b"\\unrestrict ")):
            return
        # a quoted identifier may hold a backslash: psql reads it as a name
        if any(
            is_code and not text.startswith(b'"') and b"\\" in text for is_code, text in segments
        ):
            raise UnsafeDump(
                "the dump holds a psql meta-command outside pg_dump's own lines: "
                f"{line[:80].decode(errors='replace').strip()!r}; refusing to run it"
            )

    def _enter(self, name: bytes, kind: bytes) -> None:
        if kind in _DB_LEVEL_TYPES or (kind in _DB_OBJECT_TYPES and name.startswith(b"DATABASE ")):
            self._region = kind
            self.db_entries.append(
                f"{kind.decode(errors='replace')} {name.decode(errors='replace')}"
            )
            if kind != b"DATABASE":
                self.head_done = True
            return
        self._region = None
        # pg_dump writes the DATABASE entry before any other: past any other
        # entry, it is behind us or there is none.
        self.head_done = True

    def _rewrite(self, segments: list[tuple[bool, bytes]]) -> bytes:
        """The line with the database name mapped; every DATABASE reference in its code
        must name the dumped database, or the dump is refused."""
        assert self.create_as is not None
        forms = _ident_forms(self.archive_db)
        new = quote_ident(self.create_as).encode()
        out = []
        # merge runs of code (quoted identifiers included) so a name is seen whole
        merged: list[tuple[bool, bytes]] = []
        for is_code, text in segments:
            if merged and is_code and merged[-1][0]:
                merged[-1] = (True, merged[-1][1] + text)
            else:
                merged.append((is_code, text))
        for is_code, text in merged:
            if is_code:

                def swap(m: re.Match[bytes]) -> bytes:
                    if m.group(1) not in forms:
                        raise UnsafeDump(
                            "the dump's database-level entries name database "
                            f"{m.group(1).decode(errors='replace')}, not the dumped "
                            f"{self.archive_db!r}: refusing to restore them"
                        )
                    return m.group(0)[: m.start(1) - m.start(0)] + new

                text = _DB_REF.sub(swap, text)
                if len(_DATABASE_WORD.findall(text)) != text.count(b"DATABASE " + new):
                    raise UnsafeDump(
                        "the dump's database-level entries hold a DATABASE reference backupd "
                        f"cannot map: {text[:120].decode(errors='replace').strip()!r}"
                    )
            out.append(text)
        return b"".join(out)
