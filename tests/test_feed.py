"""feed.py against a local HTTP server: retries, conditional requests, size cap, gzip, deadline, redaction."""

from __future__ import annotations

import gzip
import io
import logging
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import TEST_API_KEY, FeedServer

from chargy_exporter.config import Config, RedactingFilter, url_secrets
from chargy_exporter.feed import FeedClient, FeedError, Validators

BODY = b'<kml xmlns="http://www.opengis.net/kml/2.2"><Document><Placemark><name>x</name></Placemark></Document></kml>'


def client_for(url: str, **overrides: object) -> FeedClient:
    settings: dict[str, object] = {"kml_url": url, "fetch_timeout": 2.0, **overrides}
    return FeedClient(Config(**settings, secrets=url_secrets(url)))  # type: ignore[arg-type]


def answer(
    handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if status != 304:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if status != 304:
        handler.wfile.write(body)


def fetch_error(client: FeedClient, validators: Validators | None = None) -> FeedError:
    with pytest.raises(FeedError) as caught:
        client.fetch(validators)
    return caught.value


# ---- retries --------------------------------------------------------------------------------------------------------


def test_retries_inside_a_fetch_then_succeeds(feed_server: FeedServer) -> None:
    statuses = iter([503, 500])

    def respond(handler: BaseHTTPRequestHandler) -> None:
        status = next(statuses, 200)
        answer(handler, status, BODY if status == 200 else b"busy")

    feed_server.set_responder(respond)
    started = time.monotonic()
    result = client_for(feed_server.url).fetch()
    assert result.body == BODY
    assert feed_server.requests == 3
    # urllib3 backs off between retries (0 s, then 1 s with backoff_factor 0.5).
    assert time.monotonic() - started >= 0.9


def test_gives_up_after_the_retries(feed_server: FeedServer) -> None:
    feed_server.set_responder(lambda handler: answer(handler, 500, b"oops"))
    error = fetch_error(client_for(feed_server.url))
    assert error.reason == "http_5xx"
    assert feed_server.requests == 3


def test_a_long_retry_after_does_not_hold_the_refresh(feed_server: FeedServer) -> None:
    feed_server.set_responder(lambda handler: answer(handler, 503, b"later", {"Retry-After": "3600"}))
    started = time.monotonic()
    error = fetch_error(client_for(feed_server.url, fetch_timeout=0.5))
    assert error.reason == "http_5xx"
    assert time.monotonic() - started < 2  # no retry waits past --fetch-timeout


@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_key_is_named_but_not_shown(feed_server: FeedServer, status: int) -> None:
    feed_server.set_responder(lambda handler: answer(handler, status, b"bad key"))
    error = fetch_error(client_for(feed_server.url))
    assert error.reason == "unauthorized"
    assert "API key" in str(error)
    assert TEST_API_KEY not in str(error)
    assert feed_server.requests == 1  # not retried


def test_other_statuses(feed_server: FeedServer) -> None:
    feed_server.set_responder(lambda handler: answer(handler, 404, b"gone"))
    assert fetch_error(client_for(feed_server.url)).reason == "http_status"


# ---- conditional requests -------------------------------------------------------------------------------------------


def test_validators_are_sent_and_304_means_not_modified(feed_server: FeedServer) -> None:
    seen: list[dict[str, str]] = []

    def respond(handler: BaseHTTPRequestHandler) -> None:
        seen.append(dict(handler.headers))
        if handler.headers.get("If-None-Match") == '"abc"':
            answer(handler, 304, headers={"ETag": '"abc"'})
        else:
            answer(handler, 200, BODY, {"ETag": '"abc"', "Last-Modified": "Mon, 23 Nov 2026 10:00:00 GMT"})

    feed_server.set_responder(respond)
    client = client_for(feed_server.url)
    first = client.fetch()
    assert first.body == BODY
    assert first.validators == Validators('"abc"', "Mon, 23 Nov 2026 10:00:00 GMT")
    assert "If-None-Match" not in seen[0]

    second = client.fetch(first.validators)
    assert second.body is None  # 304 Not Modified
    assert second.validators == first.validators
    assert seen[1]["If-None-Match"] == '"abc"'
    assert seen[1]["If-Modified-Since"] == "Mon, 23 Nov 2026 10:00:00 GMT"


def test_no_validators_no_conditional_headers(feed_server: FeedServer) -> None:
    feed_server.set_body(BODY)
    client = client_for(feed_server.url)
    assert client.fetch(Validators()).validators == Validators()
    assert not any(k in feed_server.request_headers[0] for k in ("If-None-Match", "If-Modified-Since"))


# ---- size cap, gzip, deadline ---------------------------------------------------------------------------------------


def test_gzip_is_accepted_and_decoded(feed_server: FeedServer) -> None:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        assert "gzip" in handler.headers.get("Accept-Encoding", "")
        answer(handler, 200, gzip.compress(BODY), {"Content-Encoding": "gzip"})

    feed_server.set_responder(respond)
    assert client_for(feed_server.url).fetch().body == BODY


def test_size_cap_on_declared_length(feed_server: FeedServer) -> None:
    feed_server.set_body(b"x" * 5000)
    error = fetch_error(client_for(feed_server.url, max_feed_bytes=4096))
    assert error.reason == "too_large"
    assert "4096" in str(error)


def test_size_cap_while_streaming_without_length(feed_server: FeedServer) -> None:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        try:
            for _ in range(1000):
                handler.wfile.write(b"y" * 65536)
        except OSError:
            pass

    feed_server.set_responder(respond)
    assert fetch_error(client_for(feed_server.url, max_feed_bytes=1024 * 1024)).reason == "too_large"


def test_size_cap_applies_to_the_decompressed_size(feed_server: FeedServer) -> None:
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = b"".join([*(bomb.compress(b"\0" * 1024 * 1024) for _ in range(64)), bomb.flush()])
    assert len(body) < 1024 * 1024
    feed_server.set_responder(lambda handler: answer(handler, 200, body, {"Content-Encoding": "gzip"}))
    assert fetch_error(client_for(feed_server.url, max_feed_bytes=1024 * 1024)).reason == "too_large"


def test_a_body_under_the_cap_passes(feed_server: FeedServer) -> None:
    feed_server.set_body(b"z" * 4096)
    assert client_for(feed_server.url, max_feed_bytes=4096).fetch().body == b"z" * 4096


def test_a_body_announced_over_the_cap_is_refused_before_it_is_read(feed_server: FeedServer) -> None:
    release = threading.Event()

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(200 * 1024 * 1024))
        handler.end_headers()
        handler.wfile.write(b"<kml>")
        handler.wfile.flush()
        release.wait(10)  # the stimulus: the rest of the announced body never comes

    feed_server.set_responder(respond)
    try:
        # Refused on the header: waiting for the body would end as a timeout instead.
        assert fetch_error(client_for(feed_server.url, fetch_timeout=30)).reason == "too_large"
    finally:
        release.set()


