"""OpenTelemetry instruments over the published `State`: one MeterProvider for the process.

A publish builds the observations once; the callbacks only hand those lists over (no parsing, no I/O). The SDK
keeps, per reader, every attribute set ever observed, so the Prometheus path keeps no reader: each publish attaches
a fresh one (`attached`), collects once and removes it. The OTLP reader lives on, its cardinality limit sized from
`max_connectors`, so its stale sets are bounded and nothing is folded into an overflow series.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import Exemplar, ExemplarReservoir, MeterProvider, ObservableCounter, ObservableGauge
from opentelemetry.sdk.metrics.export import CardinalityLimits, MetricReader
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import Resource
from opentelemetry.util.types import Attributes

from . import __version__
from .model import MAX_CONNECTORS, REFRESH_ERROR_REASONS, SIMPLIFIED_STATES, SKIP_REASONS, Snapshot
from .status import State

ReaderFactory = Callable[[CardinalityLimits], MetricReader]

# Room above the series a collection holds (self-metrics, a few stations more than connectors...).
_SLACK: Final = 1024
# Attribute sets a long-lived reader may accumulate per connector: its three simplified states, plus its
# detailed-state series for as many raw states as it is ever seen in.
_SETS_PER_CONNECTOR: Final = 8


# Instruments: (name, counter or gauge, unit, description). Callbacks hand over the lists a publish built.
_INSTRUMENTS: Final = (
    ("chargy_connector_state", "gauge", "",
     "Simplified connector state: 1 for the current one of available|charging|unavailable, else 0"),
    ("chargy_connector_detailed_state_info", "gauge", "", "Raw upstream connector state (OCPP-like), always 1"),
    ("chargy_station_info", "gauge", "", "Station address and coordinates (WGS84), always 1"),
    ("chargy_feed_up", "gauge", "", "1 if the last feed refresh succeeded, else 0"),
    ("chargy_feed_last_success_timestamp_seconds", "gauge", "s", "Unix time of the last successful feed refresh"),
    ("chargy_feed_refresh_duration_seconds", "gauge", "s", "Duration of the last feed refresh (fetch and parse)"),
    ("chargy_feed_refresh_errors", "counter", "", "Failed feed refreshes, by reason"),
    ("chargy_feed_skipped_records", "counter", "",
     "Feed records skipped while parsing (bad device JSON, connector without state...), by reason"),
    ("chargy_stations", "gauge", "", "Stations in the served data"),
    ("chargy_devices", "gauge", "", "Devices in the served data"),
    ("chargy_connectors", "gauge", "", "Connectors in the served data"),
)  # fmt: skip
Observations = dict[str, list[Observation]]


def _coordinate(value: float | None) -> str:
    return "" if value is None else repr(value)


def observe_snapshot(snapshot: Snapshot) -> Observations:
    """The connector and station series of a snapshot: built once per snapshot."""
    connector_state: list[Observation] = []
    detailed_state: list[Observation] = []
    for row in snapshot.rows():
        connector = row.connector
        labels = {"connector": connector.name, "device": row.device.name, "station": row.station.name,
                  "speed": connector.speed}  # fmt: skip
        for simplified in SIMPLIFIED_STATES:
            value = 1 if simplified == connector.state else 0
            connector_state.append(Observation(value, {**labels, "chargy_connector_state": simplified}))
        detailed_state.append(Observation(1, {**labels, "state": connector.raw_state}))
    station_info = [
        Observation(1, {"station": station.name, "address": station.address,
                        "latitude": _coordinate(station.latitude), "longitude": _coordinate(station.longitude)})
        for station in snapshot.stations
    ]  # fmt: skip
    return {
        "chargy_connector_state": connector_state,
        "chargy_connector_detailed_state_info": detailed_state,
        "chargy_station_info": station_info,
    }


def observe_status(state: State) -> Observations:
    snapshot, status = state.snapshot, state.status

    def counts(totals: Mapping[str, int], known: Iterable[str]) -> list[Observation]:
        # Every known reason from the start at 0, so rate() and increase() work from the first error on.
        return [Observation(totals.get(reason, 0), {"reason": reason}) for reason in sorted({*known, *totals})]

    def optional(value: float | None) -> list[Observation]:
        return [] if value is None else [Observation(value)]

    return {
        "chargy_feed_up": [Observation(1 if status.up else 0)],
        "chargy_feed_last_success_timestamp_seconds": optional(status.last_success_time),
        "chargy_feed_refresh_duration_seconds": optional(status.last_refresh_duration),
        "chargy_feed_refresh_errors": counts(status.errors, REFRESH_ERROR_REASONS),
        "chargy_feed_skipped_records": counts(status.skipped, SKIP_REASONS),
        "chargy_stations": [Observation(len(snapshot.stations))],
        "chargy_devices": [Observation(snapshot.device_count)],
        "chargy_connectors": [Observation(snapshot.connector_count)],
    }


class _NoExemplars(ExemplarReservoir):
    """Observations carry no trace context, so there is nothing to sample: this spares every series the SDK's
    default reservoir, a third of what a collection costs when its reader sees each series for the first time."""

    def __init__(self, *_arguments: Any, **_options: Any) -> None:
        pass

    def offer(self, *_measurement: Any, **_options: Any) -> None:
        pass

    def collect(self, point_attributes: Attributes) -> list[Exemplar]:
        return []


def _limits(series: int) -> CardinalityLimits:
    return {ObservableGauge: series + _SLACK, ObservableCounter: series + _SLACK}


class MetricsPipeline:
    """The process' MeterProvider, its instruments, and the observations they report.

    `readers` are long-lived (OTLP push), made once; `on_published` hooks run after every publish and may
    collect through a reader of their own, attached for that collection only (the Prometheus endpoint).
    """

    def __init__(
        self,
        resource: Resource,
        *,
        readers: Sequence[ReaderFactory] = (),
        on_published: Sequence[Callable[[MetricsPipeline], None]] = (),
        instruments: Sequence[Callable[[Meter], None]] = (),
        max_connectors: int = MAX_CONNECTORS,
    ) -> None:
        self._on_published = tuple(on_published)
        self._lock = threading.RLock()
        self._current_snapshot: Snapshot | None = None
        self._snapshot_observations = observe_snapshot(Snapshot(()))
        self._observations = {**self._snapshot_observations, **observe_status(State())}
        long_lived = _limits(_SETS_PER_CONNECTOR * max_connectors)
        self._provider: MeterProvider | None = MeterProvider(
            metric_readers=[factory(long_lived) for factory in readers],
            resource=resource,
            views=[View(instrument_name="*", exemplar_reservoir_factory=lambda _aggregation: _NoExemplars)],
            shutdown_on_exit=False,
        )
        meter = self._provider.get_meter("chargy_exporter", __version__)
        for name, kind, unit, description in _INSTRUMENTS:
            create = meter.create_observable_counter if kind == "counter" else meter.create_observable_gauge
            create(name, [self._callback(name)], unit=unit, description=description)
        for register in instruments:
            register(meter)
        self.notify()  # outputs show feed_up 0 and no connector data until the first refresh

    @property
    def limits(self) -> CardinalityLimits:
        """Cardinality limits for a reader that collects the current observations once."""
        return _limits(max(len(series) for series in self._observations.values()))

    @contextmanager
    def attached(self, reader: MetricReader) -> Iterator[None]:
        """`reader` reads the provider while inside: its storage starts empty and goes with it."""
        provider = self._provider
        if provider is None:
            raise RuntimeError("the pipeline is shut down")
        provider.add_metric_reader(reader)
        try:
            yield
        finally:
            provider.remove_metric_reader(reader)  # also shuts the reader down

    def publish(self, state: State) -> None:
        """Make `state` the one every reader reports; then let the outputs (cached exposition) catch up."""
        # A failed refresh or a 304 publishes the same snapshot again: only the feed's status changed.
        if state.snapshot is not self._current_snapshot:
            self._snapshot_observations = observe_snapshot(state.snapshot)
        with self._lock:
            # One swap: a collection reads either the old or the new observations, whole.
            self._observations = {**self._snapshot_observations, **observe_status(state)}
            self._current_snapshot = state.snapshot
            self.notify()

    def notify(self) -> None:
        """Run the published hooks, also after a self-metric changed outside a refresh (an OTLP export failed).

        Never waits: it runs on the OTLP reader's export thread, which a shutdown (holding the lock) may be
        joining. While a publish holds the lock, that render or the next one shows the change.
        """
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._provider is not None:
                for hook in self._on_published:
                    hook(self)
        finally:
            self._lock.release()

    def shutdown(self, timeout_millis: float = 5_000) -> None:
        with self._lock:
            if self._provider is not None:
                self._provider.shutdown(timeout_millis=timeout_millis)
                self._provider = None

    def _callback(self, name: str) -> Callable[[CallbackOptions], list[Observation]]:
        return lambda _options: self._observations[name]
