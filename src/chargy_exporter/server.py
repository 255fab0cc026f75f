"""The HTTP(S) server of /metrics: one asyncio event loop in a thread reads and writes every connection (h11 parses
HTTP/1.1), a few worker threads run the WSGI app on complete requests. Why ours rather than waitress, cheroot or
uvicorn: none of them has a deadline for a whole request head (their idle timeouts restart with every byte) or a limit
per client, and waitress has no TLS. The policy: a connection waits at most `idle_timeout` for a request's first
byte and HEAD_TIMEOUT from then for the whole head, however slowly it trickles; at the connection limit a new
connection evicts the oldest one of the address holding the most, so one client can never keep another out."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import queue
import resource
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Final
from urllib.parse import unquote_to_bytes

import h11

from .webconfig import WsgiApp

log = logging.getLogger(__name__)

THREADS: Final = 4  # workers running complete requests; one event-loop thread reads and writes every connection
CONNECTION_LIMIT: Final = 2048  # lowered to fit RLIMIT_NOFILE, less what the rest of the process needs
HEAD_TIMEOUT: Final = 10.0  # seconds from a request's first byte (or a TLS handshake's start) to its last header
MAX_HEAD: Final = 16384  # request line and headers; over it: 431
MAX_BODY: Final = 1024  # we take no request bodies (read and dropped up to this size); over it: 413
READ_BUFFER: Final = 65536  # bytes read ahead of the parser before reading pauses
WRITE_CHUNK: Final = 65536  # a body is written in slices: no copy of a whole body per slow scraper

Response = tuple[int, list[tuple[str, str]], bytes]


class _Protocol(asyncio.Protocol):
    """Buffers what a connection sends (reading pauses past READ_BUFFER) and tells when it can be written to."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False
        self.readable = asyncio.Event()  # data or the end arrived
        self.writable = asyncio.Event()
        self.writable.set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.readable.set()
        if len(self.buffer) > READ_BUFFER and self.transport:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self.readable.set()
        # Half-closed: a request already sent still gets its answer. TLS has no half-close (asyncio warns on True).
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.readable.set()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        self.readable.clear()
        if self.transport and not self.transport.is_closing():
            self.transport.resume_reading()
        return data


def connection_limit() -> int:
    soft_fds, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return CONNECTION_LIMIT if soft_fds == resource.RLIM_INFINITY else max(16, min(CONNECTION_LIMIT, soft_fds - 64))


