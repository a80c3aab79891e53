"""The control socket: a real server on a temp socket, real clients, real peers.

Peers other than root are real processes run as `nobody` through setpriv, so
the refusal comes from the kernel's SO_PEERCRED, not from a stub.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from backupd.daemon.control import (
    MAX_LINE,
    CommandError,
    ControlServer,
    Peer,
    SocketSetupError,
    call,
    default_socket_path,
    request,
)
from backupd.errors import DaemonUnreachable

NOBODY = 65534
REPO = Path(__file__).resolve().parents[1]


class Commands:
    """A tiny command set standing in for the daemon's handler."""

    def __init__(self) -> None:
        self.release_slow = asyncio.Event()
        self.slow_ended = asyncio.Event()

    async def __call__(self, req: dict[str, Any], peer: Peer) -> AsyncIterator[dict[str, Any]]:
        cmd = req["cmd"]
        if cmd == "ping":
            yield {"ok": True, "version": "test"}
        elif cmd == "echo":
            yield {"ok": True, "data": req.get("data"), "uid": peer.uid, "pid": peer.pid}
        elif cmd == "progress":
            for n in range(3):
                yield {"event": "attempt", "n": n}
            yield {"ok": True, "attempts": 3}
        elif cmd == "slow":
            try:
                yield {"event": "started"}
                await self.release_slow.wait()
                for _ in range(64):
                    yield {"event": "chunk", "data": "x" * 4096}
                yield {"ok": True}
            finally:
                self.slow_ended.set()
        elif cmd == "raise":
            raise RuntimeError("boom: secret-ish detail")
        else:
            raise CommandError("unknown_command", f"unknown command {cmd!r}")


Starter = Callable[..., Awaitable[ControlServer]]


@pytest.fixture
def commands() -> Commands:
    return Commands()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "control.sock")


