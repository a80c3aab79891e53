"""The control socket: a Unix stream socket speaking newline-delimited JSON.

The server knows the protocol, not the commands: the daemon plugs in a handler,
an async generator that yields progress events and then one final reply (the
first dict with an "ok" key). Everything a hostile or broken local client can
do (wrong credentials, bad JSON, huge lines, silence, vanishing mid-reply,
floods) ends in an error reply or a closed connection, never a crash or a
leaked file descriptor. The client half is what `backupd trigger`, `status`,
`cancel` and `reload` use.
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
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger

from backupd.config.model import DEFAULT_SOCKET_PATH
from backupd.errors import BackupdError, DaemonUnreachable

MAX_LINE = 64 * 1024
"""Longest request line the server reads; a longer one is answered "too_large"."""

MAX_REPLY_LINE = 16 * 1024 * 1024
"""Longest reply line the client reads (status and history can be long)."""

LINGER = 1.0
"""Seconds a refused connection is kept open so the client can read why."""

BACKLOG = 1024
"""Listen backlog: a burst of clients waits in the kernel instead of failing to connect."""

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
_BIND_PREFIX = ".bind-"


@dataclass(frozen=True, slots=True)
class Peer:
    """The credentials of the process at the other end, as the kernel reports them."""

    uid: int
    gid: int
    pid: int


Handler = Callable[[dict[str, Any], Peer], AsyncIterator[dict[str, Any]]]
"""Answers one request: yields progress events, then the final reply (the first with "ok")."""


class CommandError(Exception):
    """Raised by a handler to answer `{"ok": false, "error": {"code", "message"}}`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SocketSetupError(BackupdError):
    """The control socket cannot be created safely (unsafe directory, path in use)."""


