"""OTLP push: the SDK's `PeriodicExportingMetricReader` and OTLP exporter (gRPC or HTTP) on the pipeline.

Every data point arrives: the reader uses the pipeline's cardinality limits instead of the SDK's 2,000, and the
exporter splits each export into requests of at most `MAX_POINTS_PER_REQUEST` data points (one export of 17,000
connectors is ~12 MB; gRPC receivers refuse messages over 4 MiB by default).

A failed export is logged once, on one line, with its reason, and counted in `chargy_otlp_export_errors_total`.
The SDK exporters say why an export failed only in their log records, several per failure (one per retry): while
an export runs, `_FailureRecords` keeps those records of the exporting thread back and `_ReportingExporter`
turns them into that one line and one count.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.export import (
    CardinalityLimits,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)

from .otlp_settings import GRPC, OtlpSettings, grpc_target

log = logging.getLogger(__name__)

# Why an export failed: the label values of chargy_otlp_export_errors_total, all reported from the start.
UNAVAILABLE: Final = "unavailable"  # cannot connect, gRPC UNAVAILABLE, HTTP 429/502/503/504 (after retries)
TIMEOUT: Final = "timeout"  # no answer in time (OTEL_EXPORTER_OTLP_TIMEOUT)
REJECTED: Final = "rejected"  # the receiver refused the request: another gRPC or HTTP error status
INTERNAL: Final = "internal"  # the exporter failed without reaching the receiver (encoding, shut down)
EXPORT_ERROR_REASONS: Final = (INTERNAL, REJECTED, TIMEOUT, UNAVAILABLE)

# Our data points encode to ~150-300 bytes: 5,000 per request stay far below gRPC's 4 MiB default.
MAX_POINTS_PER_REQUEST: Final = 5_000
# Collecting is local work that grows with the feed (seconds for 170,000 connectors); OTEL_METRIC_EXPORT_TIMEOUT
# is meant for the receiver, and the SDK exporters bound each request with OTEL_EXPORTER_OTLP_TIMEOUT anyway.
MIN_COLLECT_TIMEOUT_SECONDS: Final = 300.0
_SDK_EXPORTER_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
)
_DETAIL_LENGTH: Final = 300


def make_sdk_exporter(settings: OtlpSettings) -> MetricExporter:
    if settings.protocol == GRPC:
        from grpc import Compression as GrpcCompression
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        target, secure = grpc_target(settings.endpoint, settings.insecure)
        return GrpcExporter(
            endpoint=target,
            insecure=not secure,
            headers=settings.headers,
            timeout=settings.timeout,
            compression=GrpcCompression.Gzip if settings.compression == "gzip" else GrpcCompression.NoCompression,
            max_export_batch_size=MAX_POINTS_PER_REQUEST,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    return HttpExporter(
        endpoint=settings.endpoint,
        certificate_file=settings.certificate,
        headers=dict(settings.headers),
        timeout=settings.timeout,
        compression=HttpCompression.Gzip if settings.compression == "gzip" else HttpCompression.NoCompression,
        max_export_batch_size=MAX_POINTS_PER_REQUEST,
    )


class _FailureRecords(logging.Filter):
    """Holds back the SDK exporters' records emitted on a thread that is inside `capture()`, for its caller."""

    def __init__(self) -> None:
        super().__init__()
        self._captured: dict[int, list[logging.LogRecord]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        captured = self._captured.get(threading.get_ident())
        if captured is None:
            return True
        captured.append(record)
        return False

    @contextmanager
    def capture(self) -> Iterator[list[logging.LogRecord]]:
        records: list[logging.LogRecord] = []
        self._captured[threading.get_ident()] = records
        try:
            yield records
        finally:
            del self._captured[threading.get_ident()]


_FAILURE_RECORDS: Final = _FailureRecords()
for _name in _SDK_EXPORTER_LOGGERS:
    logging.getLogger(_name).addFilter(_FAILURE_RECORDS)


def failure_reason(records: list[logging.LogRecord]) -> tuple[str, str]:
    """(reason, detail) of a failed export from what the SDK exporter logged during it."""
    if not records:
        return INTERNAL, "the exporter reported a failure without a reason"
    messages = [record.getMessage() for record in records]
    text = " ".join(messages)
    # The most telling record: what the receiver answered, rather than "Shutdown in progress, aborting retry."
    telling = [m for m in messages if any(word in m for word in ("error code:", "batch code:", "Transient error"))]
    detail = " ".join((telling or messages)[-1].split())[:_DETAIL_LENGTH]
    if any(marker in text for marker in ("DEADLINE_EXCEEDED", "timed out", "Timeout")):
        return TIMEOUT, detail
    if any(marker in text for marker in ("UNAVAILABLE", "Connection", "Unavailable", "Too Many Requests", "Gateway")):
        return UNAVAILABLE, detail
    if "due to timeout" in text:  # the HTTP exporter's deadline ran out with no other cause logged
        return TIMEOUT, detail
    if any(marker in text for marker in ("error code:", "batch code:")):
        return REJECTED, detail
    return INTERNAL, detail


class _ReportingExporter(MetricExporter):
    """Delegates to the SDK's OTLP exporter; reports each failed export once, with its reason."""

    def __init__(
        self, inner: MetricExporter, on_failure: Callable[[str, str], None], on_success: Callable[[], None]
    ) -> None:
        super().__init__()
        self._inner = inner
        self._on_failure = on_failure
        self._on_success = on_success

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        with _FAILURE_RECORDS.capture() as records:
            try:
                result = self._inner.export(metrics_data, timeout_millis=timeout_millis)
            except Exception as error:  # the reader thread must survive anything
                result = MetricExportResult.FAILURE
                records.append(logging.makeLogRecord({"msg": f"{type(error).__name__}: {error}"}))
        if result is MetricExportResult.SUCCESS:
            self._on_success()
        else:
            self._on_failure(*failure_reason(records))
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis)


