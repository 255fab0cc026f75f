"""Fault injection against the real `chargy-exporter` process (issue 4).

Each test serves a good feed on 127.0.0.1, waits until the exporter is up, then makes the feed misbehave and
checks, while the fault lasts, that:

- /metrics answers every scrape within 2 s;
- the connector and station series are exactly those of the last good feed;
- `chargy_feed_up` is 0 and `chargy_feed_refresh_errors_total{reason=...}` names the failure;
- the exporter's memory stays bounded (peak RSS, VmHWM, under 300 MB);
- neither the API key nor the content of a local file reaches the logs or /metrics;

and finally that the exporter recovers on the first good response.

Refreshes are triggered with SIGHUP (the exporter refreshes at once) rather than by waiting for an interval, so
every step waits for the condition it is about and the refresh interval itself (300 s) never elapses.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import (
    TEST_API_KEY,
    ExporterProcess,
    FeedServer,
    exporter_command,
    http_get,
    memory_kb,
    parse_exposition,
    wait_until,
)
from feedgen import GeneratedFeed, evolve, generate_feed

pytestmark = pytest.mark.e2e

# Refreshes come from SIGHUP. The fetch timeout leaves a loaded machine room for the retries of a fault that is
# not about time; the faults that are (a server too slow, or silent) get SHORT, so that they fail a refresh quickly.
FAST = ("--refresh-interval", "300", "--fetch-timeout", "10", "--log-level", "debug")
SHORT = ("--fetch-timeout", "1")
SCRAPE_LIMIT_S = 2.0
RSS_LIMIT_KB = 300 * 1024
SERIES = ("chargy_connector_state", "chargy_connector_detailed_state_info", "chargy_station_info")


# ---- helpers --------------------------------------------------------------------------------------------------------


def series(exposition: object) -> frozenset[tuple[str, tuple[tuple[str, str], ...], float]]:
    """The data series (not the self-metrics) of a scrape, as a comparable set."""
    return frozenset(
        (name, tuple(sorted(sample.labels.items())), sample.value)
        for name in SERIES
        for sample in exposition.samples(name)  # type: ignore[attr-defined]
    )


def detailed(exposition: object) -> dict[str, str]:
    """connector → raw state, from chargy_connector_detailed_state_info."""
    return {
        s.labels["connector"]: s.labels["state"]
        for s in exposition.samples("chargy_connector_detailed_state_info")  # type: ignore[attr-defined]
    }


def expected_detailed(feed: GeneratedFeed) -> dict[str, str]:
    return {c.connector: c.state for c in feed.connectors}


class Watch:
    """Scrapes an exporter, checking every scrape: answered within 2 s, no secret, and while `expected` is set,
    exactly those data series (the last good snapshot); samples the exporter's memory."""

    def __init__(self, exporter: ExporterProcess, forbidden: tuple[str, ...]) -> None:
        self.exporter = exporter
        self.forbidden = forbidden
        self.expected: frozenset[tuple[str, tuple[tuple[str, str], ...], float]] | None = None
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.scrapes = 0
        self.peak_rss_kb = 0
        self.logs = ""

    def scrape(self):  # -> Exposition
        if self.exporter.process.poll() is not None:
            raise AssertionError(f"exporter exited with {self.exporter.process.returncode}:\n{self.exporter.logs()}")
        started = time.monotonic()
        status, _, body = http_get(self.exporter.base_url + "/metrics", timeout=SCRAPE_LIMIT_S)
        elapsed = time.monotonic() - started
        self.scrapes += 1
        assert status == 200
        assert elapsed < SCRAPE_LIMIT_S, f"a scrape took {elapsed:.2f} s"
        text = body.decode("utf-8")
        for secret in self.forbidden:
            assert secret not in text, "a secret reached /metrics"
        self.peak_rss_kb = max(self.peak_rss_kb, memory_kb(self.exporter.process.pid)["VmRSS"])
        exposition = parse_exposition(text)
        if self.expected is not None:
            assert series(exposition) == self.expected, "the last good snapshot changed during the fault"
        self._check_counters(exposition)
        return exposition

    def _check_counters(self, exposition) -> None:  # type: ignore[no-untyped-def]
        # Error counters never go down, whatever happens to the feed.
        for name in ("chargy_feed_refresh_errors_total", "chargy_feed_skipped_records_total"):
            for sample in exposition.samples(name):
                key = (name, tuple(sorted(sample.labels.items())))
                assert sample.value >= self.counters.get(key, 0.0), f"{key} went down"
                self.counters[key] = sample.value

    def until(self, predicate: Callable[[object], bool], timeout: float, what: str):  # -> Exposition
        def check():  # type: ignore[no-untyped-def]
            exposition = self.scrape()
            return exposition if predicate(exposition) else None

        return wait_until(check, timeout, what, lambda: f"logs:\n{self.exporter.logs()[-4000:]}")


