"""The plain-dump filter: the database-level entries of a `pg_dump --create` dump go to
the typed name (or are dropped), literals, function bodies and COPY data never change."""

from __future__ import annotations

import pytest

from backupd.operations.plainsql import PlainFilter, UnsafeDump

DUMP = b"""\\restrict K
SET x = 1;
--
-- Name: my src; Type: DATABASE; Schema: -; Owner: postgres
--

CREATE DATABASE "my src" WITH TEMPLATE = template0;
ALTER DATABASE "my src" OWNER TO postgres;
\\unrestrict K
\\encoding SQL_ASCII
\\connect -reuse-previous=on "dbname='my src'"
\\restrict K
--
-- Name: DATABASE "my src"; Type: COMMENT; Schema: -; Owner: postgres
--
COMMENT ON DATABASE "my src" IS 'ALTER DATABASE other
-- Name: x; Type: TABLE; Schema: public; Owner: postgres
spans';
--
-- Name: t; Type: TABLE; Schema: public; Owner: postgres
--
CREATE FUNCTION f() RETURNS void AS $$ BEGIN EXECUTE 'ALTER DATABASE "my src" SET x=1'; END $$
  LANGUAGE plpgsql;
COPY t (a) FROM stdin;
\\\\connect src
-- Name: my src; Type: DATABASE PROPERTIES; Schema: -; Owner: postgres
\\.
--
-- Name: DATABASE "my src"; Type: ACL; Schema: -; Owner: postgres
--
GRANT CONNECT ON DATABASE "my src" TO bob;
\\unrestrict K
"""


def _run(filt: PlainFilter, data: bytes, step: int) -> bytes:
    out = b"".join(filt.feed(data[i : i + step]) for i in range(0, len(data), step))
    return out + filt.finish()


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_create_maps_every_database_entry_to_the_typed_name(step: int) -> None:
    filt = PlainFilter("my src", "new")
    out = _run(filt, DUMP, step)
    assert filt.create_statements == [b'CREATE DATABASE "new" WITH TEMPLATE = template0;\n']
    assert b'ALTER DATABASE "new" OWNER TO postgres;' in out
    assert b'COMMENT ON DATABASE "new" IS \'ALTER DATABASE other\n' in out  # literal kept
    assert b'GRANT CONNECT ON DATABASE "new" TO bob;' in out
    assert b"EXECUTE 'ALTER DATABASE \"my src\" SET x=1'" in out  # a function body is data
    assert b"\\\\connect src\n" in out  # COPY data is data
    assert b"\\connect -reuse" not in out and b"\\encoding" not in out
    assert filt.dropped_connects == 2


def test_without_create_the_database_entries_are_dropped() -> None:
    filt = PlainFilter("my src")
    out = _run(filt, DUMP, 4096)
    assert b'DATABASE "my src" OWNER' not in out and b"COMMENT ON DATABASE" not in out
    assert b"GRANT CONNECT ON DATABASE" not in out
    assert b"CREATE FUNCTION f()" in out and b"COPY t (a) FROM stdin;" in out
    assert len(filt.db_entries) == 3


def test_a_database_entry_naming_another_database_is_refused() -> None:
    forged = DUMP.replace(b'GRANT CONNECT ON DATABASE "my src"', b"GRANT CONNECT ON DATABASE prod")
    with pytest.raises(UnsafeDump, match="name database prod"):
        _run(PlainFilter("my src", "new"), forged, 4096)


@pytest.mark.parametrize("line", [b"SELECT 1; \\! touch /tmp/x\n", b"SELECT 1 \\gexec\n"])
def test_a_psql_meta_command_in_the_dump_is_refused(line: bytes) -> None:
    with pytest.raises(UnsafeDump, match="meta-command"):
        _run(PlainFilter("src"), b"SELECT 'a\\b';\n" + line, 4096)


def test_a_backslash_in_a_quoted_name_is_no_meta_command() -> None:
    out = _run(PlainFilter("src"), b'CREATE TABLE "a\\b" (x int);\n', 4096)
    assert out == b'CREATE TABLE "a\\b" (x int);\n'
