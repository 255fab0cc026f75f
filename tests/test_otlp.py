"""OTLP push against real receivers (tests/otlp_receivers.py) on 127.0.0.1, through the real exporter process."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http import HTTPStatus
from typing import Any

import grpc
import pytest
from conftest import ExporterProcess, FeedServer, free_port, http_get
from feedgen import GeneratedFeed, generate_feed
from opentelemetry.sdk.resources import Resource
from otlp_receivers import Failure, GrpcReceiver, HttpReceiver, ReceiverBase, attribute_key, iter_points, point_value

from chargy_exporter.otlp import MAX_POINTS_PER_REQUEST as MAX_POINTS

pytestmark = pytest.mark.e2e

GRPC_DEFAULT_LIMIT = 4 * 1024 * 1024
SECRET_HEADER = "Bearer otlp-token-5f2c9a"
StartExporter = Callable[..., ExporterProcess]


@pytest.fixture(scope="module")
def feed() -> GeneratedFeed:
    # 2,000 connectors: over the SDK's default cardinality limit (2,000 per metric), and more data points
    # (~9,000) than one request holds, so the export is batched.
    return generate_feed(connectors=2000, seed=11)


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcReceiver]:
    receiver = GrpcReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    receiver = HttpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> Iterator[ReceiverBase]:
    made: GrpcReceiver | HttpReceiver = GrpcReceiver() if request.param == "grpc" else HttpReceiver()
    yield made
    made.close()


def protocol_of(receiver: ReceiverBase) -> str:
    return "grpc" if isinstance(receiver, GrpcReceiver) else "http/protobuf"


def push_env(receiver: ReceiverBase, **more: str) -> dict[str, str]:
    """Push to `receiver` with the standard variables: the generic endpoint (for HTTP, /v1/metrics is appended)."""
    base = receiver.endpoint if isinstance(receiver, GrpcReceiver) else receiver.base_url  # type: ignore[attr-defined]
    return {
        "OTEL_METRICS_EXPORTER": "prometheus,otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol_of(receiver),
        "OTEL_EXPORTER_OTLP_ENDPOINT": base,
        "OTEL_EXPORTER_OTLP_HEADERS": f"authorization={SECRET_HEADER.replace(' ', '%20')}",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        **more,
    }


def expected_points(feed: GeneratedFeed) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    state: dict[tuple[tuple[str, str], ...], float] = {}
    detailed: dict[tuple[tuple[str, str], ...], float] = {}
    for c in feed.connectors:
        labels = {"connector": c.connector, "device": c.device, "station": c.station, "speed": c.speed}
        for simplified in ("available", "charging", "unavailable"):
            key = tuple(sorted({**labels, "chargy_connector_state": simplified}.items()))
            state[key] = 1.0 if simplified == c.simplified else 0.0
        detailed[tuple(sorted({**labels, "state": c.state}.items()))] = 1.0
    return {"chargy_connector_state": state, "chargy_connector_detailed_state_info": detailed}


def assert_every_point(receiver: ReceiverBase, feed: GeneratedFeed) -> None:
    for name, expected in expected_points(feed).items():
        got = receiver.points(name)
        missing = expected.keys() - got.keys()
        extra = got.keys() - expected.keys()
        assert not missing and not extra, (
            f"{name}: {len(missing)} missing, {len(extra)} unexpected, e.g. {extra or missing}"
        )
        wrong = {key: (got[key], value) for key, value in expected.items() if got[key] != value}
        assert not wrong, f"{name}: {len(wrong)} wrong values, e.g. {next(iter(wrong.items()))}"


def wait_complete(receiver: ReceiverBase, feed: GeneratedFeed, timeout: float = 45) -> None:
    connectors = len(feed.connectors)
    receiver.wait_for(
        lambda: (
            receiver.value("chargy_connectors") == connectors
            and len(receiver.points("chargy_connector_state")) >= 3 * connectors
            and len(receiver.points("chargy_connector_detailed_state_info")) >= connectors
        ),
        timeout,
        "every connector pushed",
    )


def otlp_errors(process: ExporterProcess) -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value for sample in process.scrape().samples("chargy_otlp_export_errors_total")
    }


def wait_for_error(process: ExporterProcess, reason: str, timeout: float = 30) -> dict[str, float]:
    process.wait_for(lambda e: (e.value("chargy_otlp_export_errors_total", reason=reason) or 0) >= 1, timeout)
    return otlp_errors(process)


def logs_of(process: ExporterProcess) -> str:
    """The process's log, also after it stopped."""
    return process.log_path.read_text(errors="replace")


