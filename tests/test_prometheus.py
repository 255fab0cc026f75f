"""prometheus.py: the HTTP endpoint — paths, content negotiation, gzip, and the cached rendering."""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import socket
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from conftest import http_get, parse_exposition
from feedgen import evolve, generate_feed
from opentelemetry.sdk.resources import Resource

from chargy_exporter import prometheus
from chargy_exporter.kml import parse_kml
from chargy_exporter.metrics import MetricsPipeline
from chargy_exporter.model import FeedStatus, State
from chargy_exporter.page import render_status_page
from chargy_exporter.prometheus import (
    MAX_NAME_CHARS,
    MAX_NAMES,
    MAX_QUERY_CHARS,
    PrometheusEndpoint,
    gzip_wanted,
    negotiate,
)

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def without_process(body: bytes) -> bytes:
    """The body without the process families, which are read afresh for every scrape (tests/test_process.py)."""
    return b"".join(line for line in body.splitlines(keepends=True) if b"process_" not in line.split(b"{")[0])


@pytest.fixture
def served() -> Iterator[tuple[MetricsPipeline, str]]:
    endpoint = PrometheusEndpoint()
    pipeline = MetricsPipeline(Resource.create({}), on_published=[endpoint.render])
    pipeline.publish(State(parse_kml(generate_feed(stations=20, seed=1).kml), FeedStatus(up=True)))
    server = endpoint.serve("127.0.0.1", 0)
    yield pipeline, f"http://127.0.0.1:{server.port}"
    server.shutdown()
    pipeline.shutdown()


