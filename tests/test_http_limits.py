"""prometheus.py's HTTP server under load and abuse: idle and slow connections, many scrapers, hostile headers,
shutdown, and the real process' memory."""

from __future__ import annotations

import http.client
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import http_get, memory_kb, parse_exposition, wait_until
from feedgen import generate_feed
from opentelemetry.sdk.resources import Resource
from test_prometheus import CLOSED_SET, hostile_requests, scrape_all

from chargy_exporter.kml import parse_kml
from chargy_exporter.metrics import MetricsPipeline
from chargy_exporter.model import FeedStatus, State
from chargy_exporter.prometheus import THREADS, MetricsServer, PrometheusEndpoint

# Short enough for a test to wait for, long enough that a scrape on a loaded machine finishes well within it.
TIMEOUT = 3
CLEANUP_INTERVAL = 1  # how often the server looks for idle connections (seconds)


@dataclass
class Served:
    endpoint: PrometheusEndpoint
    pipeline: MetricsPipeline
    server: MetricsServer
    threads_before: int
    server_threads: set[threading.Thread]  # the ones the server started

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


def serve(stations: int, idle_timeout: int = TIMEOUT, host: str = "127.0.0.1") -> Served:
    before = set(threading.enumerate())
    endpoint = PrometheusEndpoint()
    pipeline = MetricsPipeline(Resource.create({}), on_published=[endpoint.render])
    pipeline.publish(State(parse_kml(generate_feed(stations=stations, seed=3).kml), FeedStatus(up=True)))
    server = endpoint.serve(host, 0, idle_timeout)
    return Served(endpoint, pipeline, server, len(before), set(threading.enumerate()) - before)


@pytest.fixture
def served() -> Iterator[Served]:
    served = serve(stations=20)
    yield served
    served.server.shutdown()
    served.pipeline.shutdown()


