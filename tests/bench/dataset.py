"""The benchmark's PostgreSQL cluster and its deterministic dataset.

One cluster lives under `var/bench/pg` and is reused between runs; each scale
gets its own database (`bench_s1` for scale 1.0), built once and recognised
by a `bench_meta` row that names the generator version and scale. Every value
is a pure function of the row number (hashint8, sha512, md5 of the row id), so
two builds at the same scale hold the same bytes.

At scale 1.0 the database is about 1 GB on disk: a narrow table with unique
indexes (`accounts`), compressible JSON-like text (`events`), incompressible
base64 of hash output plus hex digests (`blobs`), and a numeric time series
(`measurements`). Generation is INSERT ... SELECT generate_series inside the
transaction that created each table (with wal_level=minimal that skips the
WAL), two tables at a time on two connections, then indexes and VACUUM FREEZE
so no hint-bit writes or autovacuum disturb the timed runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.pgcluster import PG_BIN, PgCluster, free_port

GENERATOR_VERSION = "5"

# Server settings for a benchmark box: no durability (the data is regenerable),
# no background work during timed runs, room for fast loads and index builds.
SERVER_SETTINGS = """
# -- tests/bench settings --
wal_level = minimal
max_wal_senders = 0
max_wal_size = 8GB
checkpoint_timeout = 30min
shared_buffers = 256MB
maintenance_work_mem = 512MB
autovacuum = off
"""

SEED = 20240917  # mixed into every generated value

# Rows per table at scale 1.0.
ROWS = {"accounts": 800_000, "events": 1_000_000, "blobs": 400_000, "measurements": 2_500_000}

_TABLES = {
    "accounts": """
