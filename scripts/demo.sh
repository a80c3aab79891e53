#!/usr/bin/env bash
# backupd end to end on this machine (`make demo`): a throwaway PostgreSQL 15
# cluster with sample data, the daemon, a backup triggered by hand, a restore
# into a new database, row counts compared, metrics read, a clean shutdown.
#
# Everything lives under var/demo/ (or $DEMO_DIR) and is started on loopback
# ports chosen at random; whatever the script started is stopped when it exits,
# on success or failure. Backups and logs stay for a look; `make clean` removes them.
#
# Environment:
#   BACKUPD          the backupd executable (default: .venv/bin/backupd, else PATH)
#   PG_BIN           PostgreSQL 15 server and client programs (default /usr/lib/postgresql/15/bin)
#   DEMO_DIR         working directory (default var/demo); wiped at start
#   DEMO_STOP_AFTER  "db": stop once the sample database is loaded (no backupd needed)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
DEMO_DIR=${DEMO_DIR:-$ROOT/var/demo}
DEMO_STOP_AFTER=${DEMO_STOP_AFTER:-}
if [[ -z ${BACKUPD:-} ]]; then
  if [[ -x $ROOT/.venv/bin/backupd ]]; then BACKUPD=$ROOT/.venv/bin/backupd; else BACKUPD=backupd; fi
fi
mkdir -p "$DEMO_DIR"
DEMO_DIR=$(cd "$DEMO_DIR" && pwd)
PG_DIR=$DEMO_DIR/pg
DATA=$PG_DIR/data
SECRETS=$DEMO_DIR/secrets
PASSWORD_FILE=$SECRETS/pg-password
CONF=$DEMO_DIR/backupd.toml
LOG=$DEMO_DIR/backupd.log
BACKUP_DIR=$DEMO_DIR/backups
CONTROL_SOCKET=$DEMO_DIR/run/control.sock
export BACKUPD_CONFIG=$CONF # client commands find the socket and storage through it

if [[ -t 1 ]]; then bold=$'\e[1m' red=$'\e[31m' plain=$'\e[0m'; else bold='' red='' plain=''; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
die() {
  printf '%sdemo: %s%s\n' "$red" "$*" "$plain" >&2
  exit 1
}

# initdb and the postmaster refuse to run as root: as root, the cluster belongs to postgres.
if [[ $(id -u) -eq 0 ]]; then
  id -u postgres >/dev/null 2>&1 || die "running as root and there is no postgres user to own the cluster"
  as_owner() { setpriv --reuid=postgres --regid=postgres --clear-groups -- "$@"; }
else
  as_owner() { "$@"; }
fi

DAEMON_PID=''
PG_STARTED=''
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
  fi
  if [[ -n $PG_STARTED ]]; then
    as_owner "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -f "$PG_DIR/pwfile"
  if [[ $rc -ne 0 ]]; then
    if [[ -s $LOG ]]; then
      printf '\n--- last lines of %s ---\n' "$LOG" >&2
      tail -n 30 "$LOG" >&2
    fi
    printf '%sdemo failed (exit %s); logs: %s, %s%s\n' "$red" "$rc" "$LOG" "$PG_DIR/log" "$plain" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

psql_as() { # psql_as DATABASE [psql args...]: as the superuser, over TCP with the password
  local db=$1
  shift
  PGPASSWORD=$PG_PASSWORD "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 \
    -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$db" "$@"
}

row_counts() { # row_counts DATABASE: "schema.table count" per user table, sorted
  local db=$1 table
  for table in $SOURCE_TABLES; do
    printf '%s %s\n' "$table" "$(psql_as "$db" -c "SELECT count(*) FROM $table" 2>/dev/null || echo missing)"
  done
}

step "Throwaway PostgreSQL 15 cluster in $PG_DIR"
[[ -x $PG_BIN/initdb ]] || die "no $PG_BIN/initdb: run 'make deps-system' (Debian package postgresql-15)"
if [[ -f $DATA/postmaster.pid ]]; then # a previous demo that was killed -9
  as_owner "$PG_BIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