class ControlServer:
    """Serves the control socket; `start()` returns once it listens.

    Only the socket's owner (our euid), root, `allow_uids` and members of
    `group` are served; the kernel's SO_PEERCRED decides, not only the file
    mode. At most `max_connections` clients are served at once; more are
    answered "busy".
    """

    def __init__(
        self,
        path: str,
        handler: Handler,
        *,
        mode: int = 0o660,
        group: str | None = None,
        allow_uids: Iterable[int] = (),
        idle_timeout: float = 30.0,
        max_connections: int = 256,
        logger: FilteringBoundLogger | None = None,
    ) -> None:
        self.path = path
        self._handler = handler
        self._mode = mode
        self._group = group
        self._allow_uids = frozenset(allow_uids)
        self._idle_timeout = idle_timeout
        self._log: FilteringBoundLogger = logger or structlog.get_logger("backupd.control")
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(max_connections)
        self._tasks: set[asyncio.Task[None]] = set()
        self._gid: int | None = None
        self._inode: int | None = None

    async def start(self) -> str:
        """Create the socket with its final mode and group, listen, and return its path."""
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            raise SocketSetupError(
                f"control socket path {self.path} is longer than {_SUN_PATH_MAX} bytes"
            )
        self._gid = _group_id(self._group) if self._group is not None else None
        try:
            parent = _prepare_directory(self.path, self._gid)
            _refuse_if_taken(self.path)
            sock = _bind_in_place(self.path, parent, self._mode, self._gid)
        except OSError as exc:
            raise SocketSetupError(f"cannot create the control socket {self.path}: {exc}") from exc
        try:
            self._inode = os.stat(self.path).st_ino
            self._server = await asyncio.start_unix_server(
                self._on_connect, sock=sock, limit=MAX_LINE, backlog=BACKLOG
            )
        except BaseException:
            sock.close()
            self._remove_socket_file()
            raise
        self._log.info("socket_listening", path=self.path, mode=f"{self._mode:04o}")
        return self.path

    async def close(self) -> None:
        """Stop accepting, drop every client (cancelling its command) and remove the socket."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        """Unlink the socket only if it is still ours (a successor may have replaced it)."""
        if self._inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._inode = None

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Track every connection from the moment it is accepted, so close() reaches it."""
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(lambda _: self._tasks.discard(task))
        task.add_done_callback(lambda _: writer.close())  # also when cancelled before it ran

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = _peer_of(writer)
            if not self._allowed(peer):
                self._log.warning("socket_peer_refused", uid=peer.uid, gid=peer.gid, pid=peer.pid)
                await self._refuse(reader, writer, "forbidden", "not allowed to use this socket")
            elif self._slots.locked():
                self._log.warning("socket_busy", uid=peer.uid, pid=peer.pid)
                await self._refuse(reader, writer, "busy", "too many connections, try again")
            else:
                async with self._slots:
                    await self._serve_requests(reader, writer, peer)
        except (ConnectionError, TimeoutError) as exc:
            self._log.debug("socket_client_gone", error=str(exc))
        except Exception as exc:
            self._log.error("socket_connection_failed", error=str(exc))
            self._log.debug("socket_connection_failed", exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _allowed(self, peer: Peer) -> bool:
        if peer.uid in (0, os.geteuid()) or peer.uid in self._allow_uids:
            return True
        if self._gid is None:
            return False
        return peer.gid == self._gid or self._gid in _supplementary_groups(peer.pid)

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        """Answer one request per line until EOF, silence, or a line that is too long."""
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    line = await reader.readuntil(b"\n")
                at_eof = False
            except asyncio.IncompleteReadError as exc:  # EOF; a last line may lack its newline
                line, at_eof = exc.partial, True
            except asyncio.LimitOverrunError:
                self._log.warning("socket_request_too_large", uid=peer.uid, pid=peer.pid)
                await self._refuse(
                    reader, writer, "too_large", f"request line longer than {MAX_LINE} bytes"
                )
                return
            except TimeoutError:
                self._log.debug("socket_idle_closed", uid=peer.uid, pid=peer.pid)
                return
            if at_eof and not line.strip():
                return
            request, problem = _parse_request(line)
            if request is None:
                self._log.info("socket_bad_request", uid=peer.uid, pid=peer.pid, reason=problem)
                await self._send(writer, _error_reply("bad_request", problem))
            else:
                await self._answer(writer, request, peer)
            if at_eof:
                return

    async def _answer(
        self, writer: asyncio.StreamWriter, request: dict[str, Any], peer: Peer
    ) -> None:
        """Stream the handler's replies up to and including its final one."""
        cmd = request["cmd"]
        self._log.info("socket_command", cmd=cmd, uid=peer.uid, pid=peer.pid)
        replies = self._handler(request, peer)
        try:
            final = False
            while not final:
                line, final = await self._next_reply(replies, cmd)
                await self._write(writer, line)
        finally:
            aclose = getattr(replies, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _next_reply(
        self, replies: AsyncIterator[dict[str, Any]], cmd: str
    ) -> tuple[bytes, bool]:
        """The handler's next reply, encoded, and whether it is the final one.

        A handler that fails, or ends without a final reply, still gets its
        client a final reply, so no client waits forever.
        """
        try:
            reply = await anext(replies)
            return _encode(reply), "ok" in reply
        except CommandError as exc:
            self._log.info("socket_command_error", cmd=cmd, code=exc.code, message=exc.message)
            reply = _error_reply(exc.code, exc.message)
        except StopAsyncIteration:
            self._log.error("socket_command_failed", cmd=cmd, error="ended without a final reply")
            reply = _error_reply("internal", f"{cmd} ended without a reply")
        except Exception as exc:
            self._log.error("socket_command_failed", cmd=cmd, error=str(exc))
            self._log.debug("socket_command_failed", cmd=cmd, exc_info=True)
            reply = _error_reply("internal", f"{cmd} failed; the daemon's log has the details")
        return _encode(reply), True

    async def _send(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        await self._write(writer, _encode(reply))

    async def _write(self, writer: asyncio.StreamWriter, line: bytes) -> None:
        """Write one line; a client that stops reading for `idle_timeout` is dropped."""
        writer.write(line)
        async with asyncio.timeout(self._idle_timeout):
            await writer.drain()

    async def _refuse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        code: str,
        message: str,
    ) -> None:
        """Reply with an error, then close without resetting the connection.

        Closing a Unix socket with unread input makes the peer's next read fail
        with ECONNRESET, which can swallow the reply: so shut down our side and
        discard what the client still sends, for at most LINGER seconds.
        """
        await self._send(writer, _error_reply(code, message))
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER):
                while await reader.read(MAX_LINE):
                    pass


def _prepare_directory(path: str, gid: int | None) -> str:
    """Create the socket's directory if missing; refuse one that anybody can write to."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
        os.chmod(parent, 0o750 if gid is not None else 0o700)
        if gid is not None:
            os.chown(parent, -1, gid)
    if os.stat(parent).st_mode & stat.S_IWOTH:
        raise SocketSetupError(
            f"refusing to create the control socket in {parent}: the directory is world-writable"
        )
    return parent


def _refuse_if_taken(path: str) -> None:
    """Fail if something else owns `path`; a socket nobody listens on is stale and replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketSetupError(f"{path} exists and is not a socket; remove it or pick another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a Unix connect succeeds or fails at once
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return
        except BlockingIOError:
            pass  # its listen backlog is full: very much alive
    raise SocketSetupError(f"another backupd is running on {path}")


def _bind_in_place(path: str, parent: str, mode: int, gid: int | None) -> socket.socket:
    """Bind in a private 0700 directory, set mode and group, then rename onto `path`.

    The socket is never reachable with a wider mode or the wrong group, and this
    does not touch the process umask, which other threads rely on. The rename
    also replaces a stale socket atomically.
    """
    private = tempfile.mkdtemp(prefix=_BIND_PREFIX, dir=parent)
    try:
        temp_path = os.path.join(private, "s")
        if len(os.fsencode(temp_path)) > _SUN_PATH_MAX:
            raise SocketSetupError(
                f"control socket directory {parent} is too deep for a Unix socket path"
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(temp_path)
            os.chmod(temp_path, mode)
            if gid is not None:
                os.chown(temp_path, -1, gid)
            os.rename(temp_path, path)
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SocketSetupError(f"socket_group {name!r} does not exist") from None


def _peer_of(writer: asyncio.StreamWriter) -> Peer:
    sock = writer.get_extra_info("socket")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(uid=uid, gid=gid, pid=pid)


def _supplementary_groups(pid: int) -> frozenset[int]:
    """The peer's supplementary groups from /proc; empty if it already exited."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return frozenset()


def _parse_request(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """The request object, or None and what is wrong with the line."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return None, "the request is not valid JSON"
    if not isinstance(request, dict):
        return None, "the request must be a JSON object"
    if not isinstance(request.get("cmd"), str):
        return None, 'the request needs a string "cmd"'
    return request, ""


def _error_reply(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"


def default_socket_path(cli_value: str | None, config_socket: str | None) -> str:
    """`--socket PATH`, else the config's `daemon.socket`, else /run/backupd/control.sock."""
    return cli_value or config_socket or DEFAULT_SOCKET_PATH


async def request(
    path: str,
    payload: dict[str, Any],
    *,
    timeout: float | None = 10.0,  # noqa: ASYNC109 - a deadline per step, not for the whole call
) -> AsyncIterator[dict[str, Any]]:
    """Send one request and yield every reply line, the final one (with "ok") last.

    `timeout` bounds sending the request and each wait for a reply line, so
    a long `trigger --wait` that keeps sending events is fine; None waits forever.
    Stopping early? Close the generator (`contextlib.aclosing`) to drop the connection.
    """
    sock = _connect(path)
    try:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_REPLY_LINE)
    except BaseException:
        sock.close()
        raise
    try:
        try:
            writer.write(_encode(payload))
            async with asyncio.timeout(timeout):
                await writer.drain()
        except TimeoutError:
            raise DaemonUnreachable(f"the daemon on {path} does not read its socket") from None
        except OSError as exc:
            raise DaemonUnreachable(f"lost the connection to the daemon on {path}: {exc}") from exc
        while True:
            reply = await _read_reply(reader, path, timeout)
            yield reply
            if "ok" in reply:
                return
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def call(
    path: str,
    payload: dict[str, Any],
    *,
    timeout: float | None = 10.0,  # noqa: ASYNC109 - a deadline per step, see request()
) -> dict[str, Any]:
    """Send one request and return its final reply, skipping progress events."""
    return [reply async for reply in request(path, payload, timeout=timeout)][-1]


def _connect(path: str) -> socket.socket:
    """Connect without blocking: a Unix connect succeeds or fails at once.

    asyncio's own connect mistakes EAGAIN (the daemon's listen backlog is full)
    for a connect in progress and then reports a vague lost connection.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise DaemonUnreachable(_connect_failure(path, exc)) from None
    return sock


def _connect_failure(path: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no control socket at {path}: is backupd running?"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing listens on {path}: backupd is not running (stale socket)"
    if isinstance(exc, PermissionError):
        return f"permission denied on {path}: are you in the socket group?"
    if isinstance(exc, BlockingIOError):
        return f"the daemon on {path} has too many pending connections; try again"
    return f"cannot connect to {path}: {exc}"


async def _read_reply(
    reader: asyncio.StreamReader, path: str, seconds: float | None
) -> dict[str, Any]:
    try:
        async with asyncio.timeout(seconds):
            line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise DaemonUnreachable(
            f"the daemon on {path} closed the connection before its final reply"
        ) from None
    except asyncio.LimitOverrunError:
        raise DaemonUnreachable(
            f"a reply from {path} is longer than {MAX_REPLY_LINE} bytes"
        ) from None
    except TimeoutError:
        raise DaemonUnreachable(f"no reply from the daemon on {path} within {seconds}s") from None
    except OSError as exc:
        raise DaemonUnreachable(f"lost the connection to the daemon on {path}: {exc}") from exc
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise DaemonUnreachable(f"the socket at {path} does not answer like backupd")
    return reply