def failure_lines(process: ExporterProcess) -> list[str]:
    return [line for line in logs_of(process).splitlines() if "OTLP export to" in line and " failed (" in line]


def seconds_between(logs: str, first: str, then: str) -> float:
    """Seconds between the log lines containing `first` and `then` (timestamps of the default format)."""

    def stamp(marker: str) -> float:
        line = next(line for line in logs.splitlines() if marker in line)
        clock = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        return clock.timestamp()

    return stamp(then) - stamp(first)


def stop_quickly(process: ExporterProcess, limit: float = 5.0) -> None:
    started = time.monotonic()
    code = process.stop(timeout=15)
    took = time.monotonic() - started
    assert code == 0, logs_of(process)
    assert took < limit, f"shutdown took {took:.1f} s:\n{logs_of(process)}"


# ---- every data point, both protocols -------------------------------------------------------------------------


def test_every_data_point_and_the_resource_arrive(
    receiver: ReceiverBase, feed: GeneratedFeed, feed_server: FeedServer, exporter_process: StartExporter
) -> None:
    feed_server.set_body(feed.kml)
    grpc_push = isinstance(receiver, GrpcReceiver)
    env = push_env(
        receiver,
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test,team=ev%20charging",
        # HTTP: gzip and a service name of our own; gRPC: the default service name.
        **({} if grpc_push else {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip", "OTEL_SERVICE_NAME": "chargy-lu"}),
    )
    process = exporter_process("--kml-url", feed_server.url, env=env)
    wait_complete(receiver, feed)

    assert_every_point(receiver, feed)
    assert receiver.value("chargy_feed_up") == 1.0
    assert receiver.value("chargy_stations") == len(feed.stations)
    assert not any(("otel.metric.overflow", "true") in key for _, key in receiver.latest), "cardinality overflow"
    resource = receiver.resource_attributes()
    assert resource["service.name"] == ("chargy-exporter" if grpc_push else "chargy-lu")
    assert resource["deployment.environment"] == "test"
    assert resource["team"] == "ev charging"
    assert resource["service.version"]

    requests = receiver.requests()
    assert all(r.headers.get("authorization") == SECRET_HEADER for r in requests)
    assert max(r.size for r in requests) < GRPC_DEFAULT_LIMIT
    # One export of ~9,000 data points went as several requests.
    assert len(requests) >= 2 and max(r.points for r in requests) < 3 * len(feed.connectors)
    if not grpc_push:
        assert all(r.headers.get("content-encoding") == "gzip" for r in requests)

    # The Prometheus endpoint runs alongside, with the error counter at 0 for every reason.
    exposition = process.wait_until_up()
    assert len(exposition.samples("chargy_connector_state")) == 3 * len(feed.connectors)
    assert otlp_errors(process) == {r: 0.0 for r in ("internal", "rejected", "timeout", "unavailable")}
    stop_quickly(process)
    logs = logs_of(process)
    assert "otlp-token-5f2c9a" not in logs
    assert "OTLP export to" in logs and " succeeded" in logs
    assert not failure_lines(process)


def test_otlp_alone_via_the_endpoint_flag(
    http_receiver: HttpReceiver, feed: GeneratedFeed, feed_server: FeedServer, exporter_process: StartExporter
) -> None:
    """`--otlp-endpoint` with OTEL_METRICS_EXPORTER=otlp: no Prometheus reader, /healthz still served."""
    feed_server.set_body(feed.kml)
    process = exporter_process(
        "--kml-url",
        feed_server.url,
        "--otlp-endpoint",
        http_receiver.base_url,  # a bare address: /v1/metrics is added
        "--otlp-protocol",
        "http/protobuf",
        env={"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "1000"},
    )
    wait_complete(http_receiver, feed)
    assert_every_point(http_receiver, feed)
    status, _, body = http_get(process.base_url + "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, _, body = http_get(process.base_url + "/metrics")
    assert status == 200 and b"chargy_connector_state" not in body
    stop_quickly(process)


# ---- a receiver that is down, slow or rejecting ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_receiver_down(
    protocol: str, feed: GeneratedFeed, feed_server: FeedServer, exporter_process: StartExporter
) -> None:
    feed_server.set_body(feed.kml)
    port = free_port()  # nobody listens
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "OTEL_METRICS_EXPORTER": "prometheus,otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_HEADERS": f"authorization={SECRET_HEADER.replace(' ', '%20')}",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "OTEL_METRIC_EXPORT_TIMEOUT": "1500",
    }
    process = exporter_process("--kml-url", feed_server.url, env=env)
    errors = wait_for_error(process, "unavailable")
    assert errors["timeout"] == errors["rejected"] == errors["internal"] == 0
    # The Prometheus side is unaffected: data served, the feed refreshed.
    exposition = process.wait_until_up()
    assert len(exposition.samples("chargy_connector_state")) == 3 * len(feed.connectors)
    lines = failure_lines(process)
    assert lines, logs_of(process)
    assert all(re.search(r"failed \(unavailable\): .+", line) for line in lines), lines
    if protocol == "grpc":
        # The receiver comes up: pushes resume (the channel reconnects quickly).
        receiver = GrpcReceiver(port)
        try:
            wait_complete(receiver, feed)
            assert_every_point(receiver, feed)
        finally:
            receiver.close()
        # The line is written once the export returns, a moment after its last request arrived.
        deadline = time.monotonic() + 10
        while "succeeded again" not in logs_of(process) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "succeeded again" in logs_of(process)
    stop_quickly(process)
    logs = logs_of(process)
    assert "otlp-token-5f2c9a" not in logs
    # Once per failure: no retry chatter, every WARNING/ERROR line is one failure line.
    noisy = [
        line for line in logs.splitlines() if re.search(r" (WARNING|ERROR) ", line) and "OTLP export to" not in line
    ]
    assert not noisy, noisy
    assert len(failure_lines(process)) >= errors["unavailable"]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_receiver_slow(
    protocol: str, feed: GeneratedFeed, feed_server: FeedServer, exporter_process: StartExporter
) -> None:
    receiver: GrpcReceiver | HttpReceiver = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
    receiver.delay = 3.0
    try:
        feed_server.set_body(feed.kml)
        process = exporter_process(
            "--kml-url",
            feed_server.url,
            env=push_env(receiver, OTEL_EXPORTER_OTLP_TIMEOUT="300", OTEL_METRIC_EXPORT_TIMEOUT="1000"),
        )
        errors = wait_for_error(process, "timeout")
        assert errors["unavailable"] == errors["rejected"] == 0
        assert process.wait_until_up().value("chargy_feed_up") == 1.0
        assert any("failed (timeout)" in line for line in failure_lines(process))
        stop_quickly(process)
    finally:
        receiver.close()


@pytest.mark.parametrize(
    ("protocol", "failure", "reason"),
    [
        ("grpc", Failure(grpc_code=grpc.StatusCode.INVALID_ARGUMENT, message="bad data"), "rejected"),
        ("grpc", Failure(grpc_code=grpc.StatusCode.UNAVAILABLE, message="overloaded"), "unavailable"),
        ("http/protobuf", Failure(http_status=400, message="bad data"), "rejected"),
        ("http/protobuf", Failure(http_status=503, message="overloaded"), "unavailable"),
    ],
    ids=["grpc-invalid-argument", "grpc-unavailable", "http-400", "http-503"],
)
def test_receiver_rejecting(
    protocol: str,
    failure: Failure,
    reason: str,
    feed: GeneratedFeed,
    feed_server: FeedServer,
    exporter_process: StartExporter,
) -> None:
    receiver: GrpcReceiver | HttpReceiver = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
    receiver.failure = failure
    try:
        feed_server.set_body(feed.kml)
        process = exporter_process(
            "--kml-url", feed_server.url, env=push_env(receiver, OTEL_METRIC_EXPORT_TIMEOUT="1500")
        )
        errors = wait_for_error(process, reason)
        assert sum(errors.values()) == errors[reason]
        assert process.wait_until_up().value("chargy_feed_up") == 1.0
        line = next(line for line in failure_lines(process) if f"failed ({reason})" in line)
        # The receiver's answer is in the log line: its gRPC details, or its HTTP status.
        assert (failure.message if failure.grpc_code else HTTPStatus(failure.http_status or 0).phrase) in line
        if reason == "rejected":
            # Not retried: one attempt per request of an export (an export is split into requests).
            requests_per_export = math.ceil((4 * len(feed.connectors) + len(feed.stations) + 100) / MAX_POINTS)
            assert receiver.attempts <= (len(failure_lines(process)) + 1) * requests_per_export
        elif reason == "unavailable":
            # Retried within OTEL_METRIC_EXPORT_TIMEOUT before giving up.
            assert receiver.attempts >= 2
        stop_quickly(process)
        assert "otlp-token-5f2c9a" not in logs_of(process)
    finally:
        receiver.close()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_sigterm_with_an_export_in_flight(
    protocol: str, feed: GeneratedFeed, feed_server: FeedServer, exporter_process: StartExporter
) -> None:
    receiver: GrpcReceiver | HttpReceiver = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
    receiver.delay = 30.0  # answers long after the exporter must have stopped
    try:
        feed_server.set_body(feed.kml)
        process = exporter_process(
            "--kml-url",
            feed_server.url,
            env=push_env(
                receiver,
                OTEL_METRIC_EXPORT_INTERVAL="300",
                OTEL_EXPORTER_OTLP_TIMEOUT="60000",
                OTEL_METRIC_EXPORT_TIMEOUT="120000",
            ),
        )
        process.wait_until_up()
        receiver.wait_for(lambda: receiver.attempts >= 1, 20, "an export in flight")
        stop_quickly(process, limit=5.0)
    finally:
        receiver.close()


# ---- production and beyond ------------------------------------------------------------------------------------------


class PointChecker:
    """A receiver sink that checks every connector data point against the feed as it arrives, keeping only
    hashes of what it saw, by collection time (all points of one collection share it)."""

    def __init__(self, feed: GeneratedFeed) -> None:
        self.expected = {c.connector: c for c in feed.connectors}
        self.seen: dict[int, set[int]] = {}
        self.wrong: list[str] = []
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, request: Any) -> None:
        self.sizes.append(request.ByteSize())
        for _, name, point in iter_points(request):
            if name not in ("chargy_connector_state", "chargy_connector_detailed_state_info"):
                continue
            attributes = dict(attribute_key(point.attributes))
            c = self.expected.get(attributes.get("connector", ""))
            value = point_value(point)
            ok = c is not None and (attributes["device"], attributes["station"], attributes["speed"]) == (
                c.device,
                c.station,
                c.speed,
            )
            if name == "chargy_connector_state":
                state = attributes.get("chargy_connector_state")
                ok = ok and c is not None and value == (1.0 if state == c.simplified else 0.0)
                key = hash((attributes.get("connector"), state))
            else:
                ok = ok and c is not None and value == 1.0 and attributes.get("state") == c.state
                key = hash((attributes.get("connector"), "detailed"))
            with self.lock:
                if not ok and len(self.wrong) < 5:
                    self.wrong.append(f"{name} {attributes} = {value}")
                self.seen.setdefault(point.time_unix_nano, set()).add(key)

    def complete(self) -> bool:
        """One collection holds all 4 data points of every connector (3 states + detailed info)."""
        with self.lock:
            return any(len(keys) >= 4 * len(self.expected) for keys in self.seen.values())


def snapshot_of(feed: GeneratedFeed) -> Any:
    """The feed as the model holds it, built directly (the KML parser refuses feeds over 20,000 connectors)."""
    from chargy_exporter.model import Connector, Device, Snapshot, Station

    return Snapshot(
        stations=tuple(
            Station(
                s.name,
                s.address,
                s.latitude,
                s.longitude,
                tuple(
                    Device(
                        d.name,
                        tuple(
                            Connector(c.name, c.number, None if c.speed is None else float(c.speed), c.state)
                            for c in d.connectors
                        ),
                    )
                    for d in s.devices
                ),
            )
            for s in feed.stations
        )
    )


@pytest.mark.slow
def test_17000_connectors_arrive_complete_through_the_process(
    feed_server: FeedServer, exporter_process: StartExporter
) -> None:
    """One export of the production-times-ten feed is ~12 MB: it only arrives at a default gRPC receiver
    (4 MiB per message) in batches."""
    feed = generate_feed(connectors=17_000, seed=17)
    feed_server.set_body(feed.kml)
    receiver = GrpcReceiver()
    checker = PointChecker(feed)
    receiver.sink = checker
    try:
        process = exporter_process(
            "--kml-url",
            feed_server.url,
            "--max-feed-bytes",
            "100MiB",
            env={
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_METRIC_EXPORT_INTERVAL": "2000",
            },
        )
        receiver.wait_for(checker.complete, 120, "a complete export")
        assert not checker.wrong, checker.wrong
        assert max(checker.sizes) < GRPC_DEFAULT_LIMIT
        assert sum(checker.sizes) > 2 * GRPC_DEFAULT_LIMIT  # more than one message's worth
        assert not failure_lines(process), logs_of(process)
        stop_quickly(process, limit=10.0)
        assert seconds_between(logs_of(process), "received SIGTERM", "stopped") < 5.0
    finally:
        receiver.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_170000_connectors_arrive_complete_through_grpc_with_default_limits(grpc_receiver: GrpcReceiver) -> None:
    """In-process (the process refuses feeds over 20,000 connectors): the pipeline with the OTLP reader only,
    one export of ~775,000 data points (~120 MB) to a receiver with grpcio's default limits."""
    from chargy_exporter.metrics import MetricsPipeline
    from chargy_exporter.otlp import OtlpPush
    from chargy_exporter.otlp_settings import OtlpSettings
    from chargy_exporter.status import FeedStatus, State

    feed = generate_feed(connectors=170_000, seed=5)
    checker = PointChecker(feed)
    grpc_receiver.sink = checker
    # Default export timeout (30 s of waiting on the receiver); no periodic export, the test flushes.
    push = OtlpPush(OtlpSettings(endpoint=grpc_receiver.endpoint, export_interval=3600))
    pipeline = MetricsPipeline([push.make_reader], Resource.create({}), instruments=[push.register_instruments])
    push.attach(pipeline.notify)
    try:
        pipeline.publish(State(snapshot_of(feed), FeedStatus(up=True)))
        assert push.force_flush(timeout_millis=300_000)
        assert checker.complete(), f"{max(map(len, checker.seen.values()), default=0)} of {4 * len(feed.connectors)}"
        assert not checker.wrong, checker.wrong
        assert max(checker.sizes) < GRPC_DEFAULT_LIMIT
        assert push.errors == dict.fromkeys(("internal", "rejected", "timeout", "unavailable"), 0)
    finally:
        started = time.monotonic()
        pipeline.shutdown(timeout_millis=2_000)
        assert time.monotonic() - started < 5.0


# ---- in-process: the pipeline replaces its provider ------------------------------------------------------------------


def test_provider_rebuild_recreates_the_reader_and_keeps_the_error_count(grpc_receiver: GrpcReceiver) -> None:
    from chargy_exporter.kml import parse_kml
    from chargy_exporter.metrics import MetricsPipeline
    from chargy_exporter.otlp import OtlpPush
    from chargy_exporter.otlp_settings import OtlpSettings
    from chargy_exporter.prometheus import PrometheusEndpoint
    from chargy_exporter.status import FeedStatus, State

    settings = OtlpSettings(endpoint=grpc_receiver.endpoint, export_interval=3600, export_timeout=1.0)
    push = OtlpPush(settings)
    endpoint = PrometheusEndpoint()
    pipeline = MetricsPipeline(
        [endpoint.make_reader, push.make_reader],
        Resource.create({"service.name": "in-process"}),
        on_published=[endpoint.render],
        instruments=[push.register_instruments],
    )
    push.attach(pipeline.notify)
    try:
        grpc_receiver.failure = Failure(grpc_code=grpc.StatusCode.PERMISSION_DENIED, message="no")
        first = generate_feed(connectors=600, seed=1)
        pipeline.publish(State(parse_kml(first.kml), FeedStatus(up=True)))
        push.force_flush()
        assert push.errors["rejected"] == 1
        deadline = time.monotonic() + 5
        while 'chargy_otlp_export_errors_total{reason="rejected"} 1.0' not in exposition(endpoint):
            assert time.monotonic() < deadline, "the Prometheus exposition did not catch up with the error"
            time.sleep(0.05)

        grpc_receiver.failure = None
        feed = first
        for seed in range(2, 10):  # new stations each time: stale attribute sets pile up until a rebuild
            feed = generate_feed(connectors=600, seed=seed)
            pipeline.publish(State(parse_kml(feed.kml), FeedStatus(up=True)))
            if pipeline.rebuilds:
                break
        assert pipeline.rebuilds >= 1
        assert push.force_flush()
        # The new provider's reader pushed the current feed (the receiver keeps the older feeds' points too),
        # and the count survived the rebuild.
        state = grpc_receiver.points("chargy_connector_state")
        assert expected_points(feed)["chargy_connector_state"].items() <= state.items()
        assert grpc_receiver.points("chargy_otlp_export_errors")[(("reason", "rejected"),)] == 1.0
        assert 'chargy_otlp_export_errors_total{reason="rejected"} 1.0' in exposition(endpoint)
    finally:
        pipeline.shutdown(timeout_millis=2_000)


def exposition(endpoint: Any) -> str:
    return endpoint.exposition("", "")[2].decode()
