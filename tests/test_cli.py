"""cli.py: what the real process writes to its log: one line per failed refresh, no library chatter."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import TEST_API_KEY, ExporterProcess, FeedServer

from chargy_exporter.cli import quiet_grpc_core

pytestmark = pytest.mark.e2e

# Every line the exporter writes goes through its formatter: a line without this prefix came from elsewhere
# (a library printing to stderr itself, a traceback, a message split over lines).
OUR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
FAILED = "feed refresh failed ("


def answer_503(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(503)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def closed_port_url() -> str:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    return f"http://127.0.0.1:{port}/kml?API-KEY={TEST_API_KEY}"


def assert_one_line_per_failure(logs: str, reason: str) -> None:
    lines = logs.splitlines()
    assert [line for line in lines if not OUR_LINE.match(line)] == []
    failures = [line for line in lines if FAILED in line]
    # Numbered 1, 2, 3...: no failed refresh went unlogged, none took two lines.
    assert [int(re.search(r"\(\w+, (\d+) in a row\)", line).group(1)) for line in failures] == list(
        range(1, len(failures) + 1)
    )
    for line in failures:
        assert f"{FAILED}{reason}, " in line and re.search(r"next try in \d+ s$", line)
    others = [line for line in lines if FAILED not in line]
    assert all(" INFO chargy_exporter: " in line for line in others), others  # startup (and shutdown) only
    for noise in ("Retry(", "_CappedRetry", "Retrying", "urllib3", "HTTPConnectionPool", TEST_API_KEY):
        assert noise not in logs


def test_a_failing_feed_logs_one_line_per_failed_refresh(
    feed_server: FeedServer, exporter_process: Callable[..., ExporterProcess]
) -> None:
    feed_server.set_responder(answer_503)
    exporter = exporter_process("--kml-url", feed_server.url, "--refresh-interval", "1")
    logs = exporter.wait_for_log(FAILED, count=2)
    assert "the feed answered HTTP 503" in logs
    assert_one_line_per_failure(logs, "http_5xx")


def test_an_unreachable_feed_logs_one_plain_line_per_failed_refresh(
    exporter_process: Callable[..., ExporterProcess],
) -> None:
    """Refused connections are what made urllib3 warn on every retry, with a repr of its Retry object."""
    exporter = exporter_process("--kml-url", closed_port_url(), "--refresh-interval", "1")
    logs = exporter.wait_for_log(FAILED, count=2)
    assert "cannot connect to the feed: Failed to establish a new connection: [Errno 111] Connection refused" in logs
    assert_one_line_per_failure(logs, "connection")


def test_urllib3_retries_still_show_at_debug(exporter_process: Callable[..., ExporterProcess]) -> None:
    exporter = exporter_process("--kml-url", closed_port_url(), "--refresh-interval", "1", "--log-level", "debug")
    logs = exporter.wait_for_log(FAILED, count=1)
    assert "urllib3.connectionpool" in logs and TEST_API_KEY not in logs


@pytest.fixture
def not_a_tls_server() -> Iterator[int]:
    """Accepts connections and answers plain text: a TLS client's handshake fails on it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stopping.set()
    thread.join(5)
    listener.close()


def test_grpc_core_prints_nothing_of_its_own(
    not_a_tls_server: int,
    feed_server: FeedServer,
    small_feed: object,
    exporter_process: Callable[..., ExporterProcess],
) -> None:
    """gRPC's C core writes to stderr itself ("Handshake failed ...", "Got goaway"); the push failure is ours to say."""
    feed_server.set_body(small_feed.kml)  # type: ignore[attr-defined]
    exporter = exporter_process(
        "--kml-url",
        feed_server.url,
        env={
            "OTEL_METRICS_EXPORTER": "prometheus,otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://127.0.0.1:{not_a_tls_server}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2000",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        },
    )
    exporter.wait_for(lambda e: sum(s.value for s in e.samples("chargy_otlp_export_errors_total")) >= 1, timeout=60)
    logs = exporter.logs()
    assert [line for line in logs.splitlines() if not OUR_LINE.match(line)] == []
    assert "Handshake failed" not in logs and "ssl_transport_security" not in logs


def test_the_users_grpc_verbosity_wins() -> None:
    environ = {"GRPC_VERBOSITY": "DEBUG"}
    quiet_grpc_core(environ, debugging=False)
    assert environ == {"GRPC_VERBOSITY": "DEBUG"}
    environ = {}
    quiet_grpc_core(environ, debugging=False)
    assert environ == {"GRPC_VERBOSITY": "NONE"}