def connect_many(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if first_bytes:
            sock.sendall(first_bytes)
        sockets.append(sock)
    return sockets


def still_open(sock: socket.socket) -> bool:
    """Neither closed by the server nor sent anything: a non-blocking read has nothing to return yet."""
    sock.setblocking(False)
    try:
        sock.recv(1)
        return False
    except BlockingIOError:
        return True
    except ConnectionError:
        return False
    finally:
        sock.setblocking(True)


def wait_all_closed_by_server(sockets: list[socket.socket], deadline: float) -> int:
    """Waits until the server closed every socket (EOF or reset), up to `deadline`; returns how many it closed."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    closed = 0
    try:
        while closed < len(sockets) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except ConnectionError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    closed += 1
    finally:
        selector.close()
    return closed


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


@pytest.mark.slow  # ~3.5 s each
@pytest.mark.parametrize(
    "first_bytes", [b"", b"GET /metrics HTTP/1.1\r\nHost: x\r\n"], ids=["idle", "headers-never-finished"]
)
def test_a_thousand_idle_or_stalled_connections_take_no_thread_and_are_closed_after_the_timeout(served, first_bytes):
    assert threading.active_count() - served.threads_before <= THREADS + 1  # the event loop and the worker pool
    threads = set(threading.enumerate())
    sockets = connect_many(served.server.port, 1000, first_bytes)
    try:
        started = time.monotonic()
        status, _, body = http_get(served.base + "/metrics", timeout=TIMEOUT)
        assert status == 200 and parse_exposition(body.decode()).value("chargy_feed_up") == 1
        # Answered while the thousand connections were still open, with no thread more.
        assert time.monotonic() - started < TIMEOUT and all(still_open(sock) for sock in sockets[::50])
        assert set(threading.enumerate()) <= threads
        # Then the server closes them, about TIMEOUT (+ cleanup_interval) after their last activity.
        closed = wait_all_closed_by_server(sockets, time.monotonic() + TIMEOUT + CLEANUP_INTERVAL + 20)
        assert closed == len(sockets)
    finally:
        close_all(sockets)
    assert http_get(served.base + "/healthz")[0] == 200


def test_clients_that_do_not_read_take_no_thread(served):
    threads = set(threading.enumerate())
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 20  # pipelined, never read
    sockets = []
    try:
        for _ in range(50):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", served.server.port))
            sock.sendall(request)
            sockets.append(sock)
        for _ in range(5):
            assert http_get(served.base + "/metrics", timeout=TIMEOUT)[0] == 200
        assert set(threading.enumerate()) <= threads  # no thread more (one from an earlier test may have ended)
    finally:
        close_all(sockets)


def test_shutdown_is_quick_and_complete_with_connections_open():
    served = serve(20, idle_timeout=60)
    port = served.server.port
    sockets = connect_many(port, 100) + connect_many(port, 100, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    assert http_get(served.base + "/metrics")[0] == 200
    try:
        started = time.monotonic()
        served.server.shutdown()
        assert time.monotonic() - started < 2
        # The loop and the workers are gone, the connections closed, the port free.
        assert not any(thread.name == "metrics-http" for thread in threading.enumerate())
        # A worker told to stop has still to return from its last line.
        wait_until(lambda: not any(thread.is_alive() for thread in served.server_threads), 10, "the workers to end")
        assert wait_all_closed_by_server(sockets, time.monotonic() + 5) == len(sockets)
        with socket.socket() as sock:  # no listener left (the closed connections may linger in TIME_WAIT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
    finally:
        close_all(sockets)
        served.pipeline.shutdown()


def test_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    served = serve(stations=5, host="::1")
    try:
        assert http_get(f"http://[::1]:{served.server.port}/healthz")[0] == 200
    finally:
        served.server.shutdown()
        served.pipeline.shutdown()


def test_a_port_in_use_raises_oserror(served):
    with pytest.raises(OSError):
        served.endpoint.serve("127.0.0.1", served.server.port)


# ---- the real process ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_hostile_headers_and_filters_cost_the_real_process_no_memory(feed_server, exporter_process):
    feed_server.set_body(generate_feed(stations=40, seed=31).kml)
    exporter = exporter_process("--kml-url", feed_server.url, "--refresh-interval", "300")
    exporter.wait_until_up()
    # Warm up: every kept body, the workers, the allocator.
    scrape_all(exporter.base_url, hostile_requests(100))
    every_body = [("/metrics", {"Accept": accept, "Accept-Encoding": "gzip" if gzipped else ""})
                  for accept, gzipped in CLOSED_SET]  # fmt: skip
    scrape_all(exporter.base_url, every_body)
    before = memory_kb(exporter.process.pid)["VmRSS"]
    assert scrape_all(exporter.base_url, hostile_requests(1000)) == 2000
    after = memory_kb(exporter.process.pid)["VmRSS"]
    assert after - before < 5 * 1024, f"RSS {before} KiB -> {after} KiB"
    logs = exporter.logs()
    assert "Traceback" not in logs and "tok" not in logs


@pytest.mark.e2e
@pytest.mark.slow
def test_two_hundred_concurrent_scrapers_of_the_real_feed(feed_server, exporter_process):
    feed = generate_feed(connectors=1800, seed=32)
    connectors = len(feed.connectors)  # computed once: the property builds the whole list
    feed_server.set_body(feed.kml)
    exporter = exporter_process("--kml-url", feed_server.url, "--refresh-interval", "300")
    exporter.wait_until_up()
    scrapers, scrapes = 200, 3
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(scrapers)

    def scraper() -> None:
        start.wait()
        for _ in range(scrapes):
            began = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=60)
            try:
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                body = response.read()
                ok = response.status == 200 and body.count(b"\nchargy_connector_detailed_state_info{") == connectors
                outcome = None if ok else f"status {response.status}, {len(body)} bytes"
            except OSError as error:
                outcome = repr(error)
            finally:
                connection.close()
            with lock:
                if outcome is None:
                    latencies.append(time.perf_counter() - began)
                else:
                    failures.append(outcome)

    threads = [threading.Thread(target=scraper) for _ in range(scrapers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures and len(latencies) == scrapers * scrapes
    p99 = sorted(latencies)[int(0.99 * len(latencies))]
    assert p99 <= 2.0, f"p99 {p99:.2f} s"
