"""prometheus.py: the HTTP endpoint — paths, content negotiation, gzip, and the cached rendering."""

from __future__ import annotations

import gzip
from collections.abc import Iterator

import pytest
from conftest import http_get, parse_exposition
from feedgen import evolve, generate_feed
from opentelemetry.sdk.resources import Resource

from chargy_exporter.kml import parse_kml
from chargy_exporter.metrics import MetricsPipeline
from chargy_exporter.prometheus import PrometheusEndpoint
from chargy_exporter.status import FeedStatus, State

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.fixture
def served() -> Iterator[tuple[MetricsPipeline, str]]:
    endpoint = PrometheusEndpoint()
    pipeline = MetricsPipeline([endpoint.make_reader], Resource.create({}), on_published=[endpoint.render])
    pipeline.publish(State(parse_kml(generate_feed(stations=20, seed=1).kml), FeedStatus(up=True)))
    server = endpoint.serve("127.0.0.1", 0)
    yield pipeline, f"http://127.0.0.1:{server.port}"
    server.shutdown()
    pipeline.shutdown()


def test_metrics_and_root_serve_the_same_exposition(served):
    _, base = served
    status, headers, body = http_get(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert http_get(base + "/")[2] == body
    assert len(parse_exposition(body.decode()).samples("chargy_connector_state")) > 0


def test_a_browser_on_root_gets_a_page_linking_to_metrics(served):
    _, base = served
    status, headers, body = http_get(base + "/", {"Accept": "text/html,application/xhtml+xml"})
    assert status == 200 and headers["Content-Type"] == "text/html" and b'href="/metrics"' in body


def test_gzip_when_asked(served):
    _, base = served
    plain = http_get(base + "/metrics")[2]
    _, headers, body = http_get(base + "/metrics", {"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip"
    assert gzip.decompress(body) == plain and len(body) < len(plain) / 4


def test_openmetrics_when_asked(served):
    _, base = served
    _, headers, body = http_get(base + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert b"chargy_connector_state{" in body


def test_the_name_filter_selects_families(served):
    _, base = served
    body = http_get(base + "/metrics?name[]=chargy_feed_up")[2].decode()
    assert parse_exposition(body).families.keys() == {"chargy_feed_up"}


def test_health_not_found_and_methods(served):
    _, base = served
    assert http_get(base + "/healthz")[:1] == (200,)
    assert http_get(base + "/nothing-here")[0] == 404


def test_scrapes_reuse_the_rendering_until_the_next_publish(served):
    pipeline, base = served
    first = http_get(base + "/metrics")[2]
    assert http_get(base + "/metrics")[2] == first
    feed = evolve(generate_feed(stations=20, seed=1), seed=2, state_changes=1.0)
    pipeline.publish(State(parse_kml(feed.kml), FeedStatus(up=True)))
    changed = http_get(base + "/metrics")[2]
    assert changed != first
    states = {(s.labels["connector"], s.labels["state"])
              for s in parse_exposition(changed.decode()).samples("chargy_connector_detailed_state_info")}  # fmt: skip
    assert states == {(c.connector, c.state) for c in feed.connectors}
