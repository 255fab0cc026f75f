"""metrics.py + prometheus.py in process: the exposition equals the feed, through churn, at scale, under load."""

from __future__ import annotations

import gc
import threading

import pytest
from conftest import assert_matches_feed, parse_exposition
from feedgen import evolve, generate_feed
from loopback import wait_until
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

from chargy_exporter.kml import parse_kml
from chargy_exporter.metrics import MetricsPipeline
from chargy_exporter.model import FeedStatus, State
from chargy_exporter.prometheus import PrometheusEndpoint


def make_pipeline() -> tuple[MetricsPipeline, PrometheusEndpoint]:
    endpoint = PrometheusEndpoint()
    pipeline = MetricsPipeline(Resource.create({}), on_published=[endpoint.render])
    return pipeline, endpoint


def publish(pipeline: MetricsPipeline, feed, up: bool = True) -> None:
    pipeline.publish(State(parse_kml(feed.kml), FeedStatus(up=up)))


def scrape(endpoint: PrometheusEndpoint):
    _, _, body = endpoint.exposition("", "")
    return parse_exposition(body.decode())


def state_series(exposition) -> set[tuple[str, ...]]:
    return {
        (s.labels["connector"], s.labels["device"], s.labels["station"], s.labels["speed"],
         s.labels["chargy_connector_state"], str(s.value))
        for s in exposition.samples("chargy_connector_state")
    }  # fmt: skip


def expected_state_series(feed) -> set[tuple[str, ...]]:
    return {
        (c.connector, c.device, c.station, c.speed, state, "1.0" if c.simplified == state else "0.0")
        for c in feed.connectors
        for state in ("available", "charging", "unavailable")
    }


def test_labels_are_exactly_the_contract():
    pipeline, endpoint = make_pipeline()
    publish(pipeline, generate_feed(stations=5, seed=1))
    exposition = scrape(endpoint)
    for sample in exposition.samples("chargy_connector_state"):
        assert set(sample.labels) == {"chargy_connector_state", "connector", "device", "station", "speed"}
    for sample in exposition.samples("chargy_connector_detailed_state_info"):
        assert set(sample.labels) == {"connector", "device", "station", "speed", "state"}
    assert "otel_scope" not in exposition.text


@pytest.mark.slow
def test_ten_times_the_real_feed_is_exported_completely_without_overflow():
    feed = generate_feed(connectors=17_000, seed=10)
    pipeline, endpoint = make_pipeline()
    publish(pipeline, feed)
    assert len(feed.connectors) >= 17_000
    assert_matches_feed(scrape(endpoint), feed)
    pipeline.shutdown()


def test_churn_output_always_equals_the_current_feed():
    feed = generate_feed(connectors=300, seed=2)
    pipeline, endpoint = make_pipeline()
    for refresh in range(14):
        publish(pipeline, feed)
        assert_matches_feed(scrape(endpoint), feed)
        feed = evolve(feed, seed=refresh, state_changes=0.5, removed=0.05, added_stations=15)
    pipeline.shutdown()


@pytest.mark.slow  # 340 refreshes: the memory soak
def test_memory_stays_flat_across_many_refreshes():
    feed = generate_feed(connectors=200, seed=4)
    pipeline, endpoint = make_pipeline()

    def live_objects_peak(refreshes: int) -> int:
        # Objects the garbage collector tracks (attribute dicts, aggregations...), sampled every few refreshes.
        peak = 0
        nonlocal feed
        for index in range(refreshes):
            # Never-seen-before connectors and states on every refresh: what months of upstream churn look like.
            feed = evolve(feed, seed=index, state_changes=0.5, removed=0.04, added_stations=4)
            pipeline.publish(State(parse_kml(feed.kml), FeedStatus(up=True)))
            endpoint.exposition("", "gzip")
            if index % 4 == 3:
                gc.collect()
                peak = max(peak, len(gc.get_objects()))
        return peak

    live_objects_peak(40)  # warm-up
    early = live_objects_peak(60)
    late = live_objects_peak(240)
    # A reader kept across refreshes would hold every attribute set ever seen, and this would grow with them.
    assert late < early * 1.1, (early, late)
    pipeline.shutdown()