class MetricsServer:
    """`app` on host:port, IPv4 or IPv6, over TLS when `tls` gives a context (called per connection, so that a
    certificate replaced on disk is served to the next one). `shutdown()` is the public stop."""

    def __init__(
        self, app: WsgiApp, host: str, port: int, idle_timeout: float, tls: Callable[[], ssl.SSLContext] | None = None
    ) -> None:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, *_, address = addresses[0]
        # dualstack: `--host ::` serves IPv4 too. SO_REUSEADDR (create_server's default): restarts rebind.
        self._sock = socket.create_server(
            address, family=family, dualstack_ipv6=family == socket.AF_INET6, backlog=1024
        )
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self.scheme = "https" if tls else "http"
        self._app, self._idle_timeout, self._tls = app, idle_timeout, tls
        self._limit = connection_limit()
        # Each address' connections (task and socket), oldest first.
        self._by_address: dict[str, dict[asyncio.Task[None], socket.socket]] = {}
        self._count = 0
        self._jobs: queue.SimpleQueue[tuple[dict[str, Any], Future[Response]] | None] = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._work, name=f"metrics-worker-{n}", daemon=True)
                         for n in range(THREADS)]  # fmt: skip
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()  # bound to the loop by _serve's wait
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),),
                                        name="metrics-http", daemon=True)  # fmt: skip
        for thread in [*self._workers, self._thread]:
            thread.start()

    def shutdown(self, timeout: float = 1.0) -> None:
        """Stop accepting, close every connection, end the loop and the workers, within about `timeout`."""
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout)
        self._sock.close()
        for _ in self._workers:
            self._jobs.put(None)
        deadline = time.monotonic() + max(0.1, timeout / 2)
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive() and not any(worker.is_alive() for worker in self._workers):
            self._loop.close()  # else a worker still running would hand its answer to a closed loop

    async def _serve(self) -> None:
        accepting = asyncio.create_task(self._accept())
        await self._stopping.wait()
        connections = [task for tasks in self._by_address.values() for task in tasks]
        for task in [accepting, *connections]:
            task.cancel()
        self._sock.close()
        await asyncio.gather(accepting, *connections, return_exceptions=True)
        for sock in [sock for socks in self._by_address.values() for sock in socks.values()]:
            sock.close()  # a task cancelled before it ran never reached its `finally`
        await asyncio.get_running_loop().shutdown_asyncgens()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self._sock)
            except OSError as error:  # out of file descriptors: the ones closing soon free some
                log.warning("cannot accept a connection: %s", error.strerror or error)
                await asyncio.sleep(0.1)
                continue
            if self._count >= self._limit:
                self._evict()
            address = str(peer[0])
            task = loop.create_task(self._connection(sock, address))
            self._by_address.setdefault(address, {})[task] = sock
            self._count += 1

    def _evict(self) -> None:
        """Close the oldest connection of the address holding the most: it is the one crowding the others out."""
        crowding = max(self._by_address.values(), key=len)
        oldest = next(iter(crowding))
        del crowding[oldest]  # counted out now: its task ends at its next await
        self._count -= 1
        oldest.cancel()

    async def _connection(self, sock: socket.socket, address: str) -> None:
        transport: asyncio.Transport | None = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            context = self._tls() if self._tls else None
            transport, protocol = await asyncio.get_running_loop().connect_accepted_socket(
                _Protocol, sock, ssl=context, ssl_handshake_timeout=HEAD_TIMEOUT if context else None
            )
            await self._exchange(transport, protocol)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.TimeoutError, h11.ProtocolError):
            pass  # the client went, sent garbage after an answer, or was too slow: nothing to tell anyone
        finally:
            if transport is None:
                sock.close()
            elif not transport.is_closing():
                transport.abort()
            mine = self._by_address.get(address, {})
            if mine.pop(asyncio.current_task(), None) is not None:  # type: ignore[arg-type]
                self._count -= 1
            if not mine:
                self._by_address.pop(address, None)

    async def _exchange(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        """Requests and answers on one connection until either side closes or a deadline passes."""
        loop = asyncio.get_running_loop()
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        server, client = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        while True:
            try:
                request = await self._next(conn, protocol, loop.time() + self._idle_timeout, head=True)
                if not isinstance(request, h11.Request):
                    return  # closed between requests
                body_size = 0
                while not isinstance(event := await self._next(conn, protocol, loop.time() + HEAD_TIMEOUT),
                                     h11.EndOfMessage):  # fmt: skip
                    if isinstance(event, h11.Data):
                        body_size += len(event.data)
                    if body_size > MAX_BODY or isinstance(event, h11.ConnectionClosed):
                        await self._send(conn, protocol, _error(413, "request body too large"))
                        return
            except h11.RemoteProtocolError as error:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._send(conn, protocol, _error(error.error_status_hint, str(error)))
                return
            environ = _environ(request, server, client, transport.get_extra_info("ssl_object") is not None)
            job: Future[Response] = Future()
            self._jobs.put((environ, job))
            await self._send(conn, protocol, await asyncio.wrap_future(job))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _next(self, conn: h11.Connection, protocol: _Protocol, deadline: float, head: bool = False) -> Any:
        """The next h11 event, by `deadline`; with `head`, from the request's first byte on by HEAD_TIMEOUT at most."""
        loop = asyncio.get_running_loop()
        while (event := conn.next_event()) is h11.NEED_DATA:
            if protocol.buffer:
                if head and conn.their_state is h11.IDLE:
                    deadline = min(deadline, loop.time() + HEAD_TIMEOUT)
                    head = False
                conn.receive_data(protocol.take())
            elif protocol.eof:
                conn.receive_data(b"")
            else:
                await asyncio.wait_for(protocol.readable.wait(), max(0.0, deadline - loop.time()))
        return event

    async def _send(self, conn: h11.Connection, protocol: _Protocol, response: Response) -> None:
        """The answer, in slices, each written once the previous ones are on their way: a client that does not
        read is dropped after idle_timeout rather than having bodies pile up in memory."""
        assert protocol.transport is not None
        status, headers, body = response
        if conn.their_state is not h11.DONE:
            headers = [*headers, ("Connection", "close")]
        chunks = [conn.send(h11.Response(status_code=status, headers=headers))]
        view: Any = memoryview(body)  # h11 types data as bytes; it takes any bytes-like value
        chunks += [conn.send(h11.Data(data=view[i : i + WRITE_CHUNK])) for i in range(0, len(body), WRITE_CHUNK)]
        chunks.append(conn.send(h11.EndOfMessage()))
        for chunk in chunks:
            if protocol.transport.is_closing():
                return
            protocol.transport.write(chunk or b"")
            if not protocol.writable.is_set():
                await asyncio.wait_for(protocol.writable.wait(), self._idle_timeout)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            environ, future = job
            if not future.set_running_or_notify_cancel():
                continue  # its connection went before a worker took it; once running, it can no longer be cancelled
            try:
                future.set_result(self._call_app(environ))
            except BaseException as error:  # handed to the connection
                future.set_exception(error)

    def _call_app(self, environ: dict[str, Any]) -> Response:
        started: list[Any] = []
        try:
            chunks = self._app(environ, lambda status, headers, exc_info=None: started.extend((status, headers)))
            body = b"".join(chunks)
        except Exception:
            log.exception("error answering %s", environ["PATH_INFO"])
            return _error(500, "internal error")
        status, headers = started
        return int(status.split(" ", 1)[0]), headers, body


def _error(status: int, reason: str) -> Response:
    body = f"{reason}\n".encode()
    return status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))], body


def _environ(request: h11.Request, server: Any, client: Any, tls: bool) -> dict[str, Any]:
    """PEP 3333's environ for a request without a body."""
    path, _, query = request.target.partition(b"?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method.decode("ascii", "replace"),
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{request.http_version.decode('ascii', 'replace')}",
        "REMOTE_ADDR": str(client[0]) if client else "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https" if tls else "http",
        "wsgi.input": io.BytesIO(),  # no body: always empty
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in request.headers:
        key = name.decode("latin-1").upper().replace("-", "_")
        key = key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"
        text = value.decode("latin-1")
        environ[key] = f"{environ[key]},{text}" if key in environ else text
    return environ
