"""The exporter's own process: memory, CPU, file descriptors, start time. At /metrics under prometheus_client's process
collector names (`process_resident_memory_bytes`...), read afresh for every scrape (a few /proc reads, some 1 KB of
text); over OTLP as instruments named by the OpenTelemetry semantic conventions (`process.memory.usage`...). And how
the process gives memory back: glibc's allocator tuned at start, freed memory released after each refresh and export."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from prometheus_client.exposition import generate_latest as text_generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_generate_latest
from prometheus_client.process_collector import ProcessCollector


def tune_malloc(environ: Mapping[str, str]) -> None:
    """glibc's allocator (mallopt(3)), before any thread starts: one arena for all threads, and blocks of 128 KiB or
    more always mapped, so that a refresh's large buffers go back to the system (~4 MB less resident). The user's
    MALLOC_* variables win; another C library has no mallopt and keeps its ways."""
    with contextlib.suppress(OSError, AttributeError):
        mallopt = ctypes.CDLL(None).mallopt
        for parameter, value, variable in ((-8, 1, "MALLOC_ARENA_MAX"), (-3, 128 * 1024, "MALLOC_MMAP_THRESHOLD_")):
            if variable not in environ:
                mallopt(parameter, value)  # M_ARENA_MAX, M_MMAP_THRESHOLD


def release_memory() -> None:
    """After a refresh or an OTLP export, each of which frees some 100,000 short-lived objects. A full collection
    empties the interpreter's free lists, whose tuples and dicts would each keep a 1 MiB allocator arena; then
    malloc_trim(3) gives glibc's free heap pages back, which the encoders' small blocks leave scattered (measured:
    ~10 MB after 20 OTLP exports of today's network without it, nothing with it). Elsewhere than glibc: the
    collection only."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


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