@pytest.fixture
async def start_server(commands: Commands, sock_path: str) -> AsyncIterator[Starter]:
    """Start ControlServers (default: the test commands on `sock_path`); all closed at the end."""
    servers: list[ControlServer] = []

    async def start(path: str = sock_path, **options: Any) -> ControlServer:
        server = ControlServer(path, commands, **options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def umask_077() -> Iterator[None]:
    """backupd runs with umask 0077; the socket mode must not depend on it."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


async def connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path, limit=4 * MAX_LINE)


async def read_reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    async with asyncio.timeout(5):
        line = await reader.readline()
    assert line.endswith(b"\n"), f"connection closed instead of a reply: {line!r}"
    reply: dict[str, Any] = json.loads(line)
    return reply


async def read_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything left until the server closes (fails the test if it never does)."""
    async with asyncio.timeout(5):
        return await reader.read()


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def error_code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    code: str = reply["error"]["code"]
    return code


# --- protocol ------------------------------------------------------------------------------------


async def test_ping_round_trip_is_logged_with_the_peer(start_server: Starter) -> None:
    server = await start_server()
    with structlog.testing.capture_logs() as logs:
        reply = await call(server.path, {"cmd": "ping"})
    assert reply == {"ok": True, "version": "test"}
    assert {
        "event": "socket_command",
        "cmd": "ping",
        "uid": os.getuid(),
        "pid": os.getpid(),
        "log_level": "info",
    } in logs


async def test_one_connection_serves_many_requests_in_order(start_server: Starter) -> None:
    server = await start_server()
    reader, writer = await connect(server.path)
    writer.write(b'{"cmd": "ping"}\n{"cmd": "echo", "data": [1, 2]}\n{"cmd": "nope"}\n')
    assert await read_reply(reader) == {"ok": True, "version": "test"}
    echoed = await read_reply(reader)
    assert (echoed["data"], echoed["uid"], echoed["pid"]) == ([1, 2], os.getuid(), os.getpid())
    assert error_code(await read_reply(reader)) == "unknown_command"
    writer.write(b'{"cmd": "ping"}\n')
    assert (await read_reply(reader))["ok"] is True
    await close(writer)


async def test_progress_events_stream_before_the_final_reply(start_server: Starter) -> None:
    server = await start_server()
    replies = [reply async for reply in request(server.path, {"cmd": "progress"})]
    assert replies == [
        {"event": "attempt", "n": 0},
        {"event": "attempt", "n": 1},
        {"event": "attempt", "n": 2},
        {"ok": True, "attempts": 3},
    ]
    assert await call(server.path, {"cmd": "progress"}) == {"ok": True, "attempts": 3}


async def test_command_error_becomes_an_error_reply(start_server: Starter) -> None:
    server = await start_server()
    reply = await call(server.path, {"cmd": "frobnicate"})
    assert reply == {
        "ok": False,
        "error": {"code": "unknown_command", "message": "unknown command 'frobnicate'"},
    }


async def test_a_crashing_command_is_an_internal_error_not_a_crash(start_server: Starter) -> None:
    server = await start_server()
    reader, writer = await connect(server.path)
    with structlog.testing.capture_logs() as logs:
        writer.write(b'{"cmd": "raise"}\n')
        reply = await read_reply(reader)
    assert error_code(reply) == "internal"
    assert "boom" not in reply["error"]["message"]
    failed = [e for e in logs if e["event"] == "socket_command_failed"]
    assert failed[0]["log_level"] == "error" and "boom" in failed[0]["error"]
    assert failed[1]["log_level"] == "debug" and failed[1]["exc_info"] is True
    writer.write(b'{"cmd": "ping"}\n')
    assert (await read_reply(reader))["ok"] is True
    await close(writer)


@pytest.mark.parametrize(
    "line",
    [
        b"{not json\n",
        b"\xff\xfe\x00garbage\n",
        b"[1, 2, 3]\n",
        b'"ping"\n',
        b'{"command": "ping"}\n',
        b'{"cmd": 42}\n',
        b"\n",
        b"[" * 60_000 + b"\n",  # nesting deep enough to blow the parser's recursion limit
    ],
    ids=["broken", "binary", "array", "string", "no-cmd", "cmd-not-string", "empty", "deep"],
)
async def test_bad_requests_get_bad_request_and_the_connection_stays_usable(
    start_server: Starter, line: bytes
) -> None:
    server = await start_server()
    reader, writer = await connect(server.path)
    writer.write(line)
    assert error_code(await read_reply(reader)) == "bad_request"
    writer.write(b'{"cmd": "ping"}\n')
    assert (await read_reply(reader))["ok"] is True
    await close(writer)


async def test_last_request_without_newline_is_answered(start_server: Starter) -> None:
    server = await start_server()
    reader, writer = await connect(server.path)
    writer.write(b'{"cmd": "ping"}')
    writer.write_eof()
    assert (await read_reply(reader))["ok"] is True
    assert await read_eof(reader) == b""
    await close(writer)


# --- abuse ---------------------------------------------------------------------------------------


async def test_oversized_line_gets_too_large_then_closed(start_server: Starter) -> None:
    server = await start_server()
    reader, writer = await connect(server.path)
    writer.write(b'{"cmd": "echo", "data": "' + b"x" * (70 * 1024) + b'"}\n')
    assert error_code(await read_reply(reader)) == "too_large"
    assert await read_eof(reader) == b""
    await close(writer)
    assert (await call(server.path, {"cmd": "ping"}))["ok"] is True


async def test_line_of_exactly_the_limit_is_accepted(start_server: Starter) -> None:
    server = await start_server()
    head, tail = b'{"cmd": "echo", "data": "', b'"}'
    line = head + b"x" * (MAX_LINE - len(head) - len(tail)) + tail
    assert len(line) == MAX_LINE
    reader, writer = await connect(server.path)
    writer.write(line + b"\n")
    assert (await read_reply(reader))["ok"] is True
    await close(writer)


@pytest.mark.parametrize("sent", [b"", b'{"cmd": "pi'], ids=["silent", "half-a-line"])
async def test_idle_client_is_closed_after_idle_timeout(start_server: Starter, sent: bytes) -> None:
    server = await start_server(idle_timeout=0.2)
    reader, writer = await connect(server.path)
    writer.write(sent)
    assert await read_eof(reader) == b""
    await close(writer)


async def test_client_leaving_mid_reply_closes_the_command_and_not_the_server(
    start_server: Starter, commands: Commands
) -> None:
    server = await start_server()
    reader, writer = await connect(server.path)
    writer.write(b'{"cmd": "slow"}\n')
    assert await read_reply(reader) == {"event": "started"}
    await close(writer)
    commands.release_slow.set()
    async with asyncio.timeout(5):
        await commands.slow_ended.wait()
    assert (await call(server.path, {"cmd": "ping"}))["ok"] is True


async def test_connections_beyond_the_cap_get_busy(start_server: Starter) -> None:
    server = await start_server(max_connections=2)
    held = [await connect(server.path) for _ in range(2)]
    for reader, writer in held:  # a reply proves each holds a slot
        writer.write(b'{"cmd": "ping"}\n')
        assert (await read_reply(reader))["ok"] is True
    assert error_code(await call(server.path, {"cmd": "ping"})) == "busy"
    await close(held[0][1])

    async def served() -> bool:
        return (await call(server.path, {"cmd": "ping"}))["ok"] is True

    await eventually(served, "a freed slot")
    await close(held[1][1])


async def test_hundreds_of_concurrent_clients_are_answered_and_no_fd_leaks(
    start_server: Starter, sock_path: str
) -> None:
    baseline = open_fds()
    server = await start_server()

    async def client(n: int) -> dict[str, Any]:
        if n % 3:
            return await call(sock_path, {"cmd": "echo", "data": n})
        reader, writer = await connect(sock_path)
        try:
            writer.write(b"{malformed\n")
            return await read_reply(reader)
        finally:
            await close(writer)

    replies = await asyncio.gather(*(client(n) for n in range(300)))
    for n, reply in enumerate(replies):
        if reply.get("ok") is False and error_code(reply) == "busy":
            continue
        if n % 3:
            assert reply["data"] == n
        else:
            assert error_code(reply) == "bad_request"
    assert sum(r.get("ok") is True for r in replies) > 0
    assert (await call(sock_path, {"cmd": "ping"}))["ok"] is True

    async def only_the_listener_open() -> bool:
        return open_fds() == baseline + 1

    await eventually(only_the_listener_open, "server-side connections to close")
    await server.close()
    assert open_fds() == baseline


async def test_close_drops_clients_cancels_commands_and_removes_the_socket(
    start_server: Starter, commands: Commands, sock_path: str
) -> None:
    baseline = open_fds()
    server = await start_server()
    reader, writer = await connect(sock_path)
    writer.write(b'{"cmd": "slow"}\n')
    assert await read_reply(reader) == {"event": "started"}
    await server.close()
    assert commands.slow_ended.is_set()
    assert await read_eof(reader) == b""
    await close(writer)
    assert not os.path.exists(sock_path)
    assert open_fds() == baseline


# --- the socket file -----------------------------------------------------------------------------


@pytest.mark.usefixtures("umask_077")
@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
async def test_socket_has_exactly_the_requested_mode(
    start_server: Starter, sock_path: str, mode: int
) -> None:
    await start_server(mode=mode)
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode
    parent = Path(sock_path).parent
    assert stat.S_IMODE(parent.stat().st_mode) == 0o700  # created private
    assert os.listdir(parent) == ["control.sock"]  # no leftover from binding


@pytest.mark.usefixtures("umask_077")
async def test_socket_group_owns_socket_and_new_directory(
    start_server: Starter, sock_path: str
) -> None:
    gid = grp.getgrnam("daemon").gr_gid
    await start_server(group="daemon")
    st = os.stat(sock_path)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
    parent = os.stat(Path(sock_path).parent)
    assert (stat.S_IMODE(parent.st_mode), parent.st_gid) == (0o750, gid)


async def test_unknown_group_is_refused(start_server: Starter) -> None:
    with pytest.raises(SocketSetupError, match="no-such-group-xyz"):
        await start_server(group="no-such-group-xyz")


@pytest.mark.parametrize("dir_mode", [0o777, 0o1777])
async def test_world_writable_directory_is_refused(
    start_server: Starter, tmp_path: Path, dir_mode: int
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(dir_mode)
    with pytest.raises(SocketSetupError, match="world-writable"):
        await start_server(str(shared / "control.sock"))
    assert os.listdir(shared) == []


async def test_stale_socket_from_a_dead_daemon_is_replaced(
    start_server: Starter, sock_path: str
) -> None:
    os.makedirs(os.path.dirname(sock_path), mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # the file stays behind, nothing listens
    with pytest.raises(DaemonUnreachable, match="nothing listens"):
        await call(sock_path, {"cmd": "ping"})
    await start_server()
    assert (await call(sock_path, {"cmd": "ping"}))["ok"] is True


async def test_second_server_on_a_live_socket_is_refused(
    start_server: Starter, sock_path: str
) -> None:
    await start_server()
    with pytest.raises(SocketSetupError, match=f"another backupd is running on {sock_path}"):
        await start_server()
    assert (await call(sock_path, {"cmd": "ping"}))["ok"] is True


async def test_path_that_is_not_a_socket_is_left_alone(
    start_server: Starter, sock_path: str
) -> None:
    os.makedirs(os.path.dirname(sock_path), mode=0o700)
    Path(sock_path).write_text("precious")
    with pytest.raises(SocketSetupError, match="not a socket"):
        await start_server()
    assert Path(sock_path).read_text() == "precious"


async def test_directory_that_cannot_be_created_is_a_setup_error(
    start_server: Starter, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SocketSetupError, match="cannot create the control socket"):
        await start_server(str(tmp_path / "file" / "control.sock"))


async def test_path_too_long_for_a_unix_socket_is_refused(
    start_server: Starter, tmp_path: Path
) -> None:
    with pytest.raises(SocketSetupError, match="longer than"):
        await start_server(str(tmp_path / ("d" * 120) / "control.sock"))


# --- the client ----------------------------------------------------------------------------------


async def test_client_on_a_missing_socket_raises_daemon_unreachable(sock_path: str) -> None:
    with pytest.raises(DaemonUnreachable, match=f"no control socket at {sock_path}"):
        await call(sock_path, {"cmd": "ping"})


async def test_client_reports_a_server_that_hangs_up_without_a_final_reply(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "rude.sock")

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"event": "attempt"}\n')
        writer.close()

    rude = await asyncio.start_unix_server(hang_up, path)
    async with rude:
        with pytest.raises(DaemonUnreachable, match="closed the connection before its final"):
            await call(path, {"cmd": "ping"})


async def test_client_times_out_on_a_server_that_never_answers(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    requests_seen = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        requests_seen.set()
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_unix_server(mute, path)
    async with server:
        with pytest.raises(DaemonUnreachable, match="no reply from the daemon"):
            await call(path, {"cmd": "ping"}, timeout=0.2)
    assert requests_seen.is_set()


async def test_client_reports_a_full_listen_backlog(tmp_path: Path) -> None:
    path = str(tmp_path / "stuck.sock")
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(path)
    stuck.listen(0)  # never accepts
    waiting: list[socket.socket] = []
    try:
        while True:
            pending = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waiting.append(pending)
            pending.setblocking(False)
            try:
                pending.connect(path)
            except BlockingIOError:
                break
        with pytest.raises(DaemonUnreachable, match="too many pending connections"):
            await call(path, {"cmd": "ping"})
    finally:
        for sock in [*waiting, stuck]:
            sock.close()


@pytest.mark.parametrize(
    ("cli", "config", "expected"),
    [
        ("/tmp/a.sock", "/run/b.sock", "/tmp/a.sock"),
        (None, "/run/b.sock", "/run/b.sock"),
        (None, None, "/run/backupd/control.sock"),
    ],
)
def test_default_socket_path(cli: str | None, config: str | None, expected: str) -> None:
    assert default_socket_path(cli, config) == expected


# --- peers other than us -------------------------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a client as another user",
)

CLIENT = """
import asyncio, json, sys
from backupd.daemon.control import call
from backupd.errors import DaemonUnreachable
try:
    print(json.dumps(asyncio.run(call(sys.argv[1], {"cmd": "ping"}))))
except DaemonUnreachable as exc:
    print(json.dumps({"unreachable": str(exc)}))
"""


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory `nobody` can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="backupd-ctl-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def ping_as_nobody(path: str, *groups: int) -> dict[str, Any]:
    """Ping through the real client, run as uid/gid 65534 with only `groups` as extra groups."""
    group_args = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    proc = await asyncio.create_subprocess_exec(
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        *group_args,
        sys.executable,
        "-c",
        CLIENT,
        path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "PATH": os.environ["PATH"]},
        cwd="/",
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


@needs_root
async def test_peer_not_allowed_is_refused_and_logged(
    start_server: Starter, public_dir: Path
) -> None:
    path = str(public_dir / "control.sock")
    with structlog.testing.capture_logs() as logs:
        await start_server(path, mode=0o666)  # the file mode lets nobody in; SO_PEERCRED must not
        reply = await ping_as_nobody(path)
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden"
    refused = [e for e in logs if e["event"] == "socket_peer_refused"]
    assert len(refused) == 1
    assert refused[0]["uid"] == NOBODY and refused[0]["log_level"] == "warning"
    assert refused[0]["pid"] > 0
    assert not [e for e in logs if e["event"] == "socket_command"]


@needs_root
async def test_allow_uids_lets_the_peer_in(start_server: Starter, public_dir: Path) -> None:
    path = str(public_dir / "control.sock")
    await start_server(path, mode=0o666, allow_uids=[NOBODY])
    assert await ping_as_nobody(path) == {"ok": True, "version": "test"}


@needs_root
async def test_socket_group_member_is_let_in(start_server: Starter, public_dir: Path) -> None:
    path = str(public_dir / "control.sock")
    daemon_gid = grp.getgrnam("daemon").gr_gid
    await start_server(path, mode=0o660, group="daemon")
    assert await ping_as_nobody(path, daemon_gid) == {"ok": True, "version": "test"}
    assert (await ping_as_nobody(path))["unreachable"].startswith("permission denied")


@needs_root
async def test_file_mode_denial_says_permission_denied(
    start_server: Starter, public_dir: Path
) -> None:
    path = str(public_dir / "control.sock")
    await start_server(path, mode=0o600)
    reply = await ping_as_nobody(path)
    assert reply == {"unreachable": f"permission denied on {path}: are you in the socket group?"}
