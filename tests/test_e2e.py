"""End to end: the real `chargy-exporter` process, a generated feed on 127.0.0.1, scraped over HTTP."""

from __future__ import annotations

import gzip
import time

import pytest
from conftest import TEST_API_KEY, assert_matches_feed, http_get, memory_kb, parse_exposition, wait_until
from feedgen import evolve, generate_feed

from chargy_exporter.demo import DemoNetwork
from chargy_exporter.kml import parse_kml

pytestmark = pytest.mark.e2e


def test_production_size_feed_is_exported_connector_by_connector(feed_server, exporter_process):
    feed = generate_feed(connectors=1700, seed=21, odd_shapes=True)
    feed_server.set_body(feed.kml)
    exporter = exporter_process("--kml-url", feed_server.url)
    exposition = exporter.wait_until_up()
    assert len(feed.connectors) >= 1700
    assert_matches_feed(exposition, feed)
    assert exposition.value("chargy_connectors") == len(feed.connectors)
    assert exposition.value("chargy_stations") == len(feed.stations)
    assert abs(exposition.value("chargy_feed_last_success_timestamp_seconds") - time.time()) < 60
    # The seed's dashboards: counts by state add up to the feed's.
    for state, count in feed.counts_by_state().items():
        assert sum(s.value for s in exposition.samples("chargy_connector_state")
                   if s.labels["chargy_connector_state"] == state) == count  # fmt: skip


def test_thirty_scrapes_make_one_upstream_request(feed_server, exporter_process):
    feed_server.set_body(generate_feed(stations=50, seed=22).kml)
    exporter = exporter_process("--kml-url", feed_server.url, "--refresh-interval", "300")
    exporter.wait_until_up()
    for _ in range(30):
        exporter.scrape()
    assert feed_server.requests == 1
    headers = feed_server.request_headers[0]
    assert headers["User-Agent"].startswith("chargy-exporter/")
    assert not headers["Accept"].startswith("application/json") and "xml" in headers["Accept"]


def test_refreshes_follow_the_feed_and_keep_the_last_good_data_on_failure(feed_server, exporter_process):
    feed = generate_feed(stations=60, seed=23)
    feed_server.set_body(feed.kml)
    exporter = exporter_process("--kml-url", feed_server.url, "--refresh-interval", "300")
    exporter.wait_until_up()
    for step in range(3):  # connectors change state, appear and disappear: no leftover, no missing series
        feed = evolve(feed, seed=step, state_changes=0.5, removed=0.1, added_stations=5)
        feed_server.set_body(feed.kml)
        exporter.refresh_now()  # SIGHUP, rather than waiting for the interval
        exposition = exporter.wait_for(
            lambda e, f=feed: (
                {s.labels["connector"] for s in e.samples("chargy_connector_detailed_state_info")}
                == {c.connector for c in f.connectors}
                and e.value("chargy_connectors") == len(f.connectors)
            )
        )
        assert_matches_feed(exposition, feed)

    def broken(handler) -> None:
        handler.send_response(503)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    feed_server.set_responder(broken)
    exporter.refresh_now()
    exposition = exporter.wait_for(lambda e: e.value("chargy_feed_up") == 0)
    assert_matches_feed(exposition, feed)
    assert exposition.value("chargy_feed_refresh_errors_total", reason="http_5xx") >= 1
    logs = exporter.logs()
    assert "http_5xx" in logs and TEST_API_KEY not in logs and TEST_API_KEY not in exposition.text


