"""A loopback HTTP endpoint that misbehaves on purpose, for notifier tests.

The first path segment says how to answer: `r301`/`r302`/`r307` redirect to
`/landing/<rest>` (an absolute Location that repeats the path and query),
`loop` redirects to itself, `500` answers 500, `hang` reads the request and
never answers, `drop` closes the connection without answering, `landing`
answers 200. Plain sockets in threads: no logging of its own, so a test that
captures every log line of its process only sees backupd's and its libraries'.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class _Handler(socketserver.StreamRequestHandler):
    server: WebhookServer

    def handle(self) -> None:
        line = self.rfile.readline(65537).decode("latin-1")
        length = 0
        while (header := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        self.rfile.read(length)
        parts = line.split(" ")
        if len(parts) != 3:
            return
        target = parts[1]
        self.server.requests.append(target)
        mode, _, rest = target.lstrip("/").partition("/")
        if mode == "hang":
            self.server.release.wait(60)
            return
        if mode == "drop":
            return
        location = ""
        status = 200
        if mode in ("r301", "r302", "r307"):
            status = int(mode[1:])
            location = f"{self.server.url}/landing/{rest}"
        elif mode == "loop":
            status = 302
            location = f"{self.server.url}{target}"
        elif mode == "500":
            status = 500
        head = f"HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n"
        if location:
            head += f"Location: {location}\r\n"
        self.wfile.write((head + "\r\n").encode())


class WebhookServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server_address[1]}"
        self.requests: list[str] = []
        self.release = threading.Event()
        self._tls = tls

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        if self._tls is None:
            return sock, address
        sock.settimeout(5)
        return self._tls.wrap_socket(sock, server_side=True), address  # SSLError: dropped

    def modes(self) -> list[str]:
        return [target.lstrip("/").partition("/")[0] for target in self.requests]


def self_signed_tls(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate (no client trusts it)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", "1", "-subj", "/CN=backupd-test"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@contextmanager
def webhook_server(tls: ssl.SSLContext | None = None) -> Iterator[WebhookServer]:
    server = WebhookServer(tls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def unanswered_connects() -> Iterator[int]:
    """A port whose accept queue is full: connecting never completes (SYNs are dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@contextmanager
def speaks_first_in_plain_http() -> Iterator[int]:
    """A port that answers every connection at once with a plain-HTTP 400 and closes it:
    a TLS client reads that as its handshake's reply."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()
