"""The exporter's own process: memory, CPU, file descriptors, start time. At /metrics under prometheus_client's process
collector names (`process_resident_memory_bytes`...), read afresh for every scrape (a few /proc reads, some 1 KB of
text); over OTLP as instruments named by the OpenTelemetry semantic conventions (`process.memory.usage`...)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Final

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from prometheus_client.exposition import generate_latest as text_generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_generate_latest
from prometheus_client.process_collector import ProcessCollector

# Not registered anywhere: read on demand. Reads /proc/self; elsewhere (macOS) it yields nothing, and so do we.
COLLECTOR: Final = ProcessCollector(registry=None)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def exposition(openmetrics: bool) -> bytes:
    """The process families now, as text 0.0.4 or as OpenMetrics (then ending with `# EOF`, the body's last line)."""
    # As a value: prometheus_client's OpenMetrics encoder has no type hints.
    encode: Callable[[_Families], bytes] = openmetrics_generate_latest if openmetrics else text_generate_latest
    return encode(_Families(list(COLLECTOR.collect())))


def _facts() -> dict[str, float]:
    """The collector's samples by name: one source for both outputs."""
    return {sample.name: sample.value for family in COLLECTOR.collect() for sample in family.samples}


def register_instruments(meter: Meter) -> None:
    """The same facts as observable instruments under the semantic conventions' names (system/process-metrics,
    semconv 1.3x; opentelemetry-semantic-conventions' constants are checked against these by tests/test_process.py).
    The start time is `process.uptime`, the conventions' metric for it."""

    def gauge(name: str) -> Iterable[Observation]:
        value = _facts().get(name)
        return [] if value is None else [Observation(value)]

    def cpu(_: CallbackOptions) -> Iterable[Observation]:
        times = os.times()  # the collector sums user and system; the conventions want them apart (cpu.mode)
        return [Observation(times.user, {"cpu.mode": "user"}), Observation(times.system, {"cpu.mode": "system"})]

    def uptime(_: CallbackOptions) -> Iterable[Observation]:
        started = _facts().get("process_start_time_seconds")
        return [] if started is None else [Observation(max(0.0, time.time() - started))]

    meter.create_observable_up_down_counter(
        "process.memory.usage", [lambda _: gauge("process_resident_memory_bytes")], "By",
        "The amount of physical memory in use.",
    )  # fmt: skip
    meter.create_observable_up_down_counter(
        "process.memory.virtual", [lambda _: gauge("process_virtual_memory_bytes")], "By",
        "The amount of committed virtual memory.",
    )  # fmt: skip
    meter.create_observable_counter("process.cpu.time", [cpu], "s", "Total CPU seconds broken down by mode.")
    meter.create_observable_up_down_counter(
        "process.unix.file_descriptor.count", [lambda _: gauge("process_open_fds")], "{file_descriptor}",
        "Number of unix file descriptors in use by the process.",
    )  # fmt: skip
    meter.create_observable_gauge("process.uptime", [uptime], "s", "The time the process has been running.")