def test_a_trickling_body_is_cut_at_the_deadline(feed_server: FeedServer) -> None:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        try:
            for _ in range(100000):
                handler.wfile.write(b"a")
                handler.wfile.flush()
                time.sleep(0.05)  # the stimulus: a byte every 50 ms, each read within the socket timeout
        except OSError:
            pass

    feed_server.set_responder(respond)
    started = time.monotonic()
    error = fetch_error(client_for(feed_server.url, fetch_timeout=0.5))
    assert error.reason == "timeout"
    assert time.monotonic() - started < 2


def test_a_trickling_header_is_cut_at_the_deadline(feed_server: FeedServer) -> None:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        try:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(100):  # http.client gives up after 100 headers: 5 s of them without the deadline
                handler.wfile.write(b"X-Slow: a\r\n")
                handler.wfile.flush()
                time.sleep(0.05)  # the stimulus: a header line every 50 ms, each read within the socket timeout
        except OSError:
            pass

    feed_server.set_responder(respond)
    started = time.monotonic()
    error = fetch_error(client_for(feed_server.url, fetch_timeout=0.5))
    assert error.reason == "timeout" and "within 0.5 s" in str(error)
    assert time.monotonic() - started < 2


def test_one_deadline_bounds_the_fetch_with_its_retries(feed_server: FeedServer) -> None:
    feed_server.set_responder(lambda handler: time.sleep(3))  # the stimulus: a server that does not answer
    started = time.monotonic()
    error = fetch_error(client_for(feed_server.url, fetch_timeout=0.5))
    assert error.reason == "timeout"
    # Not 3 attempts of 0.5 s each plus backoff: the retries get what remains of the one deadline.
    assert time.monotonic() - started < 1.4


def test_refused_connection(unused_port_url: str) -> None:
    error = fetch_error(client_for(unused_port_url, fetch_timeout=0.5))
    assert error.reason == "connection"


# ---- redaction ------------------------------------------------------------------------------------------------------


@pytest.fixture
def unused_port_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/kml?API-KEY={TEST_API_KEY}"


@pytest.mark.parametrize("key", [TEST_API_KEY, "a%2Fb%3Dc-" + TEST_API_KEY, "with+plus " + TEST_API_KEY])
def test_error_messages_and_debug_logs_never_carry_the_key(key: str) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/kml?API-KEY={key}"
    config = Config(kml_url=url, fetch_timeout=0.5, secrets=url_secrets(url))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(config.secrets))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        error = fetch_error(FeedClient(config))
        logging.getLogger("test").exception("wrapped", exc_info=RuntimeError(url))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    output = stream.getvalue() + str(error)
    assert "urllib3" in stream.getvalue() or "Retrying" in stream.getvalue()
    for fragment in (TEST_API_KEY, "a%2Fb", "a/b", "with+plus", "with plus", "with%20plus"):
        assert fragment not in output
    assert "REDACTED" in output


def test_password_in_url_is_a_secret() -> None:
    secrets = url_secrets("https://user:p%40ss@example.org/kml?token=t0k&x=1")
    assert "p%40ss" in secrets and "p@ss" in secrets and "t0k" in secrets
    assert "1" not in secrets


# ---- files ----------------------------------------------------------------------------------------------------------


def test_file_feed(tmp_path: Path) -> None:
    path = tmp_path / "feed.kml"
    path.write_bytes(BODY)
    assert client_for(path.as_uri()).fetch().body == BODY
    assert client_for(str(path)).fetch().body == BODY


def test_file_errors(tmp_path: Path) -> None:
    assert fetch_error(client_for(str(tmp_path / "missing.kml"))).reason == "file"
    big = tmp_path / "big.kml"
    big.write_bytes(b"x" * 5000)
    assert fetch_error(client_for(str(big), max_feed_bytes=4096)).reason == "too_large"