def errors(exposition: object, reason: str) -> float:
    return exposition.value("chargy_feed_refresh_errors_total", reason=reason) or 0.0  # type: ignore[attr-defined]


# ---- a raw socket server: accepts connections and answers only when told to -----------------------------------------


class RawServer:
    """Plain TCP: in "good" mode answers any request with `body`; in "hang" mode accepts, reads, never answers;
    in "good once" mode answers one request, then hangs."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.mode = "good"
        self._lock = threading.Lock()
        self.good_answers = 0
        self._held: list[socket.socket] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/b2bev-external-services/resources/kml?API-KEY={TEST_API_KEY}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                connection, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        request = b""
        try:
            while b"\r\n\r\n" not in request:
                data = connection.recv(65536)
                if not data:
                    connection.close()
                    return
                request += data
            with self._lock:
                mode = self.mode
                if mode == "good once":
                    self.mode = "hang"
            if mode == "hang":
                self._held.append(connection)  # never answered, never closed until the test ends
                return
            self.good_answers += 1
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.body)}\r\nConnection: close\r\n\r\n"
            connection.sendall(head.encode() + self.body)
            connection.close()
        except OSError:
            connection.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for connection in self._held:
            connection.close()


# ---- the faults -----------------------------------------------------------------------------------------------------

Responder = Callable[[BaseHTTPRequestHandler], None]


def status_responder(status: int, body: bytes = b"error\n", headers: dict[str, str] | None = None) -> Responder:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in {"Content-Type": "text/plain", **(headers or {})}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


def body_responder(body: bytes, content_type: str = "application/vnd.google-earth.kml+xml") -> Responder:
    return status_responder(200, body, {"Content-Type": content_type})


def slow_responder(body: bytes, delay: float = 3.0) -> Responder:
    """The whole answer comes after the timeout."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(delay)  # the stimulus: a server slower than --fetch-timeout
        with contextlib.suppress(OSError):
            body_responder(body)(handler)

    return respond


def trickle_responder(body: bytes) -> Responder:
    """Headers at once, then the body one byte every 0.2 s: no single read ever times out."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            for index in range(len(body)):
                handler.wfile.write(body[index : index + 1])
                handler.wfile.flush()
                time.sleep(0.2)  # the stimulus: a byte every 0.2 s, each read within the socket timeout
        except OSError:
            handler.close_connection = True

    return respond


def reset_responder(after_bytes: int | None = None, body: bytes = b"") -> Responder:
    """Reset the connection (RST): before answering, or after `after_bytes` of the body."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        if after_bytes is not None:
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body[:after_bytes])
            handler.wfile.flush()
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.close_connection = True
        handler.connection.close()
        handler.wfile = open(os.devnull, "wb")  # noqa: SIM115 - the stdlib flushes wfile after do_GET

    return respond