CREATE TABLE accounts (
    id bigint NOT NULL,
    email text NOT NULL,
    name text NOT NULL,
    country char(2) NOT NULL,
    balance numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL
);
INSERT INTO accounts
SELECT g,
       'user' || g || '@' || (ARRAY['example.com','mail.test','corp.example','isp.test'])
           [1 + (abs(hashint8(g # {seed})) % 4)],
       (ARRAY['Ada','Grace','Linus','Barbara','Ken','Edsger','Donald','Frances'])
           [1 + (abs(hashint8(g)) % 8)] || ' ' ||
       (ARRAY['Lovelace','Hopper','Torvalds','Liskov','Thompson','Dijkstra','Knuth','Allen'])
           [1 + (abs(hashint8(g # 7)) % 8)],
       (ARRAY['DE','FR','US','JP','BR','IN','NG','SE'])[1 + (abs(hashint8(g # 11)) % 8)],
       (abs(hashint8(g # 13)) % 10000000) / 100.0,
       timestamptz '2020-01-01 00:00:00+00' + g * interval '97 seconds'
FROM generate_series(1, {n}) g;
""",
    "events": """
CREATE TABLE events (
    id bigint NOT NULL,
    account_id bigint NOT NULL,
    kind text NOT NULL,
    created_at timestamptz NOT NULL,
    payload text NOT NULL
);
INSERT INTO events
SELECT g, a, k,
       timestamptz '2023-01-01 00:00:00+00' + g * interval '13 seconds',
       format('{{"event":"%s","account":%s,"session":"%s","ip":"10.%s.%s.%s",'
              '"path":"/api/v2/%s/%s","status":%s,"duration_ms":%s,"bytes":%s,'
              '"user_agent":"%s","tags":["%s","%s"],"note":"%s order %s for account %s"}}',
              k, a, substr(md5(g::text), 1, 20), h % 256, (h >> 8) % 256, (h >> 16) % 256,
              k, (h >> 24) % 100000,
              (ARRAY[200,200,200,201,204,302,404,500])[1 + (h >> 40) % 8],
              (h >> 20) % 3000, (h >> 12) % 1000000,
              (ARRAY['Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0',
                     'Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) Mobile/15E148',
                     'curl/8.5.0', 'python-requests/2.31.0',
                     'Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Firefox/121.0'])
                  [1 + (h >> 44) % 5],
              (ARRAY['web','mobile','api','batch'])[1 + (h >> 48) % 4],
              (ARRAY['eu','us','apac'])[1 + (h >> 52) % 3],
              k, g, a)
FROM (SELECT g,
             abs(hashint8(g # {seed} # 3)) AS h,
             1 + abs(hashint8(g # {seed})) % {accounts} AS a,
             (ARRAY['order.created','order.paid','order.shipped','login','logout',
                    'cart.updated','invoice.sent','refund.requested'])
                 [1 + (abs(hashint8(g)) % 8)] AS k
      FROM generate_series(1, {n}) g) s;
""",
    "blobs": """
CREATE TABLE blobs (
    id bigint NOT NULL,
    digest text NOT NULL,
    data text NOT NULL
);
INSERT INTO blobs
SELECT g,
       md5(g::text || '{seed}'),
       encode(sha512(int8send(g # {seed}) || '\\x01'::bytea)
              || sha512(int8send(g # {seed}) || '\\x02'::bytea)
              || sha512(int8send(g # {seed}) || '\\x03'::bytea)
              || sha512(int8send(g # {seed}) || '\\x04'::bytea)
              || sha512(int8send(g # {seed}) || '\\x05'::bytea)
              || sha512(int8send(g # {seed}) || '\\x06'::bytea),
              'base64')
FROM generate_series(1, {n}) g;
""",
    "measurements": """
CREATE TABLE measurements (
    sensor_id integer NOT NULL,
    ts timestamptz NOT NULL,
    value double precision NOT NULL,
    status smallint NOT NULL
);
INSERT INTO measurements
SELECT (g % 2000)::int,
       timestamptz '2024-01-01 00:00:00+00' + (g / 2000) * interval '1 minute',
       (abs(hashint8(g # {seed})) % 1000000) / 1000.0,
       (abs(hashint8(g)) % 4)::smallint
FROM generate_series(0, {n} - 1) g;
""",
}

_INDEXES = """
ALTER TABLE accounts ADD PRIMARY KEY (id);
CREATE UNIQUE INDEX accounts_email ON accounts (email);
ALTER TABLE events ADD PRIMARY KEY (id);
CREATE INDEX events_account ON events (account_id);
CREATE INDEX events_created ON events (created_at);
ALTER TABLE blobs ADD PRIMARY KEY (id);
ALTER TABLE measurements ADD PRIMARY KEY (sensor_id, ts);
"""


def db_name(scale: float) -> str:
    """`bench_s1` for scale 1.0, `bench_s0_25` for 0.25."""
    return "bench_s" + f"{scale:g}".replace(".", "_")


class BenchCluster:
    """The reusable cluster under `root`; started on a free port each time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pg = PgCluster(base=root / "pg", port=0)

    def start(self) -> PgCluster:
        conf = self.pg.datadir / "postgresql.conf"
        if not (self.pg.datadir / "PG_VERSION").exists():
            self.pg.port = free_port()
            self.pg.init()
            with open(conf, "a") as f:
                f.write(SERVER_SETTINGS)
        else:
            self.pg.stop("immediate")  # a previous run that died may have left it running
        self.pg.port = free_port()
        text = re.sub(r"(?m)^port = \d+$", f"port = {self.pg.port}", conf.read_text())
        conf.write_text(text)
        self.pg.start()
        return self.pg

    def stop(self) -> None:
        self.pg.stop("fast")


def _psql(pg: PgCluster, database: str, sql: str) -> str:
    return pg.psql(sql, database)


def ensure_dataset(pg: PgCluster, scale: float, log: Callable[[str], None] = print) -> str:
    """The database for `scale`, built now unless a complete one is there already."""
    name = db_name(scale)
    exists = pg.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
    if exists:
        with contextlib.suppress(subprocess.CalledProcessError):
            meta = pg.psql("SELECT value FROM bench_meta WHERE key = 'build'", name)
            if meta == f"v{GENERATOR_VERSION} scale={scale}":
                return name
        pg.dropdb(name)
    t0 = time.monotonic()
    log(f"generating dataset {name} (scale {scale}) ...")
    pg.createdb(name)
    counts = {table: max(1, round(rows * scale)) for table, rows in ROWS.items()}

    def build(table: str) -> None:
        sql = _TABLES[table].format(n=counts[table], seed=SEED, accounts=counts["accounts"])
        _psql(pg, name, f"BEGIN;\n{sql}\nCOMMIT;")

    # Two connections for two cores: the biggest tables start first.
    order = sorted(_TABLES, key=lambda t: -counts[t] * (4 if t == "blobs" else 1))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(build, table) for table in order]:
            future.result()
    _psql(pg, name, _INDEXES)
    _psql(pg, name, "VACUUM (FREEZE, ANALYZE)")
    _psql(
        pg,
        name,
        "CREATE TABLE bench_meta (key text PRIMARY KEY, value text NOT NULL);"
        f"INSERT INTO bench_meta VALUES ('build', 'v{GENERATOR_VERSION} scale={scale}');",
    )
    _psql(pg, name, "CHECKPOINT")
    log(f"generated {name} in {time.monotonic() - t0:.0f}s: {database_size(pg, name)}")
    return name


def database_size(pg: PgCluster, name: str) -> str:
    return pg.psql(f"SELECT pg_size_pretty(pg_database_size('{name}'))")


def database_bytes(pg: PgCluster, name: str) -> int:
    return int(pg.psql(f"SELECT pg_database_size('{name}')"))


def pg_tool(name: str) -> str:
    return str(PG_BIN / name)


def pg_env(pg: PgCluster) -> dict[str, str]:
    """Environment for the shell contenders' pg_dump / pg_restore (password via PGPASSWORD)."""
    env = dict(os.environ)
    env["PGPASSWORD"] = pg.password
    return env
