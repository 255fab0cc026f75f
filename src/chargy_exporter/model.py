"""The station → device → connector model of one feed, its vocabulary (states, error and skip reasons), and the
`State` a refresh publishes: the snapshot served plus the feed's health. A `Snapshot` is immutable: each refresh swaps
in a new one whole, so a reader sees the old feed or the new, never a mix."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Final

AVAILABLE: Final = "available"
CHARGING: Final = "charging"
UNAVAILABLE: Final = "unavailable"

# The order of the three series a connector exports.
SIMPLIFIED_STATES: Final = (AVAILABLE, CHARGING, UNAVAILABLE)
# Connectors a feed may have before it is refused (--max-connectors' default): about 12 times today's network.
MAX_CONNECTORS: Final = 20_000

# Labels of chargy_feed_refresh_errors_total: why a fetch (feed.py) or a parse (kml.py) failed, or neither.
FEED_ERROR_REASONS: Final = (
    "timeout", "connection", "http_5xx", "http_status", "unauthorized", "http_redirect", "broken_response",
    "too_large", "file",
)  # fmt: skip
KML_ERROR_REASONS: Final = ("not_kml", "malformed_xml", "forbidden_xml", "empty_feed", "too_many_records")
REFRESH_ERROR_REASONS: Final = (*FEED_ERROR_REASONS, *KML_ERROR_REASONS, "internal")
# Labels of chargy_feed_skipped_records_total: why kml.py dropped a record of an otherwise good feed.
SKIP_REASONS: Final = (
    "malformed_device_json", "invalid_device", "invalid_connector", "connector_without_name",
    "connector_without_state", "duplicate_connector", "invalid_placemark",
)  # fmt: skip

# Raw (OCPP-like) upstream states; anything not listed here is unknown and counts as unavailable.
_RAW_CHARGING: Final = ("CHARGING", "PREPARING", "SUSPENDED_EV", "SUSPENDED_EVSE", "FINISHING", "OCCUPIED", "RESERVED")
RAW_STATE_MAP: Final = MappingProxyType(
    {"AVAILABLE": AVAILABLE}
    | dict.fromkeys(_RAW_CHARGING, CHARGING)
    | dict.fromkeys(("UNAVAILABLE", "OFFLINE", "FAULT", "FAULTED"), UNAVAILABLE)
)


def simplify_state(raw_state: str) -> str:
    return RAW_STATE_MAP.get(raw_state.strip().upper(), UNAVAILABLE)


def format_speed(kilowatts: float | None) -> str:
    """`speed` label value: kW without a useless decimal (22.0 → "22", 7.4 → "7.4"); "" when unknown."""
    if kilowatts is None:
        return ""
    return str(int(kilowatts)) if kilowatts == int(kilowatts) else repr(round(kilowatts, 3))


@dataclass(frozen=True, slots=True)
class Connector:
    name: str
    max_speed_kw: float | None
    raw_state: str

    @property
    def state(self) -> str:
        return simplify_state(self.raw_state)

    @property
    def speed(self) -> str:
        return format_speed(self.max_speed_kw)


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    connectors: tuple[Connector, ...]


@dataclass(frozen=True, slots=True)
class Station:
    name: str
    address: str
    latitude: float | None
    longitude: float | None
    devices: tuple[Device, ...]


@dataclass(frozen=True, slots=True)
class ConnectorRow:
    """One connector with its place in the hierarchy: what one set of series describes."""

    station: Station
    device: Device
    connector: Connector


@dataclass(frozen=True, slots=True)
class NetworkCounts:
    """The network at a glance: connectors by simplified state, and stations where none is available. Stations are
    counted as the dashboard's PromQL does (`sum by (station)`): by name."""

    available: int = 0
    charging: int = 0
    unavailable: int = 0
    stations: int = 0  # names with at least one connector
    stations_without_available: int = 0
    stations_without_connectors: int = 0  # names with no connector at all: no series, not in the two above

    @property
    def connectors(self) -> int:
        return self.available + self.charging + self.unavailable


@dataclass(frozen=True)
class Snapshot:
    stations: tuple[Station, ...]
    # Records the parser had to drop, by reason (for chargy_feed_skipped_records_total).
    skipped: MappingProxyType[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def rows(self) -> Iterator[ConnectorRow]:
        for station in self.stations:
            for device in station.devices:
                for connector in device.connectors:
                    yield ConnectorRow(station, device, connector)

    @property
    def device_count(self) -> int:
        return sum(len(station.devices) for station in self.stations)

    @property
    def connector_count(self) -> int:
        return sum(len(device.connectors) for station in self.stations for device in station.devices)

    @cached_property
    def counts(self) -> NetworkCounts:
        # Computed on first use and kept: the snapshot never changes, and the status page asks on every request.
        per_station: dict[str, set[str]] = {}
        by_state: Counter[str] = Counter()
        for station in self.stations:
            states = [connector.state for device in station.devices for connector in device.connectors]
            per_station.setdefault(station.name, set()).update(states)
            by_state.update(states)
        listed = [states for states in per_station.values() if states]
        without_available = sum(1 for states in listed if AVAILABLE not in states)
        unlisted = len(per_station) - len(listed)
        return NetworkCounts(
            by_state[AVAILABLE], by_state[CHARGING], by_state[UNAVAILABLE], len(listed), without_available, unlisted
        )


@dataclass(frozen=True)
class FeedStatus:
    up: bool = False
    last_success_time: float | None = None  # Unix time of the last refresh that produced or confirmed the data
    last_refresh_duration: float | None = None  # seconds, of the last refresh whatever its outcome
    # Cumulative since start, by reason.
    errors: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    skipped: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # The last failed refresh, kept after a recovery (the page shows what went wrong last, and when).
    last_error_reason: str | None = None  # a label of chargy_feed_refresh_errors_total
    last_error_message: str | None = None  # short, one line, secrets already redacted
    last_error_time: float | None = None  # Unix time
    failures_in_a_row: int = 0
    next_refresh_time: float | None = None  # Unix time the next refresh attempt is due


@dataclass(frozen=True)
class State:
    snapshot: Snapshot = Snapshot(stations=())
    status: FeedStatus = FeedStatus()


def add_counts(total: Mapping[str, int], more: Mapping[str, int]) -> Mapping[str, int]:
    if not more:
        return total
    merged = Counter(total)
    merged.update(more)
    return MappingProxyType(dict(merged))