fi
rm -rf "$DEMO_DIR"
mkdir -p "$PG_DIR/sock" "$SECRETS" "$BACKUP_DIR" "$DEMO_DIR/run"
chmod 0700 "$SECRETS" "$BACKUP_DIR" "$DEMO_DIR/run"
read -r PG_PORT HTTP_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
PG_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
(umask 077 && printf '%s\n' "$PG_PASSWORD" >"$PASSWORD_FILE")
(umask 077 && printf '%s\n' "$PG_PASSWORD" >"$PG_DIR/pwfile")
if [[ $(id -u) -eq 0 ]]; then
  chown -R postgres:postgres "$PG_DIR"
  as_owner test -w "$PG_DIR" ||
    die "the postgres user cannot reach $PG_DIR: make its parent directories world-searchable (chmod o+x) or set DEMO_DIR"
fi
as_owner "$PG_BIN/initdb" -D "$DATA" -U postgres --auth=scram-sha-256 --pwfile="$PG_DIR/pwfile" \
  -E UTF8 --no-sync >"$PG_DIR/initdb.log"
rm -f "$PG_DIR/pwfile"
# A demo cluster: durability settings off for speed, reachable on loopback only.
cat >>"$DATA/postgresql.conf" <<EOF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_DIR/sock'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
as_owner "$PG_BIN/pg_ctl" -D "$DATA" -l "$PG_DIR/log" -w -t 60 start >/dev/null
PG_STARTED=1
echo "listening on 127.0.0.1:$PG_PORT (scram-sha-256; password in $PASSWORD_FILE)"

step "Sample database 'demo'"
psql_as postgres -c 'CREATE DATABASE demo'
psql_as demo <<'SQL'
CREATE TABLE customers (
  id int PRIMARY KEY,
  name text NOT NULL,
  email text NOT NULL UNIQUE,
  created_at timestamptz NOT NULL
);
INSERT INTO customers
  SELECT g, 'customer ' || g, 'c' || g || '@example.test', '2025-01-01'::timestamptz + g * interval '1 hour'
  FROM generate_series(1, 10000) g;
CREATE TABLE orders (
  id bigint PRIMARY KEY,
  customer_id int NOT NULL REFERENCES customers (id),
  total numeric(10, 2) NOT NULL,
  placed_at timestamptz NOT NULL
);
INSERT INTO orders
  SELECT g, 1 + g % 10000, (g % 9973) / 10.0, '2025-01-01'::timestamptz + g * interval '7 minutes'
  FROM generate_series(1, 60000) g;
CREATE INDEX orders_customer ON orders (customer_id);
CREATE TABLE events (id bigserial PRIMARY KEY, kind text NOT NULL, payload jsonb NOT NULL);
INSERT INTO events (kind, payload)
  SELECT (ARRAY['login', 'view', 'purchase'])[1 + g % 3], jsonb_build_object('n', g, 'md5', md5(g::text))
  FROM generate_series(1, 30000) g;
CREATE SCHEMA reporting;
CREATE TABLE reporting.daily_revenue AS
  SELECT placed_at::date AS day, sum(total) AS revenue, count(*) AS orders
  FROM orders GROUP BY 1 ORDER BY 1;
CREATE VIEW reporting.top_customers AS
  SELECT customer_id, sum(total) AS spent FROM orders GROUP BY 1 ORDER BY 2 DESC LIMIT 10;
