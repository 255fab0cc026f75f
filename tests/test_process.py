"""process.py: the exporter's own process metrics, at /metrics under prometheus_client's names, fresh at every scrape
while the connector bodies stay cached per refresh; and over OTLP under the semantic conventions' names."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterator

import pytest
from conftest import parse_exposition
from feedgen import generate_feed
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

from chargy_exporter import process
from chargy_exporter.kml import parse_kml
from chargy_exporter.metrics import MetricsPipeline
from chargy_exporter.model import FeedStatus, State
from chargy_exporter.prometheus import PrometheusEndpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process collector reads /proc")

NAMES = {
    "process_resident_memory_bytes", "process_virtual_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
    "process_max_fds", "process_start_time_seconds",
}  # fmt: skip
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[PrometheusEndpoint]:
    endpoint = PrometheusEndpoint()
    pipeline = MetricsPipeline(Resource.create({}), on_published=[endpoint.render])
    endpoint.exposition("", "gzip")  # asked before the render: it encodes and compresses this body ahead
    pipeline.publish(State(parse_kml(generate_feed(stations=20, seed=3).kml), FeedStatus(up=True)))
    yield endpoint
    pipeline.shutdown()


def scraped(endpoint: PrometheusEndpoint, accept: str = "", encoding: str = "", names: set[str] | None = None) -> str:
    _, gzipped, body = endpoint.exposition(accept, encoding, names)
    return (gzip.decompress(body) if gzipped else body).decode()


@pytest.mark.parametrize(("accept", "encoding"), [("", ""), ("", "gzip"), (OPENMETRICS, ""), (OPENMETRICS, "gzip")])
def test_every_format_has_the_process_families_after_the_connectors(endpoint, accept, encoding):
    text = scraped(endpoint, accept, encoding)
    exposition = parse_exposition(text)
    assert {name for name in NAMES if exposition.value(name) is not None} == NAMES
    assert exposition.value("process_resident_memory_bytes") > 1024 * 1024
    assert exposition.value("chargy_feed_up") == 1 and exposition.samples("chargy_connector_state")
    if accept:
        assert text.endswith("# EOF\n") and text.count("# EOF") == 1  # OpenMetrics' last line, once
        assert "# TYPE process_cpu_seconds counter" in text


def test_the_process_values_are_read_at_each_scrape_the_connectors_kept(endpoint):
    before = parse_exposition(scraped(endpoint, encoding="gzip"))
    pipes = [os.pipe() for _ in range(10)]
    try:
        after = parse_exposition(scraped(endpoint, encoding="gzip"))
    finally:
        for pipe in pipes:
            for fd in pipe:
                os.close(fd)
    assert after.value("process_open_fds") >= before.value("process_open_fds") + 20
    states = [(s.labels, s.value) for s in before.samples("chargy_connector_state")]
    assert [(s.labels, s.value) for s in after.samples("chargy_connector_state")] == states


def test_the_gzip_body_is_one_member_every_reader_takes(endpoint, tmp_path):
    _, gzipped, body = endpoint.exposition("", "gzip")
    reader = zlib.decompressobj(wbits=31)  # gzip, one member: the data ends where the member does
    text = reader.decompress(body)
    assert gzipped and reader.eof and reader.unused_data == b"" and b"process_open_fds" in text
    curl = shutil.which("curl")
    if curl:  # curl decodes it as a client would (Prometheus' Go reader is exercised in tests/test_dashboard.py)
        served = tmp_path / "body.gz"
        served.write_bytes(body)
        decoded = subprocess.run([curl, "-s", "--compressed", served.as_uri()], capture_output=True, check=True)
        assert decoded.stdout == body  # curl does not decode file:// URLs: it hands back the bytes...
        assert gzip.decompress(decoded.stdout) == text  # ...which decode whole


def test_name_filters_select_process_series_too(endpoint):
    text = scraped(endpoint, names={"process_resident_memory_bytes", "chargy_feed_up"})
    assert {line.split(" ")[0] for line in text.splitlines() if not line.startswith("#")} == {
        "process_resident_memory_bytes", "chargy_feed_up"}  # fmt: skip
    assert "# TYPE process_resident_memory_bytes gauge" in text
    text = scraped(endpoint, OPENMETRICS, "gzip", {"process_cpu_seconds_total"})
    assert text.startswith("# HELP process_cpu_seconds") and text.endswith("# EOF\n")
    assert [line.split(" ")[0] for line in text.splitlines() if not line.startswith("#")] == [
        "process_cpu_seconds_total"
    ]


def test_the_otlp_instruments_carry_the_same_facts_under_the_semantic_conventions_names():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    process.register_instruments(provider.get_meter("chargy-exporter"))
    data = reader.get_metrics_data()
    provider.shutdown()
    assert data is not None
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert set(metrics) == {
        "process.memory.usage", "process.memory.virtual", "process.cpu.time", "process.unix.file_descriptor.count",
        "process.uptime",
    }  # fmt: skip
    units = {name: metric.unit for name, metric in metrics.items()}
    assert units == {
        "process.memory.usage": "By", "process.memory.virtual": "By", "process.cpu.time": "s",
        "process.unix.file_descriptor.count": "{file_descriptor}", "process.uptime": "s",
    }  # fmt: skip
    points = {name: list(metric.data.data_points) for name, metric in metrics.items()}
    assert {p.attributes["cpu.mode"] for p in points["process.cpu.time"]} == {"user", "system"}
    assert points["process.memory.usage"][0].value > 1024 * 1024
    assert points["process.memory.virtual"][0].value >= points["process.memory.usage"][0].value
    assert points["process.unix.file_descriptor.count"][0].value >= 3
    assert points["process.uptime"][0].value >= 0
    assert metrics["process.cpu.time"].data.is_monotonic and not metrics["process.memory.usage"].data.is_monotonic


def test_the_names_are_the_semantic_conventions_package_ones():
    # The conventions are in development: if a release renames one, this fails and the names move with it.
    conventions = pytest.importorskip("opentelemetry.semconv._incubating.metrics.process_metrics")
    assert (conventions.PROCESS_MEMORY_USAGE, conventions.PROCESS_MEMORY_VIRTUAL, conventions.PROCESS_CPU_TIME,
            conventions.PROCESS_UNIX_FILE_DESCRIPTOR_COUNT, conventions.PROCESS_UPTIME) == (
        "process.memory.usage", "process.memory.virtual", "process.cpu.time", "process.unix.file_descriptor.count",
        "process.uptime")  # fmt: skip