def streaming_responder(total: int, declare_length: bool) -> Responder:
    """A KML document of `total` bytes, streamed: Placemarks after Placemarks, with or without Content-Length."""
    placemark = generate_feed(stations=1, seed=3).kml.split(b"<Placemark>")[1].split(b"</Placemark>")[0]
    chunk = (b"<Placemark>" + placemark + b"</Placemark>\n") * 64

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/vnd.google-earth.kml+xml")
        if declare_length:
            handler.send_header("Content-Length", str(total))
        else:
            handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        sent = 0
        try:
            handler.wfile.write(b'<kml xmlns="http://www.opengis.net/kml/2.2"><Document>\n')
            while sent < total:
                handler.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass

    return respond


def gzip_bomb_responder() -> Responder:
    """1 GiB of XML whitespace compressed to about 1 MB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(b'<kml xmlns="http://www.opengis.net/kml/2.2"><Document>')]
    block = b" " * (1024 * 1024)
    parts.extend(compressor.compress(block) for _ in range(1024))
    parts.append(compressor.flush())
    body = b"".join(parts)

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/vnd.google-earth.kml+xml")
        handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        with contextlib.suppress(OSError):
            handler.wfile.write(body)

    return respond


BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE kml [\n<!ENTITY lol "lol">\n'
    + b"".join(
        f'<!ENTITY lol{n} "{("&lol" + (str(n - 1) if n > 1 else "") + ";") * 10}">\n'.encode() for n in range(1, 10)
    )
    + b']>\n<kml xmlns="http://www.opengis.net/kml/2.2"><Document><Placemark><name>&lol9;</name>'
    b"</Placemark></Document></kml>\n"
)

HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>The upstream server is unavailable.</p></body></html>\n"
)

EMPTY_DOCUMENT = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<kml xmlns="http://www.opengis.net/kml/2.2"><Document>'
    b"<name>Chargy charging stations</name></Document></kml>\n"
)


def under_the_byte_cap(unit: bytes, size: int = 19 * 1024 * 1024) -> bytes:
    """A KML document of about `size` bytes (below the default 20 MiB cap) repeating `unit` in its Document."""
    head, tail = b'<kml xmlns="http://www.opengis.net/kml/2.2"><Document>', b"</Document></kml>"
    return head + unit * ((size - len(head) - len(tail)) // len(unit)) + tail


def minimal_connectors_document() -> bytes:
    """Half a million tiny, distinct connectors in 19 MiB: as series, gigabytes; must be refused, cheaply."""
    parts, number, size = [], 0, 0
    while size < 19 * 1024 * 1024:
        connectors = ",".join(f'{{"name":"{number + i}","description":"A"}}' for i in range(100))
        number += 100
        part = (
            '<Placemark><ExtendedData><Data name="chargingdevice"><value>{"name":"CP","connectors":['
            f"{connectors}]}}</value></Data></ExtendedData></Placemark>"
        ).encode()
        parts.append(part)
        size += len(part)
    return b'<kml xmlns="http://www.opengis.net/kml/2.2"><Document>' + b"".join(parts) + b"</Document></kml>"


def xxe_document(path: Path) -> bytes:
    return (
        f'<?xml version="1.0"?>\n<!DOCTYPE kml [<!ENTITY xxe SYSTEM "{path.as_uri()}">]>\n'
        '<kml xmlns="http://www.opengis.net/kml/2.2"><Document><Placemark><name>&xxe;</name>'
        "<address>&xxe;</address></Placemark></Document></kml>\n"
    ).encode()


@dataclass
class Fault:
    reason: str
    make: Callable[[GeneratedFeed, Path], Responder]
    memory_check: bool = False
    extra_args: tuple[str, ...] = ()


FAULTS = {
    "http_500": Fault("http_5xx", lambda feed, tmp: status_responder(500)),
    "http_503": Fault("http_5xx", lambda feed, tmp: status_responder(503, b"<html>Service Unavailable</html>")),
    "http_503_retry_after_an_hour": Fault(
        "http_5xx", lambda feed, tmp: status_responder(503, headers={"Retry-After": "3600"})
    ),
    "http_401": Fault("unauthorized", lambda feed, tmp: status_responder(401, b"Invalid API key")),
    "http_403": Fault("unauthorized", lambda feed, tmp: status_responder(403, b"Forbidden")),
    "slower_than_timeout": Fault("timeout", lambda feed, tmp: slow_responder(feed.kml), extra_args=SHORT),
    "body_trickle": Fault("timeout", lambda feed, tmp: trickle_responder(feed.kml), extra_args=SHORT),
    "connection_reset": Fault("connection", lambda feed, tmp: reset_responder()),
    "reset_mid_body": Fault("broken_response", lambda feed, tmp: reset_responder(1000, feed.kml)),
    "html_error_page_200": Fault("not_kml", lambda feed, tmp: body_responder(HTML_ERROR_PAGE, "text/html")),
    "truncated_xml": Fault("malformed_xml", lambda feed, tmp: body_responder(feed.kml[: len(feed.kml) * 2 // 3])),
    "entity_expansion_bomb": Fault(
        "forbidden_xml", lambda feed, tmp: body_responder(BILLION_LAUGHS), memory_check=True
    ),
    "external_entity_xxe": Fault(
        "forbidden_xml", lambda feed, tmp: body_responder(xxe_document(tmp / "local-secret.txt")), memory_check=True
    ),
    "huge_document_streamed": Fault(
        "too_large", lambda feed, tmp: streaming_responder(200 * 1024 * 1024, False), memory_check=True
    ),
    "huge_document_declared": Fault(
        "too_large", lambda feed, tmp: streaming_responder(200 * 1024 * 1024, True), memory_check=True
    ),
    "gzip_bomb": Fault("too_large", lambda feed, tmp: gzip_bomb_responder(), memory_check=True),
    "empty_document": Fault("empty_feed", lambda feed, tmp: body_responder(EMPTY_DOCUMENT)),
    "two_million_junk_elements": Fault(
        "too_many_records", lambda feed, tmp: body_responder(under_the_byte_cap(b'<x a="1"/>')), memory_check=True
    ),
    "half_a_million_connectors": Fault(
        "too_many_records", lambda feed, tmp: body_responder(minimal_connectors_document()), memory_check=True
    ),
}

LOCAL_FILE_MARKER = "LOCAL-FILE-MARKER-7f3c9e21"


@pytest.fixture(scope="module")
def feeds() -> tuple[GeneratedFeed, GeneratedFeed]:
    first = generate_feed(stations=120, seed=11, odd_shapes=True)
    second = evolve(first, seed=12, state_changes=0.5, removed=0.05, added_stations=3)
    return first, second


def check_fault(
    exporter: ExporterProcess,
    inject: Callable[[], None],
    serve_good_once: Callable[[bytes], None],
    reason: str,
    feeds: tuple[GeneratedFeed, GeneratedFeed],
    forbidden: tuple[str, ...] = (TEST_API_KEY,),
    fault_timeout: float = 30,
) -> Watch:
    first, second = feeds
    watch = Watch(exporter, forbidden)
    exporter.wait_until_up()
    before = watch.scrape()
    assert detailed(before) == expected_detailed(first)
    counted_before = errors(before, reason)

    # From here until the feed is good again, every scrape must show exactly the last good series.
    watch.expected = series(before)
    inject()
    exporter.refresh_now()
    during = watch.until(lambda e: errors(e, reason) > counted_before, fault_timeout, f"fault counted as {reason}")
    assert during.value("chargy_feed_up") == 0.0
    other_reasons = {
        s.labels["reason"]: s.value
        for s in during.samples("chargy_feed_refresh_errors_total")
        if s.value and s.labels["reason"] != reason
    }
    assert not other_reasons, f"errors counted under other reasons: {other_reasons}"
    assert during.value("chargy_stations") == len(first.stations)
    assert during.value("chargy_connectors") == len(first.connectors)
    last_success = during.value("chargy_feed_last_success_timestamp_seconds")

    # Recovery: the feed answers well exactly once, then fails again. The data of that one good answer is served
    # from then on, so the exporter recovered on the first good answer, whatever refresh fetched it.
    watch.expected = None
    serve_good_once(second.kml)
    exporter.refresh_now()
    after = watch.until(lambda e: detailed(e) == expected_detailed(second), 30, "recovery on the first good answer")
    assert after.value("chargy_feed_last_success_timestamp_seconds") > last_success
    assert after.value("chargy_connectors") == len(second.connectors)

    memory = memory_kb(exporter.process.pid)
    assert memory["VmHWM"] < RSS_LIMIT_KB, f"peak RSS {memory['VmHWM']} kB"
    watch.logs = exporter.logs()
    for secret in forbidden:
        assert secret not in watch.logs, "a secret reached the logs"
    assert exporter.stop() == 0
    return watch


def once_then(first: Responder, then: Responder) -> Responder:
    """`first` answers the first request, `then` every later one."""
    answered = threading.Lock()

    def respond(handler: BaseHTTPRequestHandler) -> None:
        (first if answered.acquire(blocking=False) else then)(handler)

    return respond


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault(
    name: str,
    feed_server: FeedServer,
    exporter_process: Callable[..., ExporterProcess],
    feeds: tuple[GeneratedFeed, GeneratedFeed],
    tmp_path: Path,
) -> None:
    fault = FAULTS[name]
    local_file = tmp_path / "local-secret.txt"
    local_file.write_text(f"{LOCAL_FILE_MARKER}\n")
    failing = fault.make(feeds[0], tmp_path)

    feed_server.set_responder(body_responder(feeds[0].kml))
    exporter = exporter_process("--kml-url", feed_server.url, *FAST, *fault.extra_args)
    watch = check_fault(
        exporter,
        lambda: feed_server.set_responder(failing),
        lambda body: feed_server.set_responder(once_then(body_responder(body), failing)),
        fault.reason,
        feeds,
        forbidden=(TEST_API_KEY, LOCAL_FILE_MARKER),
    )
    if name.startswith("http_40"):
        assert "refused the API key" in watch.logs
    if fault.memory_check:
        assert watch.peak_rss_kb < RSS_LIMIT_KB


def test_server_that_never_answers(
    exporter_process: Callable[..., ExporterProcess], feeds: tuple[GeneratedFeed, GeneratedFeed]
) -> None:
    server = RawServer(feeds[0].kml)
    try:

        def serve_good_once(body: bytes) -> None:
            server.body = body
            server.mode = "good once"

        exporter = exporter_process("--kml-url", server.url, *FAST, *SHORT)
        check_fault(exporter, lambda: setattr(server, "mode", "hang"), serve_good_once, "timeout", feeds)
    finally:
        server.close()


def test_malformed_json_in_one_device(
    feed_server: FeedServer,
    exporter_process: Callable[..., ExporterProcess],
    feeds: tuple[GeneratedFeed, GeneratedFeed],
) -> None:
    """Not a failure: the new feed's good devices are served, the bad one is skipped and counted."""
    first, second = feeds
    feed_server.set_body(first.kml)
    exporter = exporter_process("--kml-url", feed_server.url, *FAST)
    exporter.wait_until_up()
    watch = Watch(exporter, (TEST_API_KEY,))

    victim = next(d for s in second.stations for d in s.devices if len(d.connectors) >= 2)
    marker = f'"name":"{victim.name}"'.encode()
    document = second.kml
    start = document.index(marker)
    broken = document[:start] + b'"name":"' + victim.name.encode() + b'",,,{[' + document[start + len(marker) :]
    feed_server.set_body(broken)
    exporter.refresh_now()

    expected = {c.connector: c.state for c in second.connectors if c.device != victim.name}
    after = watch.until(lambda e: detailed(e) == expected, 30, "new feed served without the bad device")
    assert after.value("chargy_feed_up") == 1.0
    assert after.value("chargy_feed_skipped_records_total", reason="malformed_device_json") >= 1
    assert all(errors(after, s.labels["reason"]) == 0 for s in after.samples("chargy_feed_refresh_errors_total"))
    assert TEST_API_KEY not in exporter.logs()


