"""Production-shaped Chargy KML feeds of any size, seeded, with the expected series for each connector.

The expectations are computed here from the state table in shared/README.md, independently of the package,
so tests compare the exporter's output with what the feed says, not with the exporter's own logic.

Command line:  python tests/feedgen.py --connectors 17000 --seed 1 -o feed.kml
"""

from __future__ import annotations

import argparse
import json
import random
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
_STATE_WEIGHTS = {"AVAILABLE": 55, "CHARGING": 14, "SUSPENDED_EV": 6, "UNAVAILABLE": 5, "OFFLINE": 4}

TOWNS = (
    "Luxembourg", "Esch-sur-Alzette", "Differdange", "Dudelange", "Ettelbruck", "Diekirch", "Wiltz", "Echternach",
    "Rumelange", "Grevenmacher", "Remich", "Vianden", "Clervaux", "Mersch", "Käerjeng", "Mondorf-les-Bains",
    "Bettembourg", "Schifflange", "Sanem", "Hesperange", "Strassen", "Bertrange", "Mamer", "Steinsel",
    "Walferdange", "Junglinster", "Niederanven", "Schuttrange", "Contern", "Weiler-la-Tour", "Roeser", "Pétange",
    "Kayl", "Mondercange", "Leudelange", "Reckange-sur-Mess", "Colmar-Berg", "Préizerdaul", "Wormeldange", "Betzdorf",
)  # fmt: skip
PLACES = (
    "Parking Eglise", "Place de la Résistance", "P&R Gare", "Rue de l'École", 'Parking "Am Duerf"', "Hôtel de Ville",
    "Centre Culturel", "Cité Jardin", "Parking souterrain Brill", "Rue du Marché-aux-Herbes", "Piscine",
    "Hall Omnisports", "Cimetière", "Zone d'activités", "Parking Schlass", "Gare & Bus", "Maison Relais",
)  # fmt: skip
STREETS = ("Rue de l'Eglise", "Route d'Arlon", "Avenue de la Gare", "Grand-Rue", "Rue Principale", "Place du Marché")
SUPER_SPEEDS = (150.0, 175.0, 300.0, 350.0, 400.0)
NORMAL_SPEEDS = (22.0,) * 8 + (11.0, 7.4, 3.7)


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


# ---- generation ---------------------------------------------------------------------------------------------------


def generate_feed(
    stations: int | None = None,
    seed: int = 0,
    *,
    connectors: int | None = None,
    odd_shapes: bool = False,
) -> GeneratedFeed:
    """A feed of `stations` Placemarks (or about `connectors` connectors, ~2.1 per station like the real one).

    Every state of the table and two unknown ones appear when there are at least 14 connectors. With
    `odd_shapes`, some connectors have their speed written as a string or missing (null).
    """
    if stations is None:
        stations = max(1, round((connectors or 1700) / 2.125))
    rng = random.Random(seed)
    feed = GeneratedFeed(stations=[], seed=seed, next_id=1000)
    state_cycle = iter(ALL_STATES)
    for index in range(stations):
        station = _new_station(feed, rng, index, odd_shapes)
        # Make sure every state shows up at least once, early in the feed.
        devices = []
        for device in station.devices:
            devices.append(
                replace(
                    device,
                    connectors=tuple(replace(c, state=next(state_cycle, c.state)) for c in device.connectors),
                )
            )
        feed.stations.append(replace(station, devices=tuple(devices)))
    return feed


def _new_station(feed: GeneratedFeed, rng: random.Random, index: int, odd_shapes: bool) -> StationSpec:
    town = rng.choice(TOWNS)
    superchargy = rng.random() < 0.04
    place = rng.choice(PLACES)
    name = f"SuperChargy {town} - {place}" if superchargy else f"{town} - {place}"
    if rng.random() > 0.02:  # ~2% of stations share their name with another one, as nothing forbids it
        name = f"{name} {index}"
    roll = rng.random()
    device_count = 0 if roll < 0.01 else 2 if roll < 0.07 else 1
    devices = tuple(_new_device(feed, rng, superchargy, odd_shapes) for _ in range(device_count))
    return StationSpec(
        name=name,
        address=f"{rng.randint(1, 120)}, {rng.choice(STREETS)}, L-{rng.randint(1000, 9999)} {town}",
        latitude=round(rng.uniform(49.45, 50.18), 6),
        longitude=round(rng.uniform(5.74, 6.52), 6),
        devices=devices,
        superchargy=superchargy,
    )


