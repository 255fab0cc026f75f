"""OTLP push: the SDK's `PeriodicExportingMetricReader` over the SDK's OTLP exporter (gRPC or HTTP/protobuf),
subclassed only to watch `export()`, so that what the exporter reads from the OTEL_* variables (the temporality
preference included) is what the reader collects with. The reader collects the self-metrics only; each export adds
the network's metrics of the pipeline's last collection, stamped with the export's time (`with_network`), as the
Prometheus endpoint serves the bodies of that collection. A failed export is counted and logged once, on one line."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

import requests
from opentelemetry.metrics import Meter, Observation
from opentelemetry.sdk.metrics.export import (
    CardinalityLimits,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)

from . import process
from .config import GRPC, OtlpSettings

if TYPE_CHECKING:
    from .metrics import MetricsPipeline

log = logging.getLogger(__name__)

# Points encode to ~150-300 bytes: 5,000 per request stay far below gRPC receivers' 4 MiB default (one export of
# 17,000 connectors is ~12 MB).
MAX_POINTS_PER_REQUEST: Final = 5_000
SDK_EXPORTER_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
)
NO_REASON: Final = "no reason given (the OTLP exporter's own messages are logged at DEBUG)"

Report = Callable[[bool, str], None]  # (succeeded, what is known about a failure)
# The network's metrics to send with each export, their points stamped with the given time: a backend drops a gauge
# point whose timestamp it has seen as a duplicate, and marks a series not updated for 5 minutes stale.
Kept = Callable[[int], list[Metric] | None]


def with_network(collected: MetricsData, network: list[Metric] | None) -> MetricsData:
    """The reader's collection (self-metrics) with the network's metrics. Both come from providers with one resource
    and one meter: the network joins the collection's one scope."""
    if network is None or not collected.resource_metrics:
        return collected
    resource, *others = collected.resource_metrics
    scope, *more = resource.scope_metrics
    merged = replace(resource, scope_metrics=[replace(scope, metrics=[*network, *scope.metrics]), *more])
    return MetricsData([merged, *others])


def _lower_to_debug(record: logging.LogRecord) -> bool:
    """The SDK exporters' records (over gRPC, the only ones to say why; one per retry) show as DEBUG, where enabled."""
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class _AnswerSession(requests.Session):
    """The HTTP exporter's session: remembers how its last request failed (the answer's status, or that none came)."""

    failure: str | None = None

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        try:
            response = super().send(request, **kwargs)
        except requests.RequestException as error:
            what = "no answer in time" if isinstance(error, requests.Timeout) else "connection failed"
            self.failure = f"{what} ({type(error).__name__})"
            raise
        ok = 200 <= response.status_code < 400
        self.failure = None if ok else f"HTTP {response.status_code} {response.reason or ''}".strip()
        return response


class _Watched(MetricExporter):
    """Mixed in before an SDK OTLP exporter class: reports what each `export()` returns or raises."""

    def __init__(self, report: Report, answers: _AnswerSession | None, kept: Kept, **options: Any) -> None:
        self._report = report
        self._answers = answers
        self._kept = kept
        super().__init__(**options)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float | None = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if self._answers is not None:
            self._answers.failure = None
        timeout = 10_000 if timeout_millis is None else timeout_millis  # the HTTP exporter's signature allows None
        try:
            # MetricExporter.export is abstract: the SDK exporter class after this one in the MRO implements it.
            result = super().export(  # type: ignore[safe-super]
                with_network(metrics_data, self._kept(time.time_ns())), timeout_millis=timeout, **kwargs
            )
        except Exception as error:  # the reader would log it with a traceback: one line instead
            message = " ".join(str(error).split())[:300]
            self._report(False, f"{type(error).__name__}: {message}" if message else type(error).__name__)
            return MetricExportResult.FAILURE
        finally:
            process.release_memory()  # an export encodes the whole network: ~100,000 short-lived objects
        if result is MetricExportResult.SUCCESS:
            self._report(True, "")
        else:
            known = self._answers.failure if self._answers is not None else None
            self._report(False, known or NO_REASON)
        return result


def make_sdk_exporter(settings: OtlpSettings, report: Report, kept: Kept) -> MetricExporter:
    """The SDK's OTLP exporter for `settings` (grpc is imported only here, for gRPC); `report` hears every outcome;
    `kept(now)` gives the network's metrics each export adds, stamped `now`."""
    for name in SDK_EXPORTER_LOGGERS:
        logging.getLogger(name).addFilter(_lower_to_debug)  # added only if not there yet
    options = dict(endpoint=settings.endpoint, timeout=settings.timeout, max_export_batch_size=MAX_POINTS_PER_REQUEST)
    if settings.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        class WatchedGrpcExporter(_Watched, GrpcExporter):
            pass

        return WatchedGrpcExporter(report, None, kept, **options)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    class WatchedHttpExporter(_Watched, HttpExporter):
        pass

    session = _AnswerSession()
    return WatchedHttpExporter(report, session, kept, session=session, **options)


class OtlpPush:
    """The OTLP output of a MetricsPipeline: a reader factory (`make_reader`), its self-metric, the failure bookkeeping.

    `attach(pipeline)`: exports send the network's points of the pipeline's last collection, and /metrics shows a new
    error count (`pipeline.notify` is called on the exporting thread, also while the pipeline shuts the reader down,
    so it must not wait for the pipeline's lock or render there)."""

    def __init__(self, settings: OtlpSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self.errors = 0  # failed exports so far
        self._last_succeeded: bool | None = None  # None until the first export
        self._notify: Callable[[], None] | None = None
        self._kept: Kept = lambda _now: None
        self._reader: MetricReader | None = None

    def attach(self, pipeline: MetricsPipeline) -> None:
        self._notify, self._kept = pipeline.notify, pipeline.network_at

    def make_reader(self, limits: CardinalityLimits) -> MetricReader:
        self._reader = PeriodicExportingMetricReader(
            make_sdk_exporter(self.settings, self._exported, lambda now: self._kept(now)),
            export_interval_millis=self.settings.export_interval * 1000,
            export_timeout_millis=self.settings.export_timeout * 1000,
            cardinality_limits=limits,
        )
        return self._reader

    def force_flush(self, timeout_millis: float = 60_000) -> bool:
        """Collect and export now, on the calling thread (tests; the reader otherwise exports every interval)."""
        return self._reader.force_flush(timeout_millis) if self._reader is not None else False

    def register_instruments(self, meter: Meter) -> None:
        meter.create_observable_counter(
            "chargy_otlp_export_errors",
            [lambda _options: [Observation(self.errors)]],
            description="Failed OTLP exports (the log line of each says what is known of why)",
        )

    def _exported(self, succeeded: bool, detail: str) -> None:
        with self._lock:
            before, self._last_succeeded = self._last_succeeded, succeeded
            if not succeeded:
                self.errors += 1
        endpoint = self.settings.shown_endpoint
        if succeeded:
            if before is not True:
                log.info("OTLP export to %s %s", endpoint, "succeeded" if before is None else "succeeded again")
            return
        log.warning("OTLP export to %s failed: %s", endpoint, detail)
        if self._notify is not None:
            self._notify()