# ---- conditional requests and gzip, end to end ----------------------------------------------------------------------


def test_not_modified_keeps_the_snapshot_and_counts_as_success(
    feed_server: FeedServer,
    exporter_process: Callable[..., ExporterProcess],
    feeds: tuple[GeneratedFeed, GeneratedFeed],
) -> None:
    first = feeds[0]
    seen: list[dict[str, str]] = []

    def respond(handler: BaseHTTPRequestHandler) -> None:
        seen.append(dict(handler.headers))
        if handler.headers.get("If-None-Match") == '"v1"':
            handler.send_response(304)
            handler.send_header("ETag", '"v1"')
            handler.end_headers()
            return
        body = gzip.compress(first.kml) if "gzip" in handler.headers.get("Accept-Encoding", "") else first.kml
        handler.send_response(200)
        handler.send_header("ETag", '"v1"')
        handler.send_header("Last-Modified", "Tue, 24 Nov 2026 00:00:00 GMT")
        if body is not first.kml:
            handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    feed_server.set_responder(respond)
    exporter = exporter_process("--kml-url", feed_server.url, *FAST)
    exporter.wait_until_up()
    watch = Watch(exporter, (TEST_API_KEY,))
    up = watch.until(lambda e: e.value("chargy_feed_up") == 1.0, 30, "exporter up")
    assert "gzip" in seen[0].get("Accept-Encoding", "")
    watch.expected = series(up)  # a 304 keeps every series as it is
    for refreshes in (2, 3):
        last_success = watch.scrape().value("chargy_feed_last_success_timestamp_seconds")
        exporter.refresh_now()
        later = watch.until(
            lambda e, since=last_success: e.value("chargy_feed_last_success_timestamp_seconds") > since,
            30,
            f"refresh {refreshes} answered 304 and counted as a success",
        )
        assert later.value("chargy_feed_up") == 1.0
    assert len(seen) >= 3
    assert all(h.get("If-None-Match") == '"v1"' for h in seen[1:])
    assert all(h.get("If-Modified-Since") == "Tue, 24 Nov 2026 00:00:00 GMT" for h in seen[1:])
    assert all(s.value == 0 for s in later.samples("chargy_feed_refresh_errors_total"))