def _new_device(feed: GeneratedFeed, rng: random.Random, superchargy: bool, odd_shapes: bool) -> DeviceSpec:
    feed.next_id += 1
    device_id = feed.next_id
    name = f"CP{device_id}"
    count = 2 if rng.random() < 0.9 else rng.choice((1, 3, 4))
    connectors = []
    for number in range(1, count + 1):
        feed.next_id += 1
        if superchargy:
            speed: float | str | None = rng.choice(SUPER_SPEEDS) if number == 1 or rng.random() < 0.7 else 7.4
        else:
            speed = rng.choice(NORMAL_SPEEDS)
        if odd_shapes:
            roll = rng.random()
            speed = f"{speed}" if roll < 0.05 else None if roll < 0.08 else speed
        connectors.append(ConnectorSpec(feed.next_id * 10, f"{name} - {number}", number, speed, _random_state(rng)))
    return DeviceSpec(device_id, name, tuple(connectors))


def _random_state(rng: random.Random) -> str:
    if rng.random() < 0.84:
        return rng.choices(tuple(_STATE_WEIGHTS), weights=tuple(_STATE_WEIGHTS.values()))[0]
    return rng.choice(ALL_STATES)


def evolve(
    feed: GeneratedFeed,
    seed: int,
    *,
    state_changes: float = 0.2,
    removed: float = 0.02,
    added_stations: int = 0,
) -> GeneratedFeed:
    """The next refresh of `feed`: some connectors change state, some stations and devices disappear, stations
    appear."""
    rng = random.Random(seed)
    result = GeneratedFeed(stations=[], seed=seed, next_id=feed.next_id)
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
                        replace(c, state=_random_state(rng)) if rng.random() < state_changes else c
                        for c in device.connectors
                    ),
                )
            )
        result.stations.append(replace(station, devices=tuple(devices)))
    for index in range(added_stations):
        result.stations.append(_new_station(result, rng, len(feed.stations) + index + 1_000_000, False))
    return result


# ---- rendering ----------------------------------------------------------------------------------------------------

_HEADER = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<kml xmlns="http://www.opengis.net/kml/2.2" xmlns:gx="http://www.google.com/kml/ext/2.2" \
xmlns:xal="urn:oasis:names:tc:ciq:xsdschema:xAL:2.0" xmlns:atom="http://www.w3.org/2005/Atom">
    <Document>
        <name>Chargy charging stations</name>
        <Style id="AVAILABLE">
            <IconStyle>
                <scale>1.0</scale>
                <Icon>
                    <href>http://maps.google.com/mapfiles/kml/paddle/grn-circle.png</href>
                </Icon>
            </IconStyle>
        </Style>
"""
_FOOTER = """    </Document>
</kml>
"""


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


def render_placemark(station: StationSpec) -> str:
    connectors = [c for d in station.devices for c in d.connectors]
    available = sum(1 for c in connectors if c.state == "AVAILABLE")
    description = escape(
        f"<span><b>{len(connectors)}</b> connectors with 22kW and Type 2 connector<span><br/>"
        f"<span><b>{available}</b> available connectors<span><br/>"
    )
    data = "".join(
        f"""
                <Data name="chargingdevice">
                    <displayName>Charging device</displayName>
                    <value>{escape(_device_json(device))}</value>
                </Data>"""
        for device in station.devices
    )
    return f"""        <Placemark>
            <name>{escape(station.name)}</name>
            <visibility>1</visibility>
            <address>{escape(station.address)}</address>
            <description>{description}</description>
            <styleUrl>#{"AVAILABLE" if available else "UNAVAILABLE"}</styleUrl>
            <ExtendedData>
                <Data name="CPnum">
                    <displayName>Number of chargingpoints</displayName>
                    <value>{len(connectors)}</value>
                </Data>{data}
            </ExtendedData>
            <Point>
                <altitudeMode>clampToGround</altitudeMode>
                <coordinates>{station.longitude},{station.latitude}</coordinates>
            </Point>
        </Placemark>
"""


def render_kml(stations: list[StationSpec]) -> bytes:
    return (_HEADER + "".join(render_placemark(s) for s in stations) + _FOOTER).encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connectors", type=int, default=1700)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    feed = generate_feed(connectors=args.connectors, seed=args.seed)
    args.output.write_bytes(feed.kml)
    print(f"{args.output}: {len(feed.stations)} stations, {len(feed.connectors)} connectors, {len(feed.kml)} bytes")


if __name__ == "__main__":
    main()
