"""Whatever a local client writes on the control socket, the daemon answers or hangs up.

Hypothesis writes request lines (random bytes, random JSON values, and
requests with real and made-up commands and fields of every type) to a real
`backupd run` subprocess, so the daemon's own handler answers them: trigger
starts real runs (of a job whose database refuses connections, so they end
at once), reload re-reads the real file. Every line must get exactly one
final reply (progress events may come first), the connection must close at
EOF within a deadline, and the daemon's debug log, which would carry any
traceback, must show none.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import configs
from tests.daemon_proc import DaemonProcess
from tests.helpers import write_config
from tests.pgcluster import PgCluster, free_port

DEADLINE = 10.0  # seconds a reply may take before the example counts as a hang
FUZZ = settings(max_examples=400, deadline=None, database=None)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, pg: PgCluster) -> Iterator[DaemonProcess]:
    base = tmp_path_factory.mktemp("fuzz")
    password = base / "pw"
    password.write_text(pg.password + "\n")
    password.chmod(0o600)
    cfg = write_config(
        base / "b.toml",
        pg,
        password_file=password,
        database="postgres",
        fs_path=base / "store",
        extra_daemon={"log_level": "debug"},
    )
    # The job's database is a port nobody listens on: a fuzzed trigger fails in milliseconds.
    configs.edit(cfg, {"source.main.dsn": pg.dsn("postgres", port=free_port())})
    d = DaemonProcess(cfg, base / "daemon.log").start()
    try:
        yield d
    finally:
        d.stop()


def exchange(path: str, data: bytes) -> list[dict[str, Any]]:
    """Send `data`, close our side, read every reply line until the daemon hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):  # socket.timeout here is a hang: the test fails
            received += chunk
    assert received.endswith(b"\n") or not received, received[-200:]
    replies = [json.loads(line) for line in received.splitlines()]
    assert all(isinstance(reply, dict) for reply in replies)
    return replies


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
commands = st.sampled_from(
    ["ping", "status", "trigger", "cancel", "reload", "history", "", "PING", "trigger ", "run"]
) | st.text(max_size=12)
field_values = st.sampled_from(["app", "nope", "", "../app", "app\n", "*"]) | json_values
requests = st.fixed_dictionaries(
    {"cmd": commands},
    optional={
        "job": field_values,
        "wait": st.booleans() | json_values,
        "run_id": st.text(max_size=16) | json_values,
        "limit": st.integers(min_value=-5, max_value=2000) | json_values,
        "extra": json_values,
    },
)
# Well-typed requests of the real commands, so that runs start, reloads happen, and
# cancel and history see real run ids and limits.
plausible = st.fixed_dictionaries(
    {"cmd": st.sampled_from(["trigger", "cancel", "history", "reload", "status", "ping"])},
    optional={
        "job": st.sampled_from(["app", "nope"]),
        "wait": st.booleans(),
        "run_id": st.text(alphabet="0123456789abcdef", max_size=12),
        "limit": st.integers(min_value=0, max_value=1001),
    },
)
lines = st.one_of(
    plausible.map(lambda r: json.dumps(r).encode()),
    plausible.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    requests.map(lambda r: json.dumps(r).encode()),
    requests.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps({"cmd": v}).encode()),
)


@FUZZ
@given(st.lists(lines, min_size=1, max_size=3))
def test_every_request_line_gets_one_final_reply(daemon: DaemonProcess, batch: list[bytes]) -> None:
    data = b"\n".join(batch) + b"\n"
    replies = exchange(str(daemon.config.parent / "run" / "control.sock"), data)
    finals = [r for r in replies if "ok" in r]
    assert len(finals) == data.count(b"\n"), (data[:200], replies)
    assert all("event" in r for r in replies if "ok" not in r)
    for reply in finals:
        if reply["ok"] is False:  # an error, or the failed run a `trigger --wait` followed
            assert set(reply.get("error", {})) >= {"code", "message"} or (
                reply["run"]["state"] == "failure" and reply["run"]["error"]
            )


def test_the_daemon_survived_the_fuzzing_without_a_traceback(
    daemon: DaemonProcess, record_testsuite_property: Any
) -> None:
    """Runs after the fuzz test (file order): the daemon still answers, its log is clean."""
    replies = exchange(str(daemon.config.parent / "run" / "control.sock"), b'{"cmd": "ping"}\n')
    assert replies[-1]["ok"] is True
    log = daemon.logs()
    assert "Traceback" not in log
    crashed = {"socket_connection_failed", "socket_command_failed", "run_crashed"}
    events = daemon.events()
    assert not [e for e in events if e.get("event") in crashed]
    errors = {e.get("event") for e in events if e.get("level") == "error"}
    assert errors <= {"run_finished"}  # fuzzed triggers of a job whose database is down
    answered = [e for e in events if e.get("event") in ("socket_command", "socket_bad_request")]
    record_testsuite_property("fuzz_socket_lines", len(answered))
