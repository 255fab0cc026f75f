"""OTLP push: the SDK's `PeriodicExportingMetricReader` over the SDK's OTLP exporter (gRPC or HTTP/protobuf).

Every data point arrives: the reader uses the pipeline's cardinality limits instead of the SDK's 2,000, and the
exporter splits each export into requests of at most `MAX_POINTS_PER_REQUEST` data points (one export of 17,000
connectors is ~12 MB; gRPC receivers refuse messages over 4 MiB by default).

The reader is given the SDK exporter itself (a subclass that only watches `export()`), so whatever the exporter
decides from the standard variables, `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE` included, is what the
reader collects with.

A failed export is what `export()` returns (`MetricExportResult.FAILURE`) or raises: it is counted in
`chargy_otlp_export_errors_total` and logged once, on one WARNING line, with what is known publicly. The HTTP
exporter sends through a `requests.Session` of ours, which sees the receiver's answer (or that none came); the
gRPC exporter tells why only in its own log records. Those records (one per retry, plus the final status) are
lowered to DEBUG: `--log-level debug` shows them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Final

import requests
from opentelemetry.metrics import Meter, Observation
from opentelemetry.sdk.metrics.export import (
    CardinalityLimits,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)

from .config import GRPC, OtlpSettings

log = logging.getLogger(__name__)

# Our data points encode to ~150-300 bytes: 5,000 per request stay far below gRPC's 4 MiB default.
MAX_POINTS_PER_REQUEST: Final = 5_000
SDK_EXPORTER_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
)
_DETAIL_LENGTH: Final = 300
NO_REASON: Final = "no reason given (the OTLP exporter's own messages are logged at DEBUG)"

# (succeeded, what is known about a failure)
Report = Callable[[bool, str], None]


class _LowerToDebug(logging.Filter):
    """Shows the SDK exporters' records as DEBUG records, and only where DEBUG is enabled: our one line per
    failed export says it at WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return True


_LOWER_TO_DEBUG: Final = _LowerToDebug()


class _AnswerSession(requests.Session):
    """The HTTP exporter's session: remembers how its last request failed (the answer's status line, or that no
    answer came), until a request succeeds. The exporter calls it from one export at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: str | None = None

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        try:
            response = super().send(request, **kwargs)
        except requests.Timeout as error:
            self.failure = f"no answer in time ({type(error).__name__})"
            raise
        except requests.ConnectionError as error:
            self.failure = f"connection failed ({type(error).__name__})"
            raise
        except requests.RequestException as error:
            self.failure = type(error).__name__
            raise
        ok = 200 <= response.status_code < 400
        self.failure = None if ok else f"HTTP {response.status_code} {response.reason or ''}".strip()
        return response


class _Watched(MetricExporter):
    """Mixed in before an SDK OTLP exporter class: reports what each `export()` returns or raises."""

    def __init__(self, report: Report, answers: _AnswerSession | None, **options: Any) -> None:
        self._report = report
        self._answers = answers
        super().__init__(**options)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float | None = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if self._answers is not None:
            self._answers.failure = None
        timeout = 10_000 if timeout_millis is None else timeout_millis
        try:
            # MetricExporter.export is abstract: the SDK exporter class after this one in the MRO implements it.
            result = super().export(metrics_data, timeout_millis=timeout, **kwargs)  # type: ignore[safe-super]
        except Exception as error:  # the reader would log it with a traceback: one line instead
            message = " ".join(str(error).split())[:_DETAIL_LENGTH]
            self._report(False, f"{type(error).__name__}: {message}" if message else type(error).__name__)
            return MetricExportResult.FAILURE
        if result is MetricExportResult.SUCCESS:
            self._report(True, "")
        else:
            known = self._answers.failure if self._answers is not None else None
            self._report(False, known or NO_REASON)
        return result


def make_sdk_exporter(settings: OtlpSettings, report: Report) -> MetricExporter:
    """The SDK's OTLP exporter for `settings`; `report` hears the outcome of every export. grpc is imported only
    here, for the gRPC protocol. What is not given here (the endpoint unless --otlp-endpoint, headers,
    compression, TLS, temporality) the exporter reads from its OTEL_EXPORTER_OTLP_* variables itself."""
    for name in SDK_EXPORTER_LOGGERS:
        logging.getLogger(name).addFilter(_LOWER_TO_DEBUG)  # once: a filter is added only if not there yet
    if settings.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        class WatchedGrpcExporter(_Watched, GrpcExporter):
            pass

        return WatchedGrpcExporter(
            report,
            None,
            endpoint=settings.endpoint,
            timeout=settings.timeout,
            max_export_batch_size=MAX_POINTS_PER_REQUEST,
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    class WatchedHttpExporter(_Watched, HttpExporter):
        pass

    session = _AnswerSession()
    return WatchedHttpExporter(
        report,
        session,
        endpoint=settings.endpoint,
        timeout=settings.timeout,
        session=session,
        max_export_batch_size=MAX_POINTS_PER_REQUEST,
    )


class OtlpPush:
    """The OTLP output of a MetricsPipeline: a reader factory, its self-metric, and the failure bookkeeping.

    Wiring: `MetricsPipeline(resource, readers=[push.make_reader], instruments=[push.register_instruments])`,
    then `push.attach(pipeline.notify)` so that the Prometheus exposition shows a new error count. `notify` is
    called on the exporting thread, also while the pipeline shuts the reader down: it must not wait for the
    pipeline's lock or render there.
    """

    def __init__(self, settings: OtlpSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._errors = 0
        self._failing = False
        self._succeeded_once = False
        self._notify: Callable[[], None] | None = None
        self._reader: MetricReader | None = None

    def attach(self, notify: Callable[[], None]) -> None:
        self._notify = notify

    @property
    def errors(self) -> int:
        """Failed exports so far, over every reader this push made."""
        with self._lock:
            return self._errors

    def make_reader(self, limits: CardinalityLimits) -> MetricReader:
        # OTEL_METRIC_EXPORT_TIMEOUT bounds the collection (the SDK raises MetricsTimeoutError past it) and is
        # handed to the exporter, which bounds each request with OTEL_EXPORTER_OTLP_TIMEOUT.
        self._reader = PeriodicExportingMetricReader(
            make_sdk_exporter(self.settings, self._exported),
            export_interval_millis=self.settings.export_interval * 1000,
            export_timeout_millis=self.settings.export_timeout * 1000,
            cardinality_limits=limits,
        )
        return self._reader

    def force_flush(self, timeout_millis: float = 60_000) -> bool:
        """Collect and export now, on the calling thread (tests; the reader otherwise exports every interval)."""
        reader = self._reader
        return reader.force_flush(timeout_millis) if reader is not None else False

    def register_instruments(self, meter: Meter) -> None:
        meter.create_observable_counter(
            "chargy_otlp_export_errors",
            [lambda _options: [Observation(self.errors)]],
            description="Failed OTLP exports (the log line of each says what is known of why)",
        )

    def _exported(self, succeeded: bool, detail: str) -> None:
        if succeeded:
            with self._lock:
                first, recovered = not self._succeeded_once, self._failing
                self._succeeded_once, self._failing = True, False
            if first or recovered:
                log.info(
                    "OTLP export to %s %s",
                    self.settings.shown_endpoint,
                    "succeeded again" if recovered else "succeeded",
                )
            return
        with self._lock:
            self._errors += 1
            self._failing = True
        log.warning("OTLP export to %s failed: %s", self.settings.shown_endpoint, detail)
        notify = self._notify
        if notify is not None:
            notify()