def test_metrics_and_root_serve_the_same_exposition(served):
    _, base = served
    status, headers, body = http_get(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert without_process(http_get(base + "/")[2]) == without_process(body)
    assert len(parse_exposition(body.decode()).samples("chargy_connector_state")) > 0


# What Prometheus itself sends (scrape_protocols' default), and what curl sends.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)


def test_a_browser_on_root_gets_the_status_page_and_scrapers_keep_getting_metrics():
    feed = generate_feed(stations=20, seed=1)
    state = State(parse_kml(feed.kml), FeedStatus(up=True, last_success_time=time.time()))
    endpoint = PrometheusEndpoint(lambda: render_status_page(state, time.time()))
    pipeline = MetricsPipeline(Resource.create({}), on_published=[endpoint.render])
    pipeline.publish(state)
    server = endpoint.serve("127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, headers, body = http_get(base + "/", {"Accept": "text/html,application/xhtml+xml"})
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b'href="/metrics"' in body and b'href="/healthz"' in body
        available = feed.counts_by_state()["available"]
        assert f'id="available">{available:,}<'.encode() in body
        for accept in (PROMETHEUS_ACCEPT, "*/*"):
            status, headers, body = http_get(base + "/", {"Accept": accept})
            assert status == 200 and not headers["Content-Type"].startswith("text/html")
            assert parse_exposition(body.decode()).value("chargy_feed_up") == 1
    finally:
        server.shutdown()
        pipeline.shutdown()


def test_gzip_when_asked(served):
    _, base = served
    plain = http_get(base + "/metrics")[2]
    _, headers, body = http_get(base + "/metrics", {"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip"
    assert without_process(gzip.decompress(body)) == without_process(plain) and len(body) < len(plain) / 4


def test_openmetrics_when_asked(served):
    _, base = served
    _, headers, body = http_get(base + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert b"chargy_connector_state{" in body


def test_the_name_filter_selects_series(served):
    _, base = served
    body = http_get(base + "/metrics?name[]=chargy_feed_up")[2].decode()
    assert parse_exposition(body).families.keys() == {"chargy_feed_up"}
    # Prometheus' name[] is the series (sample) name: a counter's samples end in _total, an info family's in _info.
    status, _, body = http_get(base + "/metrics?name[]=chargy_feed_refresh_errors_total&name[]=target_info")
    exposition = parse_exposition(body.decode())
    assert status == 200 and exposition.families.keys() == {"chargy_feed_refresh_errors_total", "target_info"}
    assert exposition.value("chargy_feed_refresh_errors_total", reason="http_5xx") == 0
    assert "# TYPE chargy_feed_refresh_errors_total counter" in exposition.text


def test_the_name_filter_in_openmetrics_and_gzip(served):
    _, base = served
    url = base + "/metrics?name[]=chargy_feed_refresh_errors_total&name[]=chargy_feed_up"
    status, headers, body = http_get(url, {"Accept": OPENMETRICS, "Accept-Encoding": "gzip"})
    text = gzip.decompress(body).decode()
    assert status == 200 and headers["Content-Type"] == OPENMETRICS and headers["Content-Encoding"] == "gzip"
    assert text.endswith("# EOF\n") and 'chargy_feed_refresh_errors_total{reason="http_5xx"} 0' in text
    assert {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")} == {
        "chargy_feed_refresh_errors_total", "chargy_feed_up"}  # fmt: skip


@pytest.mark.parametrize("name", ["chargy_feed_refresh_errors", "target", "nothing_like_this", "%00%ff"])
def test_a_name_matching_no_series_gets_an_empty_answer(served, name):
    _, base = served
    status, headers, body = http_get(base + f"/metrics?name[]={name}")
    assert (status, body) == (200, b"") and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    status, _, body = http_get(base + f"/metrics?name[]={name}", {"Accept": OPENMETRICS})
    assert (status, body) == (200, b"# EOF\n")


@pytest.mark.parametrize(
    "query",
    [
        "&".join(f"name[]=n{i}" for i in range(MAX_NAMES + 1)),
        "name[]=" + "n" * (MAX_NAME_CHARS + 1),
        "x=" + "y" * MAX_QUERY_CHARS,
        "&" * (MAX_QUERY_CHARS - 1),
    ],
    ids=["too-many-names", "too-long-name", "too-long-query", "too-many-fields"],
)
def test_name_filters_are_bounded(served, query):
    _, base = served
    status, headers, body = http_get(base + "/metrics?" + query)
    assert status == 400 and headers["Content-Type"] == "text/plain; charset=utf-8"
    assert b"name[]" in body or b"query string" in body
    assert query[:20].encode() not in body
    # At the limits, still answered.
    names = "&".join(f"name[]={i:02}{'n' * (MAX_NAME_CHARS - 2)}" for i in range(MAX_NAMES))
    assert http_get(base + "/metrics?" + names)[0] == 200


def test_health_not_found_and_methods(served):
    _, base = served
    assert http_get(base + "/healthz")[:1] == (200,)
    assert http_get(base + "/nothing-here")[0] == 404
    host, port = base.removeprefix("http://").split(":")
    for method, path, status in [("HEAD", "/metrics", 200), ("HEAD", "/healthz", 200), ("POST", "/metrics", 405),
                                 ("DELETE", "/", 405), ("HEAD", "/nothing-here", 404)]:  # fmt: skip
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        assert response.status == status, (method, path)
        if method == "HEAD":
            assert body == b"" and int(response.headers["Content-Length"]) > 0
        if status == 405:
            assert response.headers["Allow"] == "GET, HEAD"
    _, headers, _ = http_get(base + "/metrics")
    assert headers["Vary"] == "Accept, Accept-Encoding"
    head = urllib.request.Request(base + "/metrics", method="HEAD", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(head, timeout=10) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        # The same body but for the process values of the moment: a few bytes more or less.
        assert (
            abs(
                int(response.headers["Content-Length"])
                - len(http_get(base + "/metrics", {"Accept-Encoding": "gzip"})[2])
            )
            < 32
        )


def test_scrapes_reuse_the_rendering_until_the_next_publish(served):
    pipeline, base = served
    first = without_process(http_get(base + "/metrics")[2])
    assert without_process(http_get(base + "/metrics")[2]) == first
    feed = evolve(generate_feed(stations=20, seed=1), seed=2, state_changes=1.0)
    pipeline.publish(State(parse_kml(feed.kml), FeedStatus(up=True)))
    changed = without_process(http_get(base + "/metrics")[2])
    assert changed != first
    states = {(s.labels["connector"], s.labels["state"])
              for s in parse_exposition(changed.decode()).samples("chargy_connector_detailed_state_info")}  # fmt: skip
    assert states == {(c.connector, c.state) for c in feed.connectors}


# ---- negotiation: any Accept value maps onto the closed set of formats ----------------------------------------------

TEXT = "text/plain; version=0.0.4; charset=utf-8"
# What Prometheus 2.x and 3.x send by default.
PROMETHEUS_2 = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")  # fmt: skip
PROMETHEUS_3 = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
                "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
                "text/plain;version=0.0.4;q=0.2,*/*;q=0.1")  # fmt: skip
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", TEXT),
        ("*/*", TEXT),
        ("text/plain", TEXT),
        ("text/plain; version=1.0.0; escaping=allow-utf-8", TEXT),
        (BROWSER, TEXT),
        ("application/openmetrics-text", OPENMETRICS),
        ("application/openmetrics-text; version=1.0.0", OPENMETRICS),
        ('APPLICATION/OpenMetrics-Text ; Version="1.0.0"', OPENMETRICS),
        ("application/openmetrics-text; version=1.0.300", OPENMETRICS),
        ("application/*", OPENMETRICS),
        (PROMETHEUS_2, OPENMETRICS),
        (PROMETHEUS_3, OPENMETRICS),
        ("text/plain;q=0.2, application/openmetrics-text;q=0.9", OPENMETRICS),
        ("text/plain, application/openmetrics-text", TEXT),  # equal q: the one listed first
        ("application/openmetrics-text, text/plain", OPENMETRICS),
        ("application/openmetrics-text;q=0, */*", TEXT),
        ("application/openmetrics-text;q=0, text/plain;q=0", TEXT),  # nothing acceptable: still an answer
        ("application/openmetrics-text; version=abc", TEXT),
        ("application/openmetrics-text; version=1.x", TEXT),
        ("application/openmetrics-text; version=2.0.0", TEXT),
        ("application/openmetrics-text; version=0.0.1", TEXT),
        ("application/openmetrics-text; version=1.0.0; q=abc", TEXT),
        ("application/openmetrics-text; version=1.0.0\r\n X-Injected: 1", TEXT),
        (";;;,,,==;q=;version", TEXT),
        ("text/plain;q=0.1," * 100 + "application/openmetrics-text", TEXT),  # past the ranges read
    ],
)
def test_negotiation_maps_any_accept_onto_a_canonical_format(accept, expected):
    assert negotiate(accept).content_type == expected


@pytest.mark.parametrize(
    ("accept_encoding", "expected"),
    [("gzip", True), ("GZIP", True), ("deflate, gzip;q=0.5", True), ("x-gzip", True), ("", False),
     ("identity", False), ("gzip;q=0", False), ("br, *", False), ("gzip;q=2", False)],
)  # fmt: skip
def test_gzip_only_when_accepted(accept_encoding, expected):
    assert gzip_wanted(accept_encoding) is expected


# ---- hostile clients keep nothing -----------------------------------------------------------------------------------


@pytest.fixture
def endpoint_served() -> Iterator[tuple[PrometheusEndpoint, MetricsPipeline, str]]:
    endpoint = PrometheusEndpoint()
    pipeline = MetricsPipeline(Resource.create({}), on_published=[endpoint.render])
    pipeline.publish(State(parse_kml(generate_feed(stations=20, seed=1).kml), FeedStatus(up=True)))
    server = endpoint.serve("127.0.0.1", 0)
    yield endpoint, pipeline, f"http://127.0.0.1:{server.port}"
    server.shutdown()
    pipeline.shutdown()


CLOSED_SET = {(TEXT, False), (TEXT, True), (OPENMETRICS, False), (OPENMETRICS, True)}


def hostile_requests(count: int) -> Iterator[tuple[str, dict[str, str]]]:
    """`count` scrapes with distinct Accept values and `count` with distinct name[] values, each carrying a token."""
    for i in range(count):
        token = f"tok{i}x"
        accept = [
            f"application/openmetrics-text; version=1.0.{i}; {token}=1",
            f"application/openmetrics-text; version={token}",
            f"text/plain; version={i}.x; charset={token}",
            f"application/openmetrics-text; version=1.0.0; escaping={token}",
        ][i % 4]
        yield "/metrics", {"Accept": accept, "Accept-Encoding": "gzip" if i % 3 else f"{token}, identity"}
    for i in range(count):
        token = f"tok{i}y"
        name = ["chargy_feed_up", "target_info", "chargy_feed_refresh_errors_total"][i % 3]
        yield f"/metrics?name[]={name}&name[]={token}", {"Accept": [OPENMETRICS, TEXT][i % 2]}


def scrape_all(base: str, requests: Iterable[tuple[str, dict[str, str]]]) -> int:
    """Sends every request on one keep-alive connection; checks each answer; returns how many were sent."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    sent = 0
    try:
        for path, headers in requests:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status == 200, (path, headers, response.status)
            assert not any("tok" in value for value in response.headers.values()), response.headers.items()
            assert (response.headers["Content-Type"], response.headers["Content-Encoding"] == "gzip") in CLOSED_SET
            sent += 1
    finally:
        connection.close()
    return sent


def count_encodings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, every full or filtered encoding and every compression the endpoint does, as it happens."""
    done: list[str] = []

    def counting(kind: str, work: Callable[..., bytes]) -> Callable[..., bytes]:
        def counted(*args: Any, **kwargs: Any) -> bytes:
            done.append(kind)
            return work(*args, **kwargs)

        return counted

    counted = tuple(dataclasses.replace(fmt, encode=counting("encode", fmt.encode)) for fmt in prometheus.FORMATS)
    monkeypatch.setattr(prometheus, "FORMATS", counted)
    monkeypatch.setattr(prometheus.gzip, "compress", counting("gzip", gzip.compress))  # filtered bodies
    monkeypatch.setattr(prometheus._OpenGzip, "of", counting("gzip", prometheus._OpenGzip.of))  # whole ones
    return done


def test_distinct_accept_and_name_values_keep_nothing_and_cost_the_next_publish_nothing(endpoint_served, monkeypatch):
    _, pipeline, base = endpoint_served
    encodings = count_encodings(monkeypatch)
    state = State(parse_kml(generate_feed(stations=20, seed=1).kml), FeedStatus(up=True))
    every_body = [("/metrics", {"Accept": accept, "Accept-Encoding": encoding})
                  for accept in (TEXT, OPENMETRICS) for encoding in ("gzip", "identity")]  # fmt: skip
    scrape_all(base, every_body)
    encodings.clear()
    pipeline.publish(state)
    # The four bodies scraped since the last render, each encoded (or compressed) once, ahead of the scrapes.
    assert sorted(encodings) == ["encode", "encode", "gzip", "gzip"]

    encodings.clear()
    requests = list(hostile_requests(1000))
    assert scrape_all(base, every_body + requests[:1000]) == 1004
    assert encodings == []  # a thousand distinct Accept values: all answered from the four kept bodies
    assert scrape_all(base, requests[1000:]) == 1000
    assert encodings == []  # a thousand filters: cut from the kept bodies, nothing encoded or kept

    encodings.clear()
    pipeline.publish(state)
    assert sorted(encodings) == ["encode", "encode", "gzip", "gzip"]  # the next publish costs what it did


def test_a_folded_header_is_not_reflected(endpoint_served):
    _, _, base = endpoint_served
    host, port = base.removeprefix("http://").split(":")
    request = (b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\n"
               b" X-Injected: yes\r\nConnection: close\r\n\r\n")  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    head = rest.partition(b"\r\n\r\n")[0]
    assert int(status_line.split()[1]) < 500 and b"Injected" not in head


def test_a_render_encodes_what_scrapers_asked_lately_and_nothing_when_nobody_scrapes(endpoint_served, monkeypatch):
    _, pipeline, base = endpoint_served
    encodings = count_encodings(monkeypatch)
    feeds = [generate_feed(stations=20, seed=1)]
    for seed in range(2, 7):
        feeds.append(evolve(feeds[-1], seed=seed, state_changes=0.5))

    def publish(index: int) -> list[str]:
        encodings.clear()
        pipeline.publish(State(parse_kml(feeds[index].kml), FeedStatus(up=True)))
        return sorted(encodings)

    def scrape() -> tuple[list[str], dict[tuple[str, str], float]]:
        encodings.clear()
        status, headers, body = http_get(base + "/metrics", {"Accept": OPENMETRICS, "Accept-Encoding": "gzip"})
        assert status == 200 and headers["Content-Type"] == OPENMETRICS
        samples = parse_exposition(gzip.decompress(body).decode()).samples("chargy_connector_detailed_state_info")
        return sorted(encodings), {(s.labels["connector"], s.labels["state"]): s.value for s in samples}

    def expected(index: int) -> dict[tuple[str, str], float]:
        return {(c.connector, c.state): 1.0 for c in feeds[index].connectors}

    assert publish(1) == []  # nobody has scraped: nothing is collected or encoded
    assert scrape() == (["encode", "gzip"], expected(1))  # the first ask collects, from the published state
    assert scrape() == ([], expected(1))  # then it is kept
    assert publish(2) == ["encode", "gzip"]  # asked since the last render
    assert publish(3) == ["encode", "gzip"]  # asked in the period before: a scrape just after a render still counts
    assert publish(4) == []  # two periods without a scrape
    assert scrape() == (["encode", "gzip"], expected(4))