class OtlpPush:
    """The OTLP output of a MetricsPipeline: a reader factory, its self-metric, and the failure bookkeeping.

    Wiring: `MetricsPipeline([..., push.make_reader], resource, instruments=[push.register_instruments])`,
    then `push.attach(pipeline.notify)` so that the Prometheus exposition shows a new error count.
    """

    def __init__(self, settings: OtlpSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._errors = dict.fromkeys(EXPORT_ERROR_REASONS, 0)
        self._failing = False
        self._succeeded_once = False
        self._notify: Callable[[], None] | None = None
        self._reader: MetricReader | None = None

    def attach(self, notify: Callable[[], None]) -> None:
        self._notify = notify

    @property
    def errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._errors)

    def make_reader(self, limits: CardinalityLimits) -> MetricReader:
        exporter = _ReportingExporter(make_sdk_exporter(self.settings), self._failed, self._succeeded)
        self._reader = PeriodicExportingMetricReader(
            exporter,
            export_interval_millis=self.settings.export_interval * 1000,
            export_timeout_millis=max(self.settings.export_timeout, MIN_COLLECT_TIMEOUT_SECONDS) * 1000,
            cardinality_limits=limits,
        )
        return self._reader

    def force_flush(self, timeout_millis: float = 60_000) -> bool:
        """Collect and export now (tests; the reader otherwise exports every interval)."""
        reader = self._reader
        return reader.force_flush(timeout_millis) if reader is not None else False

    def register_instruments(self, meter: Meter) -> None:
        def observe(_options: CallbackOptions) -> list[Observation]:
            return [Observation(count, {"reason": reason}) for reason, count in sorted(self.errors.items())]

        meter.create_observable_counter(
            "chargy_otlp_export_errors",
            [observe],
            description="Failed OTLP exports, by reason (unavailable, timeout, rejected, internal)",
        )

    def _failed(self, reason: str, detail: str) -> None:
        with self._lock:
            self._errors[reason] = self._errors.get(reason, 0) + 1
            self._failing = True
        log.warning("OTLP export to %s failed (%s): %s", self.settings.shown_endpoint, reason, detail)
        notify = self._notify
        if notify is not None:
            # Not on this thread: the pipeline may be holding its lock while it shuts this reader down.
            threading.Thread(target=notify, name="otlp-notify", daemon=True).start()

    def _succeeded(self) -> None:
        with self._lock:
            first, recovered = not self._succeeded_once, self._failing
            self._succeeded_once, self._failing = True, False
        if first or recovered:
            log.info(
                "OTLP export to %s %s", self.settings.shown_endpoint, "succeeded again" if recovered else "succeeded"
            )
