"""Chargy KML feeds shaped like the live one, of any size, seeded, with the expected series for each connector.

By default (`generate_feed()`) the feed has the live feed's shape at the end of 2024 (shared/README.md, "Facts of
the live feed"): 523 stations, 934 charging devices, 1,801 connectors; 412 stations with one device and hubs of
34, 28 and 27 devices; two connectors per device on most devices; `maxchspeed` 22.0 for most AC connectors, 22.08
for about a fifth of them, 13–14 kW at a few stations, DC stations at 160/200/350/400 kW; raw states in the
proportions seen (about half AVAILABLE); on some devices connector 1 is named `… - 2`; the whole document on one
line, without a final newline, in a Document named `Stations`; each Placemark's HTML description with its per-speed
and available/occupied counts. Smaller or larger feeds (`stations=`, `connectors=`) are drawn from the same station
shapes, so they keep the proportions. `odd_shapes=True` adds what the live feed has not shown but may: OCPP states
not seen yet and unknown ones, speeds written as strings or missing, speeds never seen (7.4, 175, …), Placemarks
without devices and duplicate station names.

The expectations are computed here from the state table in shared/README.md, independently of the package,
so tests compare the exporter's output with what the feed says, not with the exporter's own logic.

Standard library only: the benchmarks import it too.

Command line:  python tests/feedgen.py [--stations N | --connectors N] [--seed 1] [--odd-shapes] -o feed.kml
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from xml.sax.saxutils import escape

# shared/README.md's table, written out again on purpose.
EXPECTED_SIMPLIFIED = {
    "AVAILABLE": "available",
    "CHARGING": "charging",
    "PREPARING": "charging",
    "SUSPENDED_EV": "charging",
    "SUSPENDED_EVSE": "charging",
    "FINISHING": "charging",
    "OCCUPIED": "charging",
    "RESERVED": "charging",
    "UNAVAILABLE": "unavailable",
    "OFFLINE": "unavailable",
    "FAULT": "unavailable",
    "FAULTED": "unavailable",
}
UNKNOWN_STATES = ("MAINTENANCE", "OUT_OF_ORDER_NEW")
ALL_STATES = (*EXPECTED_SIMPLIFIED, *UNKNOWN_STATES)
# The raw states seen in the live feed, with weights near the captures' proportions (about half AVAILABLE). Whole
# devices and stations also go OFFLINE together (see _station_states), which adds to OFFLINE's share.
LIVE_STATE_WEIGHTS = {
    "AVAILABLE": 54,
    "CHARGING": 22,
    "OFFLINE": 5,
    "UNAVAILABLE": 5,
    "PREPARING": 3,
    "FINISHING": 3,
    "SUSPENDED_EVSE": 4,
    "FAULT": 2,
}
LIVE_STATES = tuple(LIVE_STATE_WEIGHTS)

# ---- the live feed's shape (shared/README.md, end of 2024) ---------------------------------------------------------

LIVE_STATIONS = 523
LIVE_DEVICES = 934
LIVE_CONNECTORS = 1801
# Devices per station: 412 stations with one device, 50 with two, …, and the nine largest (34, 28, 27, …).
DEVICES_PER_STATION = {
    1: 412, 2: 50, 3: 12, 4: 20, 5: 10, 6: 4, 7: 3, 8: 3,
    10: 1, 12: 1, 14: 1, 16: 1, 21: 1, 25: 1, 27: 1, 28: 1, 34: 1,
}  # fmt: skip
# DC stations: the speeds each offers (per station that offers them: 350 kW 9, 160 kW 8, 400 kW 7, 200 kW 1).
DC_STATION_SPEEDS = (
    *[(350.0,)] * 5, *[(160.0,)] * 5, *[(400.0,)] * 4, (200.0,),
    *[(160.0, 350.0)] * 2, *[(350.0, 400.0)] * 2, (160.0, 400.0),
)  # fmt: skip
AC_SPEED = 22.0
AC_SPEED_FIFTH = 22.08  # about a fifth of the AC connectors: a real value, not noise
AC_SPEEDS_13_KW = (13.2, 13.8)  # "a few around 13–14 kW"; the exact values are not known
STATIONS_AT_13_KW = 6
# `odd_shapes` only: speeds the live feed has not shown.
ODD_SPEEDS = (7.4, 11.0, 3.7, 175.0, 150.0, 50.0)

TOWNS = (
    "Luxembourg", "Esch-sur-Alzette", "Differdange", "Dudelange", "Ettelbruck", "Diekirch", "Wiltz", "Echternach",
    "Rumelange", "Grevenmacher", "Remich", "Vianden", "Clervaux", "Mersch", "Käerjeng", "Mondorf-les-Bains",
    "Bettembourg", "Schifflange", "Sanem", "Hesperange", "Strassen", "Bertrange", "Mamer", "Steinsel",
    "Walferdange", "Junglinster", "Niederanven", "Schuttrange", "Contern", "Weiler-la-Tour", "Roeser", "Pétange",
    "Kayl", "Mondercange", "Leudelange", "Reckange-sur-Mess", "Colmar-Berg", "Préizerdaul", "Wormeldange", "Betzdorf",
    "Lorentzweiler", "Bissen", "Redange", "Beckerich", "Troisvierges", "Wincrange", "Kehlen", "Kopstal",
)  # fmt: skip
PLACES = (
    "Parking Eglise", "Place de la Résistance", "P&R Gare", "Rue de l'École", 'Parking "Am Duerf"', "Hôtel de Ville",
    "Centre Culturel", "Cité Jardin", "Parking souterrain Brill", "Rue du Marché-aux-Herbes", "Piscine",
    "Hall Omnisports", "Cimetière", "Zone d'activités", "Parking Schlass", "Gare & Bus", "Maison Relais",
    "Parking Mairie", "Parking Complexe Scolaire", "Parking rue Neudorf", "Place de l'Indépendance", "Um Bierg",
)  # fmt: skip
HUB_PLACES = ("P+R Sud", "P+R Nord", "P+R Stade", "P+R Kiem", "Parking Glacis", "P+R Gare Centrale", "Parking Knuedler")
SINGLE_PLACES = ("CFL multimodal", "Cité Herrenberg", "Résidence Les Jardins", "Cité Op der Hoh")
STREETS = (
    "Rue de l'Eglise", "Route d'Arlon", "Avenue de la Gare", "Grand-Rue", "Rue Principale", "Place du Marché",
    "Rue Louis Pasteur", "Route de Luxembourg", "Parc & Ride", "Rue du Cimetière",
)  # fmt: skip


@dataclass(frozen=True)
class ConnectorSpec:
    id: int
    name: str
    number: int
    speed: float | str | None  # a float as the feed writes it, a string or None for the odd shapes
    state: str


@dataclass(frozen=True)
class DeviceSpec:
    id: int
    name: str
    connectors: tuple[ConnectorSpec, ...]


@dataclass(frozen=True)
class StationSpec:
    name: str
    address: str
    latitude: float
    longitude: float
    devices: tuple[DeviceSpec, ...]
    superchargy: bool = False


@dataclass(frozen=True)
class ExpectedConnector:
    connector: str
    device: str
    station: str
    speed: str  # the label value
    state: str  # raw
    simplified: str


@dataclass(frozen=True)
class ExpectedStation:
    name: str
    address: str
    latitude: float
    longitude: float
    connectors: tuple[ExpectedConnector, ...]


@dataclass
class GeneratedFeed:
    stations: list[StationSpec]
    seed: int
    next_id: int = field(default=0)
    odd_shapes: bool = False
    used_names: set[str] = field(default_factory=set, repr=False)
    _kml: bytes | None = field(default=None, repr=False)

    @property
    def kml(self) -> bytes:
        if self._kml is None:
            self._kml = render_kml(self.stations)
        return self._kml

    @property
    def expected_stations(self) -> list[ExpectedStation]:
        return [
            ExpectedStation(
                s.name,
                s.address,
                s.latitude,
                s.longitude,
                tuple(_expected(s, d, c) for d in s.devices for c in d.connectors),
            )
            for s in self.stations
        ]

    @property
    def connectors(self) -> list[ExpectedConnector]:
        return [_expected(s, d, c) for s in self.stations for d in s.devices for c in d.connectors]

    def counts_by_state(self) -> dict[str, int]:
        counts = {"available": 0, "charging": 0, "unavailable": 0}
        for connector in self.connectors:
            counts[connector.simplified] += 1
        return counts

    def station_counts(self) -> tuple[int, int, int]:
        """As the dashboard's PromQL counts (`sum by (station)`): station names having connectors, those of them with
        none available; and apart, the names listing no connector (they have no series)."""
        by_name: dict[str, list[str]] = {}
        for station in self.expected_stations:
            by_name.setdefault(station.name, []).extend(c.simplified for c in station.connectors)
        listed = [states for states in by_name.values() if states]
        return len(listed), sum(1 for states in listed if "available" not in states), len(by_name) - len(listed)


def expected_speed(speed: float | str | None) -> str:
    if speed is None:
        return ""
    value = float(speed)
    return str(int(value)) if value.is_integer() else str(value)


def _expected(station: StationSpec, device: DeviceSpec, connector: ConnectorSpec) -> ExpectedConnector:
    return ExpectedConnector(
        connector=connector.name,
        device=device.name,
        station=station.name,
        speed=expected_speed(connector.speed),
        state=connector.state,
        simplified=EXPECTED_SIMPLIFIED.get(connector.state, "unavailable"),
    )


# ---- station shapes -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StationShape:
    """What a station is made of: per device, its connectors' speeds. `kind`: "ac", "dc" (SuperChargy), "hub"
    (ten devices or more), or "single" (AC devices with one connector each)."""

    kind: str
    devices: tuple[tuple[float, ...], ...]

    @property
    def connectors(self) -> int:
        return sum(len(d) for d in self.devices)


def _live_shapes() -> tuple[StationShape, ...]:
    """The 523 station shapes of the live feed; the same list whatever the seed (a fixed seed picks which station
    gets which speed), so the default feed has the live feed's counts exactly."""
    rng = random.Random(2024_12_23)
    sizes = sorted(size for size, stations in DEVICES_PER_STATION.items() for _ in range(stations))
    kinds = ["hub" if size >= 10 else "ac" for size in sizes]
    middle = [i for i, size in enumerate(sizes) if 2 <= size <= 6]
    dc = rng.sample(middle, len(DC_STATION_SPEEDS))
    single = rng.sample([i for i in middle if i not in dc and sizes[i] == 4], 3)  # like "Chargy Ok" stations
    devices: list[list[list[float]]] = []
    for i, size in enumerate(sizes):
        if i in dc:
            kinds[i] = "dc"
            speeds = DC_STATION_SPEEDS[dc.index(i)]
            station = [[speeds[n * len(speeds) // size]] for n in range(size)]
            for device in station:
                if device[0] == 400.0:  # a 400 kW device with three connectors, as in the captures
                    device.extend([400.0, 400.0])
                    break
        elif i in single:
            kinds[i] = "single"
            station = [[AC_SPEED] for _ in range(size)]
        else:
            station = [[AC_SPEED, AC_SPEED] for _ in range(size)]
        devices.append(station)
    # Reach the live connector count exactly: single-device AC stations with one connector (or DC devices with two).
    total = sum(len(d) for station in devices for d in station)
    one_device = [i for i, size in enumerate(sizes) if size == 1]
    for i in rng.sample(one_device, max(0, total - LIVE_CONNECTORS)):
        devices[i][0].pop()
    for i in rng.sample(dc, max(0, LIVE_CONNECTORS - total)):
        devices[i][0].append(devices[i][0][0])
    # AC speeds: 13–14 kW at a few small stations, then 22.08 for whole stations up to a fifth of AC connectors.
    ac = [i for i, kind in enumerate(kinds) if kind != "dc"]
    order = rng.sample(ac, len(ac))
    for n, i in enumerate([i for i in order if sizes[i] <= 2][:STATIONS_AT_13_KW]):
        devices[i] = [[AC_SPEEDS_13_KW[n % 2]] * len(d) for d in devices[i]]
    ac_connectors = sum(len(d) for i in ac for d in devices[i])
    target, fifth = round(ac_connectors / 5), 0
    for i in order:
        count = sum(len(d) for d in devices[i])
        if devices[i][0][0] == AC_SPEED and fifth + count <= target:
            devices[i] = [[AC_SPEED_FIFTH] * len(d) for d in devices[i]]
            fifth += count
    return tuple(
        StationShape(kind, tuple(tuple(d) for d in station)) for kind, station in zip(kinds, devices, strict=True)
    )


LIVE_SHAPES = _live_shapes()


def _shapes(rng: random.Random) -> Iterator[StationShape]:
    """The live shapes in a seeded order, again and again: any run of LIVE_STATIONS has the live counts."""
    while True:
        yield from rng.sample(LIVE_SHAPES, len(LIVE_SHAPES))


# ---- generation ---------------------------------------------------------------------------------------------------


def generate_feed(
    stations: int | None = None,
    seed: int = 0,
    *,
    connectors: int | None = None,
    odd_shapes: bool = False,
) -> GeneratedFeed:
    """A feed of `stations` Placemarks, or of at least (and about) `connectors` connectors, or by default the live
    feed's size (LIVE_STATIONS Placemarks, whose counts are then exactly the live ones).

    The raw states seen live (or, with `odd_shapes`, every state of the table and two unknown ones) all appear once
    there are enough connectors (8, or 14). With `odd_shapes`, some connectors have a speed the live feed never
    showed, written as a string, or missing (null); some Placemarks have no device or share their name.
    """
    rng = random.Random(seed)
    feed = GeneratedFeed(stations=[], seed=seed, next_id=1000, odd_shapes=odd_shapes)
    shapes = _shapes(rng)
    if stations is None and connectors is None:
        stations = LIVE_STATIONS
    total = 0
    while (stations is not None and len(feed.stations) < stations) or (
        stations is None and connectors is not None and total < connectors
    ):
        station = _new_station(feed, rng, next(shapes))
        feed.stations.append(station)
        total += sum(len(d.connectors) for d in station.devices)
    # Make sure every state shows up at least once, early in the feed.
    pending = list(ALL_STATES if odd_shapes else LIVE_STATES)
    for index, station in enumerate(feed.stations):
        if not pending:
            break
        devices = tuple(
            replace(
                device,
                connectors=tuple(replace(c, state=pending.pop(0)) if pending else c for c in device.connectors),
            )
            for device in station.devices
        )
        feed.stations[index] = replace(station, devices=devices)
    return feed


def _unique(feed: GeneratedFeed, name: str) -> str:
    candidate, n = name, 1
    while candidate in feed.used_names:
        n += 1
        candidate = f"{name} {n}"
    feed.used_names.add(candidate)
    return candidate


def _new_station(feed: GeneratedFeed, rng: random.Random, shape: StationShape) -> StationSpec:
    town = rng.choice(TOWNS)
    if shape.kind == "dc":
        name = rng.choice((f"SuperChargy - {town}", f"SuperChargy - Aire de {town}"))
    elif shape.kind == "hub":
        name = f"{town} - {rng.choice(HUB_PLACES)}"
    elif shape.kind == "single":
        name = f"Chargy Ok - {rng.choice(SINGLE_PLACES)}"
    else:
        name = f"{town} - {rng.choice(PLACES)}"
    if feed.odd_shapes and feed.used_names and rng.random() < 0.02:
        name = rng.choice(sorted(feed.used_names))  # nothing promises unique names
    else:
        name = _unique(feed, name)
    street = rng.choice(STREETS)
    number = f" {rng.randint(1, 120)}" if rng.random() < 0.8 else ""
    device_shapes = () if feed.odd_shapes and rng.random() < 0.01 else shape.devices
    devices = tuple(_new_device(feed, rng, speeds) for speeds in device_shapes)
    return StationSpec(
        name=name,
        address=f"{street}{number}, L-{rng.randint(1000, 9999)} {town} Luxembourg",
        latitude=round(rng.uniform(49.45, 50.18), 6),
        longitude=round(rng.uniform(5.74, 6.52), 6),
        devices=_station_states(rng, devices, feed.odd_shapes),
        superchargy=shape.kind == "dc",
    )


def _new_device(feed: GeneratedFeed, rng: random.Random, speeds: tuple[float, ...]) -> DeviceSpec:
    feed.next_id += 1 + rng.randint(0, 2)
    device_number = feed.next_id
    name = f"CP{device_number:04d}"
    # On some devices the names do not follow the numbers: connector 1 is "… - 2" and connector 2 "… - 1".
    labels = list(range(1, len(speeds) + 1))
    if len(labels) == 2 and rng.random() < 0.06:
        labels.reverse()
    connectors = []
    for number, (label, kilowatts) in enumerate(zip(labels, speeds, strict=True), start=1):
        speed: float | str | None = kilowatts
        if feed.odd_shapes:
            roll = rng.random()
            if roll < 0.05:
                speed = rng.choice(ODD_SPEEDS)
            speed = f"{speed}" if 0.05 <= roll < 0.10 else None if 0.10 <= roll < 0.13 else speed
        connectors.append(ConnectorSpec(50_000 + device_number * 4 + number, f"{name} - {label}", number, speed, ""))
    return DeviceSpec(430_000 + device_number, name, tuple(connectors))


def _station_states(rng: random.Random, devices: tuple[DeviceSpec, ...], odd: bool) -> tuple[DeviceSpec, ...]:
    """States as they come live: whole stations and devices go OFFLINE together, the rest connector by connector."""
    station_offline = rng.random() < 0.03
    result = []
    for device in devices:
        offline = station_offline or rng.random() < 0.03
        result.append(
            replace(
                device,
                connectors=tuple(
                    replace(c, state="OFFLINE" if offline else _random_state(rng, odd)) for c in device.connectors
                ),
            )
        )
    return tuple(result)


def _random_state(rng: random.Random, odd: bool = False) -> str:
    if odd and rng.random() < 0.16:
        return rng.choice(ALL_STATES)
    return rng.choices(LIVE_STATES, weights=tuple(LIVE_STATE_WEIGHTS.values()))[0]


def evolve(
    feed: GeneratedFeed,
    seed: int,
    *,
    state_changes: float = 0.2,
    removed: float = 0.02,
    added_stations: int = 0,
) -> GeneratedFeed:
    """The next refresh of `feed`: some connectors change state, some stations and devices disappear, stations
    appear (new names, new devices)."""
    rng = random.Random(seed)
    result = GeneratedFeed(
        stations=[], seed=seed, next_id=feed.next_id, odd_shapes=feed.odd_shapes, used_names=set(feed.used_names)
    )
    for station in feed.stations:
        if rng.random() < removed:
            continue
        devices = []
        for device in station.devices:
            if rng.random() < removed:
                continue
            devices.append(
                replace(
                    device,
                    connectors=tuple(
                        replace(c, state=_random_state(rng, feed.odd_shapes)) if rng.random() < state_changes else c
                        for c in device.connectors
                    ),
                )
            )
        result.stations.append(replace(station, devices=tuple(devices)))
    for _ in range(added_stations):
        result.stations.append(_new_station(result, rng, rng.choice(LIVE_SHAPES)))
    return result


# ---- rendering: the live feed's layout, on one line -----------------------------------------------------------

_NAMESPACES = (
    'xmlns="http://www.opengis.net/kml/2.2" xmlns:gx="http://www.google.com/kml/ext/2.2" '
    'xmlns:xal="urn:oasis:names:tc:ciq:xsdschema:xAL:2.0" xmlns:atom="http://www.w3.org/2005/Atom"'
)


def _style(state: str, colour: str) -> str:
    icon = (
        f"<href>http://maps.google.com/mapfiles/kml/paddle/{colour}-circle.png</href><refreshInterval>0.0"
        "</refreshInterval><viewRefreshTime>0.0</viewRefreshTime><viewBoundScale>0.0</viewBoundScale>"
    )
    style = f"<IconStyle><scale>1.0</scale><heading>0.0</heading><Icon>{icon}</Icon></IconStyle>"
    return f'<Style id="{state}">{style}</Style>'


_HEADER = (
    f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><kml {_NAMESPACES}><Document><name>Stations</name>'
    + _style("AVAILABLE", "grn")
    + _style("UNAVAILABLE", "red")
)
_FOOTER = "</Document></kml>"  # no final newline, as served


def _device_json(device: DeviceSpec) -> str:
    return json.dumps(
        {
            "id": device.id,
            "name": device.name,
            "numberOfConnectors": len(device.connectors),
            "connectors": [
                {"id": c.id, "name": c.name, "maxchspeed": c.speed, "connector": c.number, "description": c.state}
                for c in device.connectors
            ],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def description_kilowatts(speed: float | str | None) -> int:
    """The whole kW a Placemark's description groups a connector under: 22.0 and 22.08 are both "22kW"."""
    try:
        value = float(speed) if speed is not None else 0.0
    except ValueError:
        return 0
    return math.floor(value) if math.isfinite(value) else 0


def description_html(connectors: list[ConnectorSpec]) -> str:
    """The description's HTML: per speed (ascending), the connectors, the available ones and the occupied ones
    (every connector that is not AVAILABLE, OFFLINE included)."""
    groups: dict[int, Counter[str]] = {}
    for c in connectors:
        group = groups.setdefault(description_kilowatts(c.speed), Counter())
        group["total"] += 1
        group["available" if c.state == "AVAILABLE" else "occupied"] += 1
    return "".join(
        f"<span><b>{group['total']}</b> connectors with {kilowatts}kW and Type 2 connector<span><br/>"
        f"<span><b>{group['available']}</b> available connectors<span><br/>"
        f"<span><b>{group['occupied']}</b> occupied connectors<span><br/>"
        for kilowatts, group in sorted(groups.items())
    )


def render_placemark(station: StationSpec) -> str:
    connectors = [c for d in station.devices for c in d.connectors]
    available = any(c.state == "AVAILABLE" for c in connectors)
    data = "".join(
        '<Data name="chargingdevice"><displayName>Charging device</displayName>'
        f"<value>{escape(_device_json(device))}</value></Data>"
        for device in station.devices
    )
    return (
        f"<Placemark><name>{escape(station.name)}</name><visibility>1</visibility>"
        f"<address>{escape(station.address)}</address>"
        f"<description>{escape(description_html(connectors))}</description>"
        f"<styleUrl>#{'AVAILABLE' if available else 'UNAVAILABLE'}</styleUrl>"
        f'<ExtendedData><Data name="CPnum"><displayName>Number of chargingpoints</displayName>'
        f"<value>{len(connectors)}</value></Data>{data}</ExtendedData>"
        f"<Point><altitudeMode>clampToGround</altitudeMode>"
        f"<coordinates>{station.longitude},{station.latitude}</coordinates></Point></Placemark>"
    )


def render_kml(stations: list[StationSpec]) -> bytes:
    return (_HEADER + "".join(render_placemark(s) for s in stations) + _FOOTER).encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--stations", type=int, help=f"Placemarks (default: the live feed's {LIVE_STATIONS})")
    size.add_argument("--connectors", type=int, help="at least this many connectors, whole stations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--odd-shapes", action="store_true", help="unknown states, odd speeds, empty Placemarks")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    feed = generate_feed(args.stations, args.seed, connectors=args.connectors, odd_shapes=args.odd_shapes)
    args.output.write_bytes(feed.kml)
    devices = sum(len(s.devices) for s in feed.stations)
    print(
        f"{args.output}: {len(feed.stations)} stations, {devices} devices, {len(feed.connectors)} connectors, "
        f"{len(feed.kml)} bytes"
    )


if __name__ == "__main__":
    main()