def test_concurrent_scrapes_see_the_old_or_the_new_snapshot_never_a_mix():
    first = generate_feed(connectors=300, seed=5)
    second = evolve(first, seed=6, state_changes=0.6, removed=0.1, added_stations=20)
    snapshots = [parse_kml(first.kml), parse_kml(second.kml)]
    valid = [expected_state_series(first), expected_state_series(second)]
    pipeline, endpoint = make_pipeline()
    pipeline.publish(State(snapshots[0], FeedStatus(up=True)))
    stop = threading.Event()
    mixed: list[int] = []
    seen = [set[int]() for _ in range(3)]
    scrapes = [0, 0, 0]  # completed by each scraper

    def scraper(index: int) -> None:
        while not stop.is_set():
            series = state_series(scrape(endpoint))
            if series in valid:
                seen[index].add(valid.index(series))
            else:
                mixed.append(len(series))
            scrapes[index] += 1

    threads = [threading.Thread(target=scraper, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    # Publish the two snapshots in turn, scrapes running all along; after each publish, until every scraper has begun
    # (and so finished) a scrape after it: each then sees both snapshots, whatever the threads' timing.
    for publishes in range(6):
        pipeline.publish(State(snapshots[publishes % 2], FeedStatus(up=True)))
        done = list(scrapes)
        wait_until(lambda done=done: all(now >= then + 2 for now, then in zip(scrapes, done, strict=True)), 60,
                   "every scraper scraped after the publish")  # fmt: skip
    stop.set()
    for thread in threads:
        thread.join()
    assert not mixed
    assert seen == [{0, 1}] * 3
    pipeline.shutdown()


def test_self_metrics_follow_the_status():
    pipeline, endpoint = make_pipeline()
    feed = generate_feed(stations=12, seed=8)
    snapshot = parse_kml(feed.kml)
    status = FeedStatus(up=False, last_success_time=1_700_000_000.5, last_refresh_duration=0.25,
                        errors={"timeout": 3}, skipped={"malformed_device_json": 2})  # fmt: skip
    pipeline.publish(State(snapshot, status))
    exposition = scrape(endpoint)
    assert exposition.value("chargy_feed_up") == 0
    assert exposition.value("chargy_feed_last_success_timestamp_seconds") == 1_700_000_000.5
    assert exposition.value("chargy_feed_refresh_duration_seconds") == 0.25
    assert exposition.value("chargy_feed_refresh_errors_total", reason="timeout") == 3
    assert exposition.value("chargy_feed_refresh_errors_total", reason="http_5xx") == 0
    assert exposition.value("chargy_feed_skipped_records_total", reason="malformed_device_json") == 2
    assert exposition.value("chargy_stations") == len(feed.stations)
    assert exposition.value("chargy_devices") == sum(len(s.devices) for s in feed.stations)
    assert exposition.value("chargy_connectors") == len(feed.connectors)
    stations = {(s.labels["station"], s.labels["latitude"], s.labels["longitude"])
                for s in exposition.samples("chargy_station_info")}  # fmt: skip
    assert stations == {(s.name, str(s.latitude), str(s.longitude)) for s in feed.stations}
    pipeline.shutdown()


def test_before_the_first_refresh_there_is_no_connector_data_and_feed_up_is_0():
    pipeline, endpoint = make_pipeline()
    pipeline.publish(State())
    exposition = scrape(endpoint)
    assert exposition.value("chargy_feed_up") == 0
    assert exposition.samples("chargy_connector_state") == []
    assert exposition.value("chargy_feed_last_success_timestamp_seconds") is None
    pipeline.shutdown()


def points_of(metrics, name: str) -> list:  # type: ignore[no-untyped-def]
    return [p for m in metrics if m.name == name for p in m.data.data_points]


def test_long_lived_readers_read_the_self_metrics_and_get_exactly_the_current_network_kept():
    """The OTLP reader lives as long as the process: it never reads the network's instruments (the SDK would keep
    every attribute set they ever reported), and the network kept for its exports is exactly the current feed's,
    through growth and churn, with nothing folded into an overflow point."""
    readers: list[InMemoryMetricReader] = []

    def make_reader(limits):  # type: ignore[no-untyped-def]
        readers.append(InMemoryMetricReader(cardinality_limits=limits))
        return readers[-1]

    pipeline = MetricsPipeline(Resource.create({}), readers=[make_reader])
    assert len(readers) == 1
    feeds = [generate_feed(stations=5, seed=1), generate_feed(connectors=3000, seed=2)]
    feeds += [evolve(feeds[-1], seed=seed, state_changes=0.5, removed=0.05, added_stations=10) for seed in (3, 4)]
    for feed in feeds:
        pipeline.publish(State(parse_kml(feed.kml), FeedStatus(up=True)))
        read = readers[0].get_metrics_data()
        names = {m.name for rm in read.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        assert "chargy_feed_up" in names and not names & {"chargy_connector_state", "chargy_station_info"}
        kept = pipeline.network_at(7)
        points = points_of(kept, "chargy_connector_state")
        assert {p.time_unix_nano for p in points} == {7}
        got = {(p.attributes["connector"], p.attributes["chargy_connector_state"]): p.value for p in points}
        assert len(points) == len(got) == 3 * len(feed.connectors)
        assert got == {
            (c.connector, state): 1 if c.simplified == state else 0
            for c in feed.connectors
            for state in ("available", "charging", "unavailable")
        }
        assert len(points_of(kept, "chargy_connector_detailed_state_info")) == len(feed.connectors)
    pipeline.shutdown()


def test_one_collection_per_publish_serves_prometheus_and_the_kept_network():
    """With Prometheus scraped and a long-lived reader, a publish collects once: the bodies and the kept network come
    from the same collection."""
    endpoint = PrometheusEndpoint()
    pipeline = MetricsPipeline(
        Resource.create({}), readers=[lambda limits: InMemoryMetricReader(cardinality_limits=limits)],
        on_published=[endpoint.render],
    )  # fmt: skip
    scrape(endpoint)  # a scraper asked: the next render encodes its format
    feed = generate_feed(connectors=200, seed=9)
    collections: list[object] = []
    original = MetricsPipeline.attached

    def counted(self, make_reader):  # type: ignore[no-untyped-def]
        collections.append(make_reader)
        return original(self, make_reader)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MetricsPipeline, "attached", counted)
        pipeline.publish(State(parse_kml(feed.kml), FeedStatus(up=True)))
    assert len(collections) == 1
    assert len(points_of(pipeline.network_at(0), "chargy_connector_state")) == 3 * len(feed.connectors)
    assert_matches_feed(scrape(endpoint), feed)
    pipeline.shutdown()


def test_nothing_is_kept_without_a_long_lived_reader():
    pipeline, endpoint = make_pipeline()
    scrape(endpoint)
    publish(pipeline, generate_feed(connectors=100, seed=4))
    assert pipeline.network_at(0) is None
    pipeline.shutdown()
