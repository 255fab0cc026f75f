"""OpenTelemetry instruments over the published `State`: callbacks turn it into observations as a collection reads
them (no I/O, nothing kept). The SDK keeps, per reader, every attribute set an asynchronous instrument ever reported,
so the network's instruments are read only by readers made for one collection (`attached`), once per publish: the
Prometheus bodies and the network OTLP push sends at every export (`network_at`) come from it. The long-lived OTLP
reader reads the self-metrics only (a few series), keeping their delta/cumulative bookkeeping the SDK's own."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Final, TypeVar

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    Exemplar,
    ExemplarReservoir,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
)
from opentelemetry.sdk.metrics.export import (
    CardinalityLimits,
    Gauge,
    Metric,
    MetricReader,
    MetricsData,
    NumberDataPoint,
)
from opentelemetry.sdk.metrics.view import LastValueAggregation, SumAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.util.types import Attributes, AttributeValue

from . import __version__
from .model import REFRESH_ERROR_REASONS, SIMPLIFIED_STATES, SKIP_REASONS, Connector, Snapshot, State

ReaderFactory = Callable[[CardinalityLimits], MetricReader]
Observe = Callable[[State], Iterable[Observation]]
Register = Callable[[Meter], None]
R = TypeVar("R", bound=MetricReader)
# A network metric's points kept for the exports: by their label names, each point as (label values, value), all a
# gauge point has (the network's instruments are gauges). For today's network 1.4 MB, against 3.1 MB as SDK points.
Points = dict[tuple[str, ...], list[tuple[tuple[AttributeValue, ...], float]]]

# Room above the series a collection holds (self-metrics, a few stations more than connectors...).
_SLACK: Final = 1024
# A collection reads memory only; the SDK's default guard of 10 s is less than 170,000 connectors take.
COLLECTION_TIMEOUT_MS: Final = 300_000


def _labelled(snapshot: Snapshot) -> Iterator[tuple[dict[str, str], Connector]]:
    for row in snapshot.rows():
        connector = row.connector
        labels = {"connector": connector.name, "device": row.device.name, "station": row.station.name,
                  "speed": connector.speed}  # fmt: skip
        yield labels, connector


def _connector_states(snapshot: Snapshot) -> Iterator[Observation]:
    for labels, connector in _labelled(snapshot):
        state = connector.state
        for simplified in SIMPLIFIED_STATES:
            yield Observation(1 if simplified == state else 0, {**labels, "chargy_connector_state": simplified})


def _detailed_states(snapshot: Snapshot) -> Iterator[Observation]:
    return (Observation(1, {**labels, "state": connector.raw_state}) for labels, connector in _labelled(snapshot))


def _station_infos(snapshot: Snapshot) -> Iterator[Observation]:
    for station in snapshot.stations:
        latitude, longitude = ("" if value is None else repr(value) for value in (station.latitude, station.longitude))
        labels = {"station": station.name, "address": station.address, "latitude": latitude, "longitude": longitude}
        yield Observation(1, labels)


def _counts(totals: Mapping[str, int], known: Iterable[str]) -> list[Observation]:
    # Every known reason from the start at 0, so rate() and increase() work from the first error on.
    return [Observation(totals.get(reason, 0), {"reason": reason}) for reason in sorted({*known, *totals})]


def _optional(value: float | None) -> list[Observation]:
    return [] if value is None else [Observation(value)]


# Instruments: (name, counter or gauge, unit, description, what it observes of the published state). The network's
# series come and go with the feed; the self-metrics' are a few, always the same.
Instrument = tuple[str, str, str, str, Observe]
_NETWORK: Final[tuple[Instrument, ...]] = (
    ("chargy_connector_state", "gauge", "",
     "Simplified connector state: 1 for the current one of available|charging|unavailable, else 0",
     lambda state: _connector_states(state.snapshot)),
    ("chargy_connector_detailed_state_info", "gauge", "", "Raw upstream connector state (OCPP-like), always 1",
     lambda state: _detailed_states(state.snapshot)),
    ("chargy_station_info", "gauge", "", "Station address and coordinates (WGS84), always 1",
     lambda state: _station_infos(state.snapshot)),
    ("chargy_stations", "gauge", "", "Stations in the served data",
     lambda state: [Observation(len(state.snapshot.stations))]),
    ("chargy_devices", "gauge", "", "Devices in the served data",
     lambda state: [Observation(state.snapshot.device_count)]),
    ("chargy_connectors", "gauge", "", "Connectors in the served data",
     lambda state: [Observation(state.snapshot.connector_count)]),
)  # fmt: skip
_SELF: Final[tuple[Instrument, ...]] = (
    ("chargy_feed_up", "gauge", "", "1 if the last feed refresh succeeded, else 0",
     lambda state: [Observation(1 if state.status.up else 0)]),
    ("chargy_feed_last_success_timestamp_seconds", "gauge", "s", "Unix time of the last successful feed refresh",
     lambda state: _optional(state.status.last_success_time)),
    ("chargy_feed_refresh_duration_seconds", "gauge", "s", "Duration of the last feed refresh (fetch and parse)",
     lambda state: _optional(state.status.last_refresh_duration)),
    ("chargy_feed_refresh_errors", "counter", "", "Failed feed refreshes, by reason",
     lambda state: _counts(state.status.errors, REFRESH_ERROR_REASONS)),
    ("chargy_feed_skipped_records", "counter", "",
     "Feed records skipped while parsing (bad device JSON, connector without state...), by reason",
     lambda state: _counts(state.status.skipped, SKIP_REASONS)),
)  # fmt: skip


class _NoExemplars(ExemplarReservoir):
    """Observations carry no trace context, so there is nothing to sample: this spares every series the SDK's
    default reservoir, a third of what a collection costs when its reader sees each series for the first time."""

    def __init__(self, *_arguments: Any, **_options: Any) -> None:
        pass

    def offer(self, *_measurement: Any, **_options: Any) -> None:
        pass

    def collect(self, point_attributes: Attributes) -> list[Exemplar]:
        return []


class _StampedPoints(Sequence[NumberDataPoint]):
    """A kept metric's points as an export reads them: each made, stamped `now`, when read. An export then holds the
    request it encodes, never the whole network as SDK points (~28 MB at 10 times today's network)."""

    def __init__(self, points: Points, now: int) -> None:
        self._points, self._now = points, now

    def __len__(self) -> int:
        return sum(len(group) for group in self._points.values())

    def __iter__(self) -> Iterator[NumberDataPoint]:
        for names, group in self._points.items():
            for values, value in group:
                yield NumberDataPoint(dict(zip(names, values, strict=True)), 0, self._now, value)

    def __getitem__(self, index: Any) -> Any:  # the SDK's exporters only iterate and count
        return list(self)[index]


def _kept(collected: MetricsData) -> list[tuple[Metric, Points]]:
    kept: list[tuple[Metric, Points]] = []
    for metric in (m for rm in collected.resource_metrics for sm in rm.scope_metrics for m in sm.metrics):
        points: Points = {}
        for point in metric.data.data_points:
            labels = point.attributes or {}
            points.setdefault(tuple(labels), []).append((tuple(labels.values()), point.value))  # type: ignore[union-attr]
        kept.append((replace(metric, data=Gauge([])), points))
    return kept


def _limits(series: int) -> CardinalityLimits:
    return {ObservableGauge: series + _SLACK, ObservableCounter: series + _SLACK}


class MetricsPipeline:
    """The instruments and the state they report, on three MeterProviders with one resource: the network's, read only
    by readers attached for one collection; the self-metrics', read by the Prometheus endpoint the same way; and, when
    there are long-lived `readers` (OTLP push), the self-metrics again with `reader_instruments` (the process' own
    metrics, which /metrics takes from prometheus_client), read by those readers. `on_published` hooks run after every
    publish and may collect through `attached` (the Prometheus endpoint)."""

    def __init__(
        self,
        resource: Resource,
        *,
        readers: Sequence[ReaderFactory] = (),
        on_published: Sequence[Callable[[MetricsPipeline], None]] = (),
        instruments: Sequence[Register] = (),
        reader_instruments: Sequence[Register] = (),
    ) -> None:
        self._on_published = tuple(on_published)
        # Held by a publish and its renders, and by a collection through `attached`: neither sees a publish midway.
        self._lock = threading.RLock()
        self._state = State()
        # The network of the last collection, for `readers`.
        self._network_data: list[tuple[Metric, Points]] | None = None
        self._kept_since_publish = False
        self._network = self._provider(resource, _NETWORK, ())
        self._self = self._provider(resource, _SELF, instruments)
        self._pushed: MeterProvider | None = None
        self._closed = False
        if readers:
            self._pushed = self._provider(resource, _SELF, [*instruments, *reader_instruments])
            for factory in readers:
                self._pushed.add_metric_reader(factory(_limits(0)))
        self.publish(self._state)  # outputs show feed_up 0 and no connector data until the first refresh

    def _provider(self, resource: Resource, made: Iterable[Instrument], more: Iterable[Register]) -> MeterProvider:
        provider = MeterProvider(
            resource=resource,
            # The aggregation named, not the default one: the SDK then skips a type dispatch per series and collection.
            views=[
                View(instrument_type=kind, aggregation=aggregation, exemplar_reservoir_factory=lambda _: _NoExemplars)
                for kind, aggregation in (
                    (ObservableGauge, LastValueAggregation()),
                    (ObservableCounter, SumAggregation()),
                )
            ],
            exemplar_filter=AlwaysOffExemplarFilter(),  # no observation carries a trace: nothing to look up
            shutdown_on_exit=False,
        )
        meter = provider.get_meter("chargy_exporter", __version__)
        for name, kind, unit, description, observe in made:
            create = meter.create_observable_counter if kind == "counter" else meter.create_observable_gauge
            create(name, [self._callback(observe)], unit=unit, description=description)
        for register in more:
            register(meter)
        return provider

    @contextmanager
    def attached(self, make_reader: Callable[[CardinalityLimits, bool], R]) -> Iterator[tuple[R, R]]:
        """Two readers for one collection, reading the network's provider and the self-metrics' while inside:
        `make_reader(limits, True)` for the network, sized for the published state, `make_reader(limits, False)` for
        the self-metrics. Their storage starts empty and goes with them; no publish happens inside."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the pipeline is shut down")
            snapshot = self._state.snapshot
            # The largest instrument: three series per connector, or one per station.
            network = make_reader(_limits(max(3 * snapshot.connector_count, len(snapshot.stations))), True)
            status = make_reader(_limits(0), False)
            self._network.add_metric_reader(network)
            self._self.add_metric_reader(status)
            try:
                yield network, status
            finally:
                self._network.remove_metric_reader(network)  # also shuts the reader down
                self._self.remove_metric_reader(status)

    def keep_network(self, collected: MetricsData | None) -> None:
        """What a collection through `attached` gave of the network: the long-lived readers' exports send it until
        the next publish (nothing is kept without them)."""
        if self._pushed is not None and collected is not None:
            self._network_data, self._kept_since_publish = _kept(collected), True

    def network_at(self, now: int) -> list[Metric] | None:
        """The network's metrics of the published state, every point stamped `now` (None: no long-lived reader, or
        not collected yet)."""
        kept = self._network_data
        if kept is None:
            return None
        return [replace(metric, data=Gauge(_StampedPoints(points, now))) for metric, points in kept]

    def publish(self, state: State) -> None:
        """Make `state` the one every reader reports; then let the outputs (cached exposition) catch up, and collect
        the network for the long-lived readers if no output did."""
        with self._lock:
            self._state, self._kept_since_publish = state, False
            self.notify()
            # Until the new data is kept, an export sends the previous network: never one without it.
            if self._pushed is not None and not self._kept_since_publish:
                with self.attached(lambda limits, _network: _Collection(limits)) as (network, _):
                    network.collect(timeout_millis=COLLECTION_TIMEOUT_MS)
                    self.keep_network(network.collected)

    def notify(self) -> None:
        """Run the published hooks, also after a self-metric changed outside a refresh (an OTLP export failed). Never
        waits: it runs on the OTLP export thread, which a shutdown holding the lock may be joining; the render under way
        or the next one shows the change."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if not self._closed:
                for hook in self._on_published:
                    hook(self)
        finally:
            self._lock.release()

    def shutdown(self, timeout_millis: float = 5_000) -> None:
        with self._lock:
            for provider in (self._pushed, self._self, self._network):
                if provider is not None:  # the long-lived readers first: their last export still has the network
                    provider.shutdown(timeout_millis=timeout_millis)
            self._closed = True

    def _callback(self, observe: Observe) -> Callable[[CallbackOptions], Iterable[Observation]]:
        # Reads the state once: a collection on another thread (OTLP) sees one snapshot per instrument.
        return lambda _options: observe(self._state)


class _Collection(MetricReader):
    """A reader for one collection, keeping it. MetricReader hands every reader its collection through
    `_receive_metrics`; the SDK's InMemoryMetricReader does the same but collects with the default timeout."""

    collected: MetricsData | None = None

    def __init__(self, limits: CardinalityLimits) -> None:
        super().__init__(cardinality_limits=limits)

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        self.collected = metrics_data

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass
