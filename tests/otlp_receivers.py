"""OTLP metric receivers for the tests, on the official opentelemetry-proto definitions, on 127.0.0.1.

`GrpcReceiver` is a grpcio server with the MetricsService and grpcio's DEFAULT limits (4 MiB per message);
`HttpReceiver` answers POST /v1/metrics with protobuf bodies, gzip-aware. Both keep what they receive and can
be told to misbehave: `stall()` (hold every request until `release()` or `close()`), answer with a `failure`
(retryable ones with a `retry_after` for the client's next try), or a partial success.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from loopback import wait_until
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

# (metric name, sorted attribute items) → value
PointKey = tuple[str, tuple[tuple[str, str], ...]]


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@dataclass
class Received:
    headers: dict[str, str]
    size: int  # bytes of the serialized request (after decompression)
    points: int
    resource: dict[str, Any]


@dataclass
class Failure:
    grpc_code: grpc.StatusCode | None = None
    http_status: int | None = None
    message: str = "test failure"
    # Seconds the client should wait before its next try (gRPC RetryInfo, HTTP Retry-After): 0 retries at once.
    retry_after: float | None = None


@dataclass
class ReceiverBase:
    """What arrived: `received` (one entry per accepted request) and `latest`, the last value of every data
    point by (metric name, attribute set)."""

    received: list[Received] = field(default_factory=list)
    latest: dict[PointKey, float] = field(default_factory=dict)
    # Aggregation temporality (AGGREGATION_TEMPORALITY_* number) of every sum and histogram metric, by name.
    temporality: dict[str, int] = field(default_factory=dict)
    attempts: int = 0  # requests seen, whatever the answer
    failure: Failure | None = None
    rejected_points: int = 0  # > 0: answer with a partial success
    sink: Callable[[ExportMetricsServiceRequest], None] | None = None  # instead of keeping requests
    lock: threading.Lock = field(default_factory=threading.Lock)
    _flowing: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._flowing.set()

    def stall(self) -> None:
        """Hold every request from now on, unanswered, until `release()` or `close()`."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def _handle(self, request: ExportMetricsServiceRequest, headers: dict[str, str], size: int) -> Failure | None:
        with self.lock:
            self.attempts += 1
            failure = self.failure
        self._flowing.wait()
        if failure is not None:
            return failure
        resource: dict[str, Any] = {}
        for resource_metrics in request.resource_metrics:
            resource = {kv.key: any_value(kv.value) for kv in resource_metrics.resource.attributes}
        temporality = {
            metric.name: getattr(metric, kind).aggregation_temporality
            for resource_metrics in request.resource_metrics
            for scope_metrics in resource_metrics.scope_metrics
            for metric in scope_metrics.metrics
            if (kind := metric.WhichOneof("data")) in ("sum", "histogram", "exponential_histogram")
        }
        if self.sink is not None:
            self.sink(request)
            points = -1
        else:
            found = {
                (name, attribute_key(point.attributes)): point_value(point) for _, name, point in iter_points(request)
            }
            points = len(found)
            with self.lock:
                self.latest.update(found)
        with self.lock:
            self.temporality.update(temporality)
            self.received.append(Received(headers, size, points, resource))
        return None

    def _response(self) -> ExportMetricsServiceResponse:
        response = ExportMetricsServiceResponse()
        if self.rejected_points:
            response.partial_success.rejected_data_points = self.rejected_points
            response.partial_success.error_message = "some points were not welcome"
        return response

    # ---- what arrived ----

    def requests(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def points(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Latest value of every data point of metric `name`, by attribute set."""
        with self.lock:
            return {attributes: value for (metric, attributes), value in self.latest.items() if metric == name}

    def value(self, name: str) -> float | None:
        """The latest value of a metric without attributes."""
        with self.lock:
            return self.latest.get((name, ()))

    def resource_attributes(self) -> dict[str, Any]:
        requests = self.requests()
        return requests[-1].resource if requests else {}

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
        """Until `predicate()` holds; `timeout` only bounds a test that would otherwise hang."""
        wait_until(predicate, timeout, f"receiver: {what}", lambda: f"{len(self.requests())} requests")


def iter_points(request: ExportMetricsServiceRequest) -> Iterator[tuple[Any, str, Any]]:
    """(resource, metric name, data point) for every data point of the request."""
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                if kind is None:
                    continue
                for point in getattr(metric, kind).data_points:
                    yield resource_metrics.resource, metric.name, point


def attribute_key(attributes: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((kv.key, str(any_value(kv.value))) for kv in attributes))


def point_value(point: Any) -> float:
    return float(point.as_int if point.WhichOneof("value") == "as_int" else point.as_double)


class GrpcReceiver(ReceiverBase):
    def __init__(self, port: int = 0) -> None:
        super().__init__()
        receiver = self

        class Service(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(
                self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
            ) -> ExportMetricsServiceResponse:
                headers = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
                failure = receiver._handle(request, headers, request.ByteSize())
                if failure is not None:
                    if failure.retry_after is not None:
                        delay = RetryInfo()
                        delay.retry_delay.FromNanoseconds(int(failure.retry_after * 1e9))
                        context.set_trailing_metadata((("google.rpc.retryinfo-bin", delay.SerializeToString()),))
                    context.abort(failure.grpc_code or grpc.StatusCode.INTERNAL, failure.message)
                return receiver._response()

        # Default options: grpcio's 4 MiB receive limit applies.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Service(), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.release()
        self._server.stop(grace=None)


class HttpReceiver(ReceiverBase):
    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/metrics":
                    self._answer(404, b"not found", "text/plain")
                    return
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                if self.headers.get("Content-Type") != "application/x-protobuf":
                    self._answer(415, b"unsupported media type", "text/plain")
                    return
                request = ExportMetricsServiceRequest.FromString(body)
                headers = {key.lower(): value for key, value in self.headers.items()}
                failure = receiver._handle(request, headers, len(body))
                if failure is not None:
                    status = Status(code=3, message=failure.message).SerializeToString()
                    retry = {} if failure.retry_after is None else {"Retry-After": f"{failure.retry_after:g}"}
                    self._answer(failure.http_status or 500, status, "application/x-protobuf", retry)
                    return
                self._answer(200, receiver._response().SerializeToString(), "application/x-protobuf")

            def _answer(self, status: int, body: bytes, content_type: str, more: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    for name, value in (more or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout tests)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # A short poll: close() returns at once rather than after the default half second.
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.port = self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/v1/metrics"

    def close(self) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()