# ---- shutdown, disk, secrets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown(
    signum: int, feed_server: FeedServer, exporter_process: Callable[..., ExporterProcess], small_feed: GeneratedFeed
) -> None:
    feed_server.set_body(small_feed.kml)
    exporter = exporter_process("--kml-url", feed_server.url, "--refresh-interval", "1")
    exporter.wait_until_up()
    started = time.monotonic()
    exporter.process.send_signal(signum)
    assert exporter.process.wait(5) == 0
    assert time.monotonic() - started < 5


def test_shutdown_while_a_fetch_hangs(
    exporter_process: Callable[..., ExporterProcess], small_feed: GeneratedFeed
) -> None:
    server = RawServer(small_feed.kml)
    try:
        exporter = exporter_process("--kml-url", server.url, "--refresh-interval", "300", "--fetch-timeout", "60")
        exporter.wait_until_up()
        server.mode = "hang"
        exporter.refresh_now()
        wait_until(lambda: server._held, 30, "a fetch waiting for an answer")
        started = time.monotonic()
        exporter.process.send_signal(signal.SIGTERM)
        assert exporter.process.wait(5) == 0
        assert time.monotonic() - started < 5
    finally:
        server.close()


def _open_files_for_writing(pid: int) -> list[str]:
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        if int(fd.name) <= 2:  # stdin, stdout and stderr: what the test handed it
            continue
        try:
            target = os.readlink(fd)
            flags = int(
                next(
                    line
                    for line in (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text().splitlines()
                    if line.startswith("flags:")
                ).split()[1],
                8,
            )
        except (OSError, StopIteration):
            continue
        if target.startswith("/") and not target.startswith("/dev/") and flags & (os.O_WRONLY | os.O_RDWR):
            found.append(target)
    return found


def test_writes_nothing_to_disk(
    feed_server: FeedServer,
    exporter_process: Callable[..., ExporterProcess],
    small_feed: GeneratedFeed,
    tmp_path: Path,
) -> None:
    """Run with cwd, HOME and TMPDIR on an empty read-only directory: nothing appears, nothing fails."""
    feed_server.set_body(small_feed.kml)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(stat.S_IRUSR | stat.S_IXUSR)
    env = {"HOME": str(readonly), "TMPDIR": str(readonly), "PYTHONDONTWRITEBYTECODE": "1"}
    exporter = exporter_process("--kml-url", feed_server.url, "--refresh-interval", "300", env=env, cwd=readonly)
    try:
        exporter.wait_until_up()
        for refreshes in (2, 3):  # refreshes after the first, through the whole path again
            exporter.refresh_now()
            wait_until(lambda n=refreshes: feed_server.requests >= n, 30, f"refresh {refreshes}")
        exporter.wait_for(lambda e: e.value("chargy_feed_up") == 1.0)
        assert _open_files_for_writing(exporter.process.pid) == []
        assert exporter.stop() == 0
    finally:
        readonly.chmod(stat.S_IRWXU)
    assert list(readonly.iterdir()) == []


def test_help_and_errors_never_show_the_key() -> None:
    public_key = "486ac6e4-93b8-4369-9c6a-28f7c4e1a81f"
    shown = subprocess.run([*exporter_command(), "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0
    assert public_key not in shown.stdout + shown.stderr
    assert "REDACTED" in shown.stdout
    bad = subprocess.run(
        [*exporter_command(), "--kml-url", f"ftp://example.org/kml?API-KEY={TEST_API_KEY}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2
    assert TEST_API_KEY not in bad.stdout + bad.stderr


def test_unreachable_feed_logs_no_key_at_debug(exporter_process: Callable[..., ExporterProcess]) -> None:
    """Connection errors carry the URL in their message; urllib3 logs it at debug: all redacted."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    # A key that needs percent-encoding: the encoded form must be redacted too.
    url = f"http://127.0.0.1:{port}/kml?API-KEY=k%2Fey+{TEST_API_KEY}"
    exporter = exporter_process("--kml-url", url, *FAST)
    exporter.wait_for(lambda e: errors(e, "connection") >= 1)
    watch = Watch(exporter, (TEST_API_KEY, "k%2Fey", "k/ey"))
    watch.until(lambda e: errors(e, "connection") >= 1, 30, "a connection error counted")
    exporter.refresh_now()
    watch.until(lambda e: errors(e, "connection") >= 2, 30, "a second connection error counted")
    logs = exporter.logs()
    assert "cannot connect to the feed" in logs
    for secret in (TEST_API_KEY, "k%2Fey", "k/ey"):
        assert secret not in logs
    assert "REDACTED" in logs


def test_fault_list_is_complete() -> None:
    """Every reason the exporter can count under (but internal/file) has a fault test here."""
    from chargy_exporter.model import REFRESH_ERROR_REASONS

    tested = {fault.reason for fault in FAULTS.values()} | {"timeout", "connection"}
    assert set(REFRESH_ERROR_REASONS) - tested == {"http_status", "http_redirect", "file", "internal"}