SQL
SOURCE_TABLES=$(psql_as demo -c "SELECT schemaname || '.' || tablename FROM pg_tables
  WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1")
SOURCE_COUNTS=$(row_counts demo)
echo "$SOURCE_COUNTS" | awk '{ printf "  %-28s %8d rows\n", $1, $2; total += $2 } END { printf "  %-28s %8d rows\n", "total", total }'

if [[ $DEMO_STOP_AFTER == db ]]; then
  step "Stopping after the database (DEMO_STOP_AFTER=db)"
  exit 0
fi

step "Config $CONF (from config/demo.toml)"
python3 - "$ROOT/config/demo.toml" "$CONF" \
  "PG_PORT=$PG_PORT" "PG_BIN=$PG_BIN" "PASSWORD_FILE=$PASSWORD_FILE" \
  "CONTROL_SOCKET=$CONTROL_SOCKET" "HTTP_LISTEN=127.0.0.1:$HTTP_PORT" "BACKUP_DIR=$BACKUP_DIR" <<'PY'
import re
import sys

template, target, *pairs = sys.argv[1:]
lines = open(template, encoding="utf-8").read().splitlines(keepends=True)
while lines and (lines[0].startswith("#") or not lines[0].strip()):
    lines.pop(0)  # the template's own header describes the placeholders
text = "# Generated by scripts/demo.sh from config/demo.toml.\n\n" + "".join(lines)
for pair in pairs:
    key, value = pair.split("=", 1)
    # every placeholder sits inside a TOML basic string (or a port inside one)
    text = text.replace(f"@{key}@", value.replace("\\", "\\\\").replace('"', '\\"'))
left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
if left:
    sys.exit(f"demo: unfilled placeholders in config/demo.toml: {', '.join(left)}")
open(target, "w", encoding="utf-8").write(text)
PY
chmod 0600 "$CONF"
command -v "$BACKUPD" >/dev/null || die "no backupd executable ($BACKUPD): run 'make .venv'"
"$BACKUPD" check -c "$CONF"

step "Starting the daemon (log: $LOG)"
"$BACKUPD" run -c "$CONF" >"$LOG" 2>&1 &
DAEMON_PID=$!
deadline=$((SECONDS + 30))
until "$BACKUPD" status >/dev/null 2>&1; do
  kill -0 "$DAEMON_PID" 2>/dev/null || die "backupd exited during start-up"
  ((SECONDS < deadline)) || die "backupd did not answer 'backupd status' within 30 s"
  sleep 0.2
done
"$BACKUPD" status

step "Backup: backupd trigger demo --wait"
"$BACKUPD" trigger demo --wait

step "Backups in storage: backupd list demo"
"$BACKUPD" list demo
echo
find "$BACKUP_DIR" -type f -printf '  %P  %s bytes\n' | sort

step "Restore into a new database 'restored'"
psql_as postgres -c 'CREATE DATABASE restored'
RESTORE_DSN="postgresql://postgres@127.0.0.1:$PG_PORT/restored"
echo "backupd restore demo --backup latest --to $RESTORE_DSN"
PGPASSWORD=$PG_PASSWORD "$BACKUPD" restore demo --backup latest --to "$RESTORE_DSN"

step "Row counts: source vs restored"
RESTORED_COUNTS=$(row_counts restored)
mismatch=0
printf '  %-28s %10s %10s\n' table demo restored
while read -r table source_count && read -r _ restored_count <&3; do
  mark=''
  if [[ $source_count != "$restored_count" ]]; then mark='  <-- MISMATCH' mismatch=1; fi
  printf '  %-28s %10s %10s%s\n' "$table" "$source_count" "$restored_count" "$mark"
done <<<"$SOURCE_COUNTS" 3<<<"$RESTORED_COUNTS"
((mismatch == 0)) || die "the restored database differs from the source"
echo "every table restored with all its rows"

step "Metrics: http://127.0.0.1:$HTTP_PORT/metrics"
python3 - "$HTTP_PORT" <<'PY'
import re
import sys
import urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
for path in ("/healthz", "/readyz"):
    with urllib.request.urlopen(base + path, timeout=5) as resp:
        print(f"  GET {path}: {resp.status}")
with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
    text = resp.read().decode()

# (metric, labels that must be present): each must have a sample with a value > 0
wanted = [
    ("backupd_job_runs_total", {"job": "demo", "result": "success"}),
    ("backupd_job_last_success_timestamp_seconds", {"job": "demo"}),
    ("backupd_job_last_size_bytes", {"job": "demo"}),
    ("backupd_bytes_written_total", {"job": "demo", "storage": "local"}),
    ("backupd_job_next_run_timestamp_seconds", {"job": "demo"}),
    ("backupd_build_info", {}),
]
sample = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
missing = []
for name, labels in wanted:
    found = None
    for line in text.splitlines():
        m = sample.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()) and float(m.group(3)) > 0:
            found = line
            break
    print(f"  {found}" if found else f"  MISSING {name} {labels}")
    if not found:
        missing.append(name)
if missing:
    sys.exit(f"demo: metrics missing or zero: {', '.join(missing)}")
PY

step "Stopping the daemon (SIGTERM)"
kill -TERM "$DAEMON_PID"
deadline=$((SECONDS + 45)) # the demo config's shutdown_grace is 30s
while kill -0 "$DAEMON_PID" 2>/dev/null; do
  ((SECONDS < deadline)) || die "backupd still running 45 s after SIGTERM"
  sleep 0.2
done
rc=0
wait "$DAEMON_PID" || rc=$?
DAEMON_PID=''
((rc == 0)) || die "backupd exited with status $rc after SIGTERM"
echo "backupd stopped cleanly"

step "Stopping PostgreSQL"
as_owner "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
PG_STARTED=''

step "Done"
echo "backups: $BACKUP_DIR"
echo "daemon log: $LOG"
echo "config: $CONF"
