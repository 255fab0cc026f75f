"""What the tests and the benchmarks share to run the exporter against a feed on 127.0.0.1: a feed server, free
ports, the exporter's command, a process's memory and CPU from /proc, and waiting for a condition.

Standard library only, like feedgen.py: the benchmarks import it after the README's plain install, without pytest.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TEST_API_KEY = "test-secret-0123456789abcdef"
Responder = Callable[[BaseHTTPRequestHandler], None]


def serve_on_loopback(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threading HTTP server on 127.0.0.1 (a free port), serving in a daemon thread until shutdown()."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def send_kml(handler: BaseHTTPRequestHandler, body: bytes) -> None:
    """Answers the request with `body` as KML, 200 OK."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/vnd.google-earth.kml+xml")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class FeedServer:
    """Serves a KML body on 127.0.0.1 (URL carries an API-KEY, to check it never leaks); counts requests.

    `body` (or `set_body`) changes what it serves; `set_responder` takes over the whole answer (fault injection).
    """

    def __init__(self, body: bytes = b"") -> None:
        self.body = body
        self.requests = 0
        self.request_headers: list[dict[str, str]] = []
        self.responder: Responder | None = None
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                    server.request_headers.append(dict(self.headers))
                    responder = server.responder
                    body = server.body
                if responder is not None:
                    responder(self)
                    return
                send_kml(self, body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = serve_on_loopback(Handler)
        self.port = self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/b2bev-external-services/resources/kml?API-KEY={TEST_API_KEY}"

    def set_body(self, body: bytes) -> None:
        with self._lock:
            self.body = body
            self.responder = None

    def set_responder(self, responder: Responder | None) -> None:
        with self._lock:
            self.responder = responder

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


POLL_INTERVAL = 0.05


def wait_until(check: Callable[[], Any], timeout: float, what: str, details: Callable[[], str] = str) -> Any:
    """Checks `check()` until it returns something true, and returns that; fails after `timeout` seconds.

    The deadline bounds how long the condition may take on a slow machine: nothing here waits for the clock.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{details()}")
        time.sleep(POLL_INTERVAL)  # the pause between two checks of the condition


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def exporter_command() -> list[str]:
    """The installed `chargy-exporter` of this Python's environment, else the one on PATH, else `-m`."""
    script = Path(sys.executable).parent / "chargy-exporter"
    if script.exists():
        return [str(script)]
    found = shutil.which("chargy-exporter")
    return [found] if found else [sys.executable, "-m", "chargy_exporter"]


def memory_kb(pid: int) -> dict[str, int]:
    """Resident memory of a process now (VmRSS) and at its peak (VmHWM), in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far, user and system."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
