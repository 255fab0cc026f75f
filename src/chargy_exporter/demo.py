"""`--demo`: a made-up network of the live feed's size and shape (~523 stations, ~1,800 connectors, its speeds,
real state names, Luxembourg's towns), whose states move at each refresh like charging sessions starting and ending.
Deterministic from `SEED` and the refresh number, no network; each fetch writes a KML document for the real parser."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final
from xml.sax.saxutils import escape

SEED: Final = 15
# Devices per station → stations: 412 of 523 with one device and hubs of 34, 28 and 27 devices (934 devices in all).
_DEVICES_PER_STATION: Final = {
    1: 412, 2: 50, 3: 14, 4: 18, 5: 10, 6: 5, 7: 3, 8: 2, 11: 1, 12: 1, 15: 1, 18: 1, 20: 1, 26: 1, 27: 1, 28: 1,
    34: 1,
}  # fmt: skip
# Towns (approximate centre) and how many stations they draw: the capital has the most.
_TOWNS: Final = (
    ("Luxembourg", 49.611, 6.130, 12), ("Esch-sur-Alzette", 49.496, 5.981, 4), ("Differdange", 49.524, 5.891, 2),
    ("Dudelange", 49.480, 6.087, 2), ("Ettelbruck", 49.847, 6.104, 2), ("Diekirch", 49.868, 6.159, 1),
    ("Wiltz", 49.966, 5.932, 1), ("Echternach", 49.812, 6.418, 1), ("Grevenmacher", 49.680, 6.441, 1),
    ("Remich", 49.545, 6.367, 1), ("Vianden", 49.935, 6.208, 1), ("Clervaux", 50.055, 6.031, 1),
    ("Mersch", 49.749, 6.106, 2), ("Mondorf-les-Bains", 49.505, 6.281, 1), ("Bettembourg", 49.518, 6.103, 1),
    ("Strassen", 49.620, 6.073, 2), ("Bertrange", 49.611, 6.050, 2), ("Mamer", 49.627, 6.023, 1),
    ("Hesperange", 49.573, 6.160, 2), ("Junglinster", 49.712, 6.253, 1), ("Pétange", 49.558, 5.881, 1),
    ("Schifflange", 49.506, 6.012, 1), ("Sanem", 49.548, 5.929, 1), ("Steinfort", 49.661, 5.918, 1),
    ("Redange", 49.765, 5.889, 1), ("Troisvierges", 50.121, 6.002, 1), ("Schuttrange", 49.622, 6.270, 1),
    ("Walferdange", 49.660, 6.132, 1), ("Käerjeng", 49.571, 5.910, 1), ("Rumelange", 49.460, 6.030, 1),
    ("Kayl", 49.489, 6.040, 1), ("Niederanven", 49.651, 6.255, 1), ("Contern", 49.585, 6.227, 1),
    ("Roeser", 49.537, 6.146, 1), ("Steinsel", 49.677, 6.124, 1), ("Larochette", 49.786, 6.219, 1),
    ("Beaufort", 49.835, 6.290, 1), ("Mertert", 49.700, 6.480, 1), ("Bissen", 49.787, 6.066, 1),
    ("Capellen", 49.645, 5.990, 1), ("Leudelange", 49.590, 6.065, 1), ("Hosingen", 50.012, 6.091, 1),
    ("Wincrange", 50.053, 5.916, 1), ("Mondercange", 49.533, 5.988, 1), ("Frisange", 49.516, 6.189, 1),
    ("Betzdorf", 49.685, 6.350, 1), ("Wormeldange", 49.611, 6.405, 1), ("Kehlen", 49.668, 6.036, 1),
)  # fmt: skip
_PLACES: Final = (
    "Parking Eglise", "Place de la Gare", "Hôtel de Ville", "Centre Culturel", "Piscine", "Hall Sportif",
    "Parking Mairie", "Rue Principale", "Cimetière", "Place du Marché", "Zone Industrielle", "Parking Ecole",
    "Maison Relais", "Parking Stade", "Grand-Rue", "Place de l'Eglise", "Parking Schlass", "Route d'Arlon",
)  # fmt: skip
_HUB_PLACES: Final = ("P+R Bouillon", "P+R Kockelscheuer", "P+R Luxexpo", "Parking Glacis", "P+R Howald", "Park & Ride")
_DC_SPEEDS: Final = (160.0, 200.0, 350.0, 400.0)
_DC_STATIONS: Final = 20
_AC_13_KW: Final = (13.2, 13.8)

# One refresh's step of a connector's raw state: (next state, probability), the rest of the time it stays. Sessions
# start (PREPARING), charge, pause, finish; faults are rare and recover. Its stationary mix is about half AVAILABLE.
_STEPS: Final = {
    "AVAILABLE": (("PREPARING", 0.05), ("CHARGING", 0.03), ("UNAVAILABLE", 0.002), ("FAULT", 0.001)),
    "PREPARING": (("CHARGING", 0.6), ("AVAILABLE", 0.2)),
    "CHARGING": (("FINISHING", 0.08), ("SUSPENDED_EVSE", 0.03), ("AVAILABLE", 0.03)),
    "SUSPENDED_EVSE": (("CHARGING", 0.3), ("FINISHING", 0.1)),
    "FINISHING": (("AVAILABLE", 0.5),),
    "FAULT": (("AVAILABLE", 0.05),),
    "UNAVAILABLE": (("AVAILABLE", 0.04),),
    "OFFLINE": (("AVAILABLE", 0.04),),
}
_START_WEIGHTS: Final = {
    "AVAILABLE": 52, "CHARGING": 24, "PREPARING": 3, "FINISHING": 4, "SUSPENDED_EVSE": 5, "UNAVAILABLE": 5, "FAULT": 2,
    "OFFLINE": 5,
}  # fmt: skip
_DEVICE_OFFLINE: Final = 0.001  # a whole device losing its link at a refresh (all its connectors OFFLINE)


@dataclass(frozen=True, slots=True)
class _Station:
    name: str
    address: str
    latitude: float
    longitude: float
    devices: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]  # (device, ((connector, kW), ...))


def _layout(rng: random.Random) -> list[_Station]:
    sizes = [size for size, count in _DEVICES_PER_STATION.items() for _ in range(count)]
    rng.shuffle(sizes)
    middle = [i for i, size in enumerate(sizes) if 2 <= size <= 6]
    dc = set(rng.sample(middle, _DC_STATIONS))
    towns, weights = [town[:3] for town in _TOWNS], [town[3] for town in _TOWNS]
    stations, used, device_number = [], set[str](), 1000
    for i, size in enumerate(sizes):
        town, latitude, longitude = towns[0] if size >= 10 else rng.choices(towns, weights)[0]
        if i in dc:
            name, speed = f"SuperChargy - {town}", rng.choice(_DC_SPEEDS)
        else:
            place = rng.choice(_HUB_PLACES if size >= 10 else _PLACES)
            name = f"{'VdL - ' if size >= 10 else ''}{town} - {place}"
            roll = rng.random()
            speed = 22.08 if roll < 0.2 else rng.choice(_AC_13_KW) if roll < 0.215 else 22.0
        for _ in range(3):  # another place of the town, then a number: unique names, as in the live feed's history
            if name in used and i not in dc:
                name = f"{name.rpartition(' - ')[0]} - {rng.choice(_HUB_PLACES if size >= 10 else _PLACES)}"
        base, n = name, 1
        while name in used:
            n += 1
            name = f"{base} {n}"
        used.add(name)
        devices = []
        for _ in range(size):
            device_number += 1 + rng.randrange(3)
            device = f"CP{device_number}"
            count = 1 if size == 1 and rng.random() < 0.16 else 2
            labels = [2, 1] if count == 2 and rng.random() < 0.06 else list(range(1, count + 1))  # names vs numbers
            devices.append((device, tuple((f"{device} - {label}", speed) for label in labels)))
        street = f"{rng.choice(('Rue de la Gare', 'Route de Luxembourg', 'Rue Principale', 'Avenue de la Liberté'))}"
        address = f"{street} {rng.randint(1, 120)}, L-{rng.randint(1000, 9999)} {town} Luxembourg"
        # Scattered around the town centre, inside the country's box (lat 49.45-50.18, lon 5.74-6.53).
        latitude = min(50.18, max(49.45, latitude + rng.uniform(-0.02, 0.02)))
        longitude = min(6.53, max(5.74, longitude + rng.uniform(-0.03, 0.03)))
        stations.append(_Station(name, address, round(latitude, 6), round(longitude, 6), tuple(devices)))
    return stations


class DemoNetwork:
    """The demo network; `document()` steps its states once and returns the KML a refresh reads."""

    def __init__(self, seed: int = SEED) -> None:
        rng = random.Random(seed)
        self.stations = _layout(rng)
        self.states = rng.choices(list(_START_WEIGHTS), list(_START_WEIGHTS.values()), k=self.connectors)
        self.refreshes = 0
        self._seed = seed

    @property
    def devices(self) -> int:
        return sum(len(station.devices) for station in self.stations)

    @property
    def connectors(self) -> int:
        return sum(len(connectors) for station in self.stations for _, connectors in station.devices)

    def step(self) -> None:
        """One refresh's changes: random from (seed, refresh number) alone, so any run sees the same sequence."""
        self.refreshes += 1
        rng = random.Random(f"{self._seed}/{self.refreshes}")
        index = 0
        for station in self.stations:
            for _, connectors in station.devices:
                offline = rng.random() < _DEVICE_OFFLINE
                for position in range(index, index + len(connectors)):
                    self.states[position] = "OFFLINE" if offline else _next(self.states[position], rng.random())
                index += len(connectors)

    def document(self) -> bytes:
        """The KML of the states now, laid out as the live feed (without what the parser drops); then one step."""
        states = iter(self.states)
        placemarks = []
        for station in self.stations:
            data = "".join(
                f'<Data name="chargingdevice"><value>{escape(_device_json(device, connectors, states))}</value></Data>'
                for device, connectors in station.devices
            )
            placemarks.append(
                f"<Placemark><name>{escape(station.name)}</name><address>{escape(station.address)}</address>"
                f"<ExtendedData>{data}</ExtendedData><Point><coordinates>{station.longitude},{station.latitude}"
                "</coordinates></Point></Placemark>"
            )
        self.step()
        return (
            '<?xml version="1.0" encoding="UTF-8"?><kml xmlns="http://www.opengis.net/kml/2.2"><Document>'
            f"<name>Stations</name>{''.join(placemarks)}</Document></kml>"
        ).encode()


def _device_json(device: str, connectors: tuple[tuple[str, float], ...], states: Iterator[str]) -> str:
    listed = [
        {"name": name, "maxchspeed": speed, "connector": number, "description": next(states)}
        for number, (name, speed) in enumerate(connectors, start=1)
    ]
    record = {"name": device, "numberOfConnectors": len(connectors), "connectors": listed}
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _next(state: str, roll: float) -> str:
    for target, probability in _STEPS[state]:
        if roll < probability:
            return target
        roll -= probability
    return state