def test_gzip_and_root_path(feed_server, exporter_process):
    feed_server.set_body(generate_feed(stations=30, seed=24).kml)
    exporter = exporter_process("--kml-url", feed_server.url)
    exporter.wait_until_up()
    status, headers, body = http_get(exporter.base_url + "/", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert parse_exposition(gzip.decompress(body).decode()).value("chargy_feed_up") == 1


def test_demo_mode_serves_the_living_demo_network_refresh_by_refresh(exporter_process):
    demo = DemoNetwork()  # the exporter's own, from the same seed: the same states at the same refresh
    expected = [parse_kml(demo.document()) for _ in range(2)]

    def detailed(exposition):
        return {
            s.labels["connector"]: s.labels["state"] for s in exposition.samples("chargy_connector_detailed_state_info")
        }

    def states(snapshot):
        return {row.connector.name: row.connector.raw_state for row in snapshot.rows()}

    exporter = exporter_process("--demo")
    exposition = exporter.wait_until_up(timeout=15)
    assert exposition.value("chargy_connectors") == expected[0].connector_count > 1_750
    assert exposition.value("chargy_stations") == 523
    assert detailed(exposition) == states(expected[0])
    assert "serving the built-in demo network: 523 stations, 934 devices" in exporter.logs()
    assert "(not real data)" in exporter.logs()
    _, _, page = http_get(exporter.base_url + "/", {"Accept": "text/html"})
    assert b"Not real data" in page

    exporter.refresh_now()  # the next refresh: sessions started and ended
    exporter.wait_for(lambda e: detailed(e) == states(expected[1]))
    assert states(expected[1]) != states(expected[0])


def test_environment_configuration_and_sigterm(feed_server, exporter_process):
    feed_server.set_body(generate_feed(stations=10, seed=25).kml)
    exporter = exporter_process(env={"KML_URL": feed_server.url, "CHARGY_LOG_LEVEL": "debug"})
    exporter.wait_until_up()
    started = time.monotonic()
    assert exporter.stop() == 0
    assert time.monotonic() - started < 5
    assert TEST_API_KEY not in exporter.logs()


def test_a_port_in_use_fails_clearly(exporter_process):
    first = exporter_process("--demo")
    first.wait_until_up()
    second = exporter_process("--demo", port=first.port)
    assert second.process.wait(timeout=10) == 1
    assert f"cannot listen on 127.0.0.1:{first.port}" in second.logs()
    assert first.scrape().value("chargy_feed_up") == 1


@pytest.mark.slow
def test_ten_times_the_real_feed_through_the_process(feed_server, exporter_process):
    feed = generate_feed(connectors=17_000, seed=26)
    feed_server.set_body(feed.kml)
    exporter = exporter_process("--kml-url", feed_server.url)
    assert_matches_feed(exporter.wait_until_up(timeout=120), feed)


# What Prometheus 3 sends by default, with gzip: the one scrape a refresh sees in production.
PROMETHEUS_SCRAPE = {
    "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}
RSS_BOUND_KIB = 60 * 1024


@pytest.mark.slow
def test_memory_at_the_live_size_after_thirty_refreshes_with_changing_states(feed_server, exporter_process):
    """Resident memory at the live feed's size (1,801 connectors) after 30 refreshes in which 30% of the connectors
    change state, each followed by a scrape as Prometheus sends it: at most 60 MiB. The benchmark measures the same
    side by side with the original design and the previous build."""
    feed = generate_feed()
    feed_server.set_body(feed.kml)
    exporter = exporter_process("--kml-url", feed_server.url, "--refresh-interval", "300")
    exporter.wait_until_up()

    def served_states() -> set[tuple[str, str]] | None:
        status, _, body = http_get(exporter.base_url + "/metrics", PROMETHEUS_SCRAPE)
        assert status == 200
        samples = parse_exposition(gzip.decompress(body).decode()).samples("chargy_connector_detailed_state_info")
        served = {(sample.labels["connector"], sample.labels["state"]) for sample in samples}
        return served if served == {(c.connector, c.state) for c in feed.connectors} else None

    for refresh in range(30):
        feed = evolve(feed, seed=refresh, state_changes=0.3, removed=0)
        feed_server.set_body(feed.kml)
        exporter.refresh_now()
        wait_until(served_states, 60, f"refresh {refresh + 1} served")
    rss = memory_kb(exporter.process.pid)["VmRSS"]
    assert rss <= RSS_BOUND_KIB, f"{rss / 1024:.1f} MiB resident after 30 refreshes"
