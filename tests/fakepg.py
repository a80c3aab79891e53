"""A fake PostgreSQL server that asks every client for a cleartext password.

What an attacker would run to collect the password libpq offers it: it
answers SSLRequest with "no", asks for the password in clear text, records
what it gets, and hangs up. Runs in a thread with its own event loop, on a
free loopback port.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SSL_REQUEST = 80877103
GSS_REQUEST = 80877104
AUTH_CLEARTEXT = struct.pack("!cii", b"R", 8, 3)


class FakePostgres:
    def __init__(self) -> None:
        self.connections = 0
        self.passwords: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            async with asyncio.timeout(10):
                while True:
                    length, code = struct.unpack("!ii", await reader.readexactly(8))
                    await reader.readexactly(length - 8)
                    if code in (SSL_REQUEST, GSS_REQUEST):
                        writer.write(b"N")
                        await writer.drain()
                        continue
                    break
                writer.write(AUTH_CLEARTEXT)
                await writer.drain()
                kind = await reader.readexactly(1)
                (length,) = struct.unpack("!i", await reader.readexactly(4))
                body = await reader.readexactly(length - 4)
                if kind == b"p":
                    self.passwords.append(body.rstrip(b"\0").decode(errors="replace"))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> asyncio.Server:
            return await asyncio.start_server(self._client, "127.0.0.1", 0)

        server = self._loop.run_until_complete(start())
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    def start(self) -> FakePostgres:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the fake PostgreSQL server did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextmanager
def fake_postgres() -> Iterator[FakePostgres]:
    server = FakePostgres().start()
    try:
        yield server
    finally:
        server.stop()
