"""OpenTelemetry instruments over the published `State`.

`MetricsPipeline.publish` turns a state into ready-made observations once per refresh; the observable gauges'
callbacks only hand those lists to the SDK, so a collection does no parsing and no I/O.

The SDK keeps every attribute set an asynchronous instrument has ever observed, and counts the stale ones
against the cardinality limit. With connectors appearing, disappearing and changing state for months that would
grow memory without bound and end in a silent `otel_metric_overflow` series. So the pipeline tracks the attribute
sets it has handed out and, before stale ones can outnumber live ones, replaces the MeterProvider (and its
readers) with a fresh one sized for the current feed: memory stays proportional to the feed, and the
cardinality limit is always above what a collection can hold.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider, ObservableCounter, ObservableGauge
from opentelemetry.sdk.metrics.export import CardinalityLimits, MetricReader
from opentelemetry.sdk.resources import Resource

from . import __version__
from .feed import FEED_ERROR_REASONS
from .kml import KML_ERROR_REASONS, SKIP_REASONS
from .model import EMPTY_SNAPSHOT, SIMPLIFIED_STATES, Snapshot
from .status import State

log = logging.getLogger(__name__)

ReaderFactory = Callable[[CardinalityLimits], MetricReader]
REFRESH_ERROR_REASONS: Final = (*FEED_ERROR_REASONS, *KML_ERROR_REASONS, "internal")

# Attribute sets a provider may accumulate before it is replaced: twice the live ones, plus room for small feeds.
_SLACK: Final = 1024


@dataclass(frozen=True)
class _SnapshotObservations:
    """What the connector and station instruments report for one snapshot, built once per snapshot."""

    connector_state: list[Observation]
    detailed_state: list[Observation]
    station_info: list[Observation]
    # Identity of each attribute set above, for the stale-set bookkeeping.
    keys: frozenset[tuple[str, ...]]


@dataclass(frozen=True)
class _Observations:
    """Everything the callbacks return for one published state."""

    snapshot: _SnapshotObservations
    feed: dict[str, list[Observation]]


def _coordinate(value: float | None) -> str:
    return "" if value is None else repr(value)


def observe_snapshot(snapshot: Snapshot) -> _SnapshotObservations:
    connector_state: list[Observation] = []
    detailed_state: list[Observation] = []
    keys: set[tuple[str, ...]] = set()
    for row in snapshot.rows():
        connector = row.connector
        labels = {
            "connector": connector.name,
            "device": row.device.name,
            "station": row.station.name,
            "speed": connector.speed,
        }
        current = connector.state
        for simplified in SIMPLIFIED_STATES:
            connector_state.append(
                Observation(1 if simplified == current else 0, {**labels, "chargy_connector_state": simplified})
            )
        detailed_state.append(Observation(1, {**labels, "state": connector.raw_state}))
        keys.add((connector.name, row.device.name, row.station.name, connector.speed, connector.raw_state))

    station_info = []
    for station in snapshot.stations:
        latitude, longitude = _coordinate(station.latitude), _coordinate(station.longitude)
        station_info.append(
            Observation(
                1, {"station": station.name, "address": station.address, "latitude": latitude, "longitude": longitude}
            )
        )
        keys.add(("station", station.name, station.address, latitude, longitude))
    return _SnapshotObservations(connector_state, detailed_state, station_info, frozenset(keys))


def observe_status(state: State) -> dict[str, list[Observation]]:
    snapshot, status = state.snapshot, state.status

    def counts(totals: dict[str, int], known: Iterable[str]) -> list[Observation]:
        # Every known reason from the start at 0, so rate() and increase() work from the first error on.
        return [Observation(totals.get(reason, 0), {"reason": reason}) for reason in sorted({*known, *totals})]

    return {
        "up": [Observation(1 if status.up else 0)],
        "last_success": [] if status.last_success_time is None else [Observation(status.last_success_time)],
        "duration": [] if status.last_refresh_duration is None else [Observation(status.last_refresh_duration)],
        "errors": counts(dict(status.errors), REFRESH_ERROR_REASONS),
        "skipped": counts(dict(status.skipped), SKIP_REASONS),
        "stations": [Observation(len(snapshot.stations))],
        "devices": [Observation(snapshot.device_count)],
        "connectors": [Observation(snapshot.connector_count)],
    }


class _Generation:
    """What the instruments of one MeterProvider report. A replaced provider's generation reports nothing more:
    its readers may still collect once while shutting down (the OTLP reader's last export), and the current
    observations could exceed the cardinality limits that provider was built with."""

    def __init__(self, observations: _Observations) -> None:
        self.observations = observations

    def retire(self) -> None:
        self.observations = _Observations(observe_snapshot(EMPTY_SNAPSHOT), {key: [] for key in self.observations.feed})


class MetricsPipeline:
    """Owns the MeterProvider, its instruments and readers, and the observations they report."""

    def __init__(
        self,
        reader_factories: Sequence[ReaderFactory],
        resource: Resource,
        on_published: Sequence[Callable[[], None]] = (),
        instruments: Sequence[Callable[[Meter], None]] = (),
    ) -> None:
        self._reader_factories = tuple(reader_factories)
        # More instruments (e.g. the OTLP exporter's error counter), registered on every provider built.
        self._more_instruments = tuple(instruments)
        self._resource = resource
        self._on_published = list(on_published)
        self._lock = threading.RLock()
        self._current_snapshot = EMPTY_SNAPSHOT
        self._seen: set[tuple[str, ...]] = set()
        self._capacity = 0
        self._provider: MeterProvider | None = None
        self._generation: _Generation | None = None
        self._rebuilds = -1
        self._rebuild(_Observations(observe_snapshot(EMPTY_SNAPSHOT), observe_status(State())))
        self.notify()  # outputs show feed_up 0 and no connector data until the first refresh

    @property
    def capacity(self) -> int:
        """How many distinct attribute sets the current provider may see before it is replaced."""
        return self._capacity

    @property
    def rebuilds(self) -> int:
        return self._rebuilds

    def publish(self, state: State) -> None:
        """Make `state` the one every reader reports; then let the outputs (cached exposition) catch up."""
        # A failed refresh or a 304 publishes the same snapshot again: only the feed's status changed.
        # Only the refresh thread publishes: the generation read here is still current under the lock below.
        generation = self._generation
        assert generation is not None
        same = state.snapshot is self._current_snapshot
        observations = _Observations(
            generation.observations.snapshot if same else observe_snapshot(state.snapshot), observe_status(state)
        )
        with self._lock:
            keys = observations.snapshot.keys
            seen = self._seen | keys
            if len(seen) > self._capacity:
                self._rebuild(observations)
                seen = set(keys)
            else:
                generation.observations = observations
            self._seen = seen
            self._current_snapshot = state.snapshot
            self.notify()

    def notify(self) -> None:
        """Run the published hooks after a self-metric changed outside a refresh (an OTLP export failed).

        Never waits: it runs on the OTLP reader's export thread, which a shutdown (holding the lock) may be
        joining; and while a publish holds the lock, that publish renders what changed anyway.
        """
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._provider is not None:
                for hook in self._on_published:
                    hook()
        finally:
            self._lock.release()

    def shutdown(self, timeout_millis: float = 5_000) -> None:
        with self._lock:
            if self._provider is not None:
                self._provider.shutdown(timeout_millis=timeout_millis)
                self._provider = None

    # ---- provider lifecycle ------------------------------------------------------------------------------------

    def _rebuild(self, observations: _Observations) -> None:
        """A new provider, sized for `observations`, reports them from now on."""
        old, old_generation = self._provider, self._generation
        self._capacity = 2 * len(observations.snapshot.keys) + _SLACK
        # chargy_connector_state holds three points per attribute-set key: the limit stays above any collection.
        limit = 3 * self._capacity + _SLACK
        limits: CardinalityLimits = {ObservableGauge: limit, ObservableCounter: limit}
        provider = MeterProvider(
            metric_readers=[factory(limits) for factory in self._reader_factories],
            resource=self._resource,
            shutdown_on_exit=False,
        )
        self._generation = _Generation(observations)
        self._register_instruments(provider, self._generation)
        self._provider = provider
        self._rebuilds += 1
        if old is not None and old_generation is not None:
            old_generation.retire()
            log.debug("replaced the meter provider to drop stale series (capacity now %d)", self._capacity)
            # In the background: an OTLP reader's last export must not hold up the refresh that asked for this.
            threading.Thread(
                target=old.shutdown, kwargs={"timeout_millis": 5_000}, name="old-provider-shutdown", daemon=True
            ).start()

    def _register_instruments(self, provider: MeterProvider, generation: _Generation) -> None:
        meter = provider.get_meter("chargy_exporter", __version__)

        def current(
            select: Callable[[_Observations], list[Observation]],
        ) -> Callable[[CallbackOptions], list[Observation]]:
            return lambda _options: select(generation.observations)

        def feed(key: str) -> Callable[[CallbackOptions], list[Observation]]:
            return current(lambda observations: observations.feed[key])

        meter.create_observable_gauge(
            "chargy_connector_state",
            [current(lambda observations: observations.snapshot.connector_state)],
            description="Simplified connector state: 1 for the current one of available|charging|unavailable, else 0",
        )
        meter.create_observable_gauge(
            "chargy_connector_detailed_state_info",
            [current(lambda observations: observations.snapshot.detailed_state)],
            description="Raw upstream connector state (OCPP-like), always 1",
        )
        meter.create_observable_gauge(
            "chargy_station_info",
            [current(lambda observations: observations.snapshot.station_info)],
            description="Station address and coordinates (WGS84), always 1",
        )
        meter.create_observable_gauge(
            "chargy_feed_up", [feed("up")], description="1 if the last feed refresh succeeded, else 0"
        )
        meter.create_observable_gauge(
            "chargy_feed_last_success_timestamp_seconds",
            [feed("last_success")],
            unit="s",
            description="Unix time of the last successful feed refresh",
        )
        meter.create_observable_gauge(
            "chargy_feed_refresh_duration_seconds",
            [feed("duration")],
            unit="s",
            description="Duration of the last feed refresh (fetch and parse)",
        )
        meter.create_observable_counter(
            "chargy_feed_refresh_errors",
            [feed("errors")],
            description="Failed feed refreshes, by reason",
        )
        meter.create_observable_counter(
            "chargy_feed_skipped_records",
            [feed("skipped")],
            description="Feed records skipped while parsing (bad device JSON, connector without state...), by reason",
        )
        meter.create_observable_gauge("chargy_stations", [feed("stations")], description="Stations in the served data")
        meter.create_observable_gauge("chargy_devices", [feed("devices")], description="Devices in the served data")
        meter.create_observable_gauge(
            "chargy_connectors", [feed("connectors")], description="Connectors in the served data"
        )
        for register in self._more_instruments:
            register(meter)
