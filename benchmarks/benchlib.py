"""What the benchmarks share: a feed server on 127.0.0.1, a free port, the exporter's command, a process's memory.

Standard library only, like tests/feedgen.py (the feed generator, imported from tests/): the benchmarks run after
the README's plain install (`pip install .`), without pytest or the test extra.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # for `import feedgen`


def serve_on_loopback(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threading HTTP server on 127.0.0.1 (a free port), serving in a daemon thread until shutdown()."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


class FeedServer:
    """Serves one KML body on 127.0.0.1, under a URL with an API-KEY like the real one."""

    def __init__(self, body: bytes, api_key: str = "benchmark-secret-key") -> None:
        self.body = body
        self.api_key = api_key
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.google-earth.kml+xml")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = serve_on_loopback(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/kml?API-KEY={self.api_key}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


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


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far, user and system (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kb(pid: int) -> dict[str, int]:
    """Resident memory of a process now (VmRSS) and at its peak (VmHWM), in KiB (Linux /proc)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values
