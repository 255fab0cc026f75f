"""The exporter against real answers of the live feed (shared/real/*.kml, beside the clone; skipped when absent).

Every expectation comes from a plain reading of the file written here (xml.etree.ElementTree and json, with this
file's own copy of the state table and of the speed formatting), never from the package's model.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import ExporterProcess, assert_matches_feed

from chargy_exporter.kml import parse_kml

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
CAPTURES = sorted(REAL.glob("*.kml")) if REAL.is_dir() else []
needs_captures = pytest.mark.skipif(not CAPTURES, reason=f"no real captures: {REAL} is absent or empty")

KML = "{http://www.opengis.net/kml/2.2}"
# shared/README.md's table, written out again for this file.
SIMPLIFIED = {"AVAILABLE": "available"}
SIMPLIFIED |= dict.fromkeys(
    ("CHARGING", "PREPARING", "SUSPENDED_EV", "SUSPENDED_EVSE", "FINISHING", "OCCUPIED", "RESERVED"), "charging"
)
SIMPLIFIED |= dict.fromkeys(("UNAVAILABLE", "OFFLINE", "FAULT", "FAULTED"), "unavailable")
# One speed group of a Placemark's HTML description, as the live feed writes it.
DESCRIPTION_GROUP = re.compile(
    r"<span><b>(\d+)</b> connectors with (\d+)kW and Type 2 connector<span><br/>"
    r"<span><b>(\d+)</b> available connectors<span><br/>"
    r"<span><b>(\d+)</b> occupied connectors<span><br/>"
)


def speed_label(value: Any) -> str:
    """`maxchspeed` as the `speed` label: kW without a useless decimal (22.0 → "22", 22.08 → "22.08")."""
    if value is None or isinstance(value, bool):
        return ""
    try:
        kilowatts = float(value)
    except ValueError:
        return ""
    if not math.isfinite(kilowatts) or kilowatts <= 0:
        return ""
    return f"{kilowatts:.3f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class PlainConnector:
    station: str
    device: str
    connector: str
    number: Any
    maxchspeed: Any  # as the JSON has it
    speed: str
    state: str
    simplified: str


@dataclass
class PlainPlacemark:
    name: str
    address: str
    longitude: float
    latitude: float
    description: str
    style: str
    cpnum: str
    devices: list[dict[str, Any]]
    connectors: list[PlainConnector] = field(default_factory=list)


@dataclass
class PlainFeed:
    """A KML document read plainly; `.connectors` has what conftest.assert_matches_feed compares."""

    document_name: str
    placemarks: list[PlainPlacemark]

    @property
    def connectors(self) -> list[PlainConnector]:
        return [c for p in self.placemarks for c in p.connectors]


def read_kml(data: bytes) -> PlainFeed:
    root = ET.fromstring(data)
    document = root.find(f"{KML}Document")
    assert document is not None
    placemarks = []
    for node in document.iter(f"{KML}Placemark"):
        name = (node.findtext(f"{KML}name") or "").strip()
        devices = []
        cpnum = ""
        for data_node in node.iter(f"{KML}Data"):
            value = data_node.findtext(f"{KML}value") or ""
            if data_node.get("name") == "chargingdevice":
                devices.append(json.loads(value))
            elif data_node.get("name") == "CPnum":
                cpnum = value.strip()
        longitude, latitude, *_ = (node.findtext(f"{KML}Point/{KML}coordinates") or "").strip().split(",")
        placemark = PlainPlacemark(
            name=name,
            address=(node.findtext(f"{KML}address") or "").strip(),
            longitude=float(longitude),
            latitude=float(latitude),
            description=node.findtext(f"{KML}description") or "",
            style=node.findtext(f"{KML}styleUrl") or "",
            cpnum=cpnum,
            devices=devices,
        )
        for device in devices:
            for connector in device["connectors"]:
                placemark.connectors.append(
                    PlainConnector(
                        station=name,
                        device=device["name"],
                        connector=connector["name"],
                        number=connector.get("connector"),
                        maxchspeed=connector.get("maxchspeed"),
                        speed=speed_label(connector.get("maxchspeed")),
                        state=connector["description"],
                        simplified=SIMPLIFIED.get(connector["description"], "unavailable"),
                    )
                )
        placemarks.append(placemark)
    return PlainFeed((document.findtext(f"{KML}name") or "").strip(), placemarks)


def description_counts(description: str) -> list[tuple[int, int, int, int]]:
    """(whole kW, connectors, available, occupied) per group of the HTML description; the whole text must parse."""
    groups = DESCRIPTION_GROUP.findall(description)
    assert "".join(m.group(0) for m in DESCRIPTION_GROUP.finditer(description)) == description, description
    return [(int(kw), int(total), int(available), int(occupied)) for total, kw, available, occupied in groups]


def counts_from_json(placemark: PlainPlacemark) -> list[tuple[int, int, int, int]]:
    groups: dict[int, Counter[str]] = {}
    for c in placemark.connectors:
        group = groups.setdefault(math.floor(float(c.maxchspeed)), Counter())
        group["total"] += 1
        group["available" if c.state == "AVAILABLE" else "occupied"] += 1
    return [(kw, g["total"], g["available"], g["occupied"]) for kw, g in sorted(groups.items())]


def by_station(connectors: list[PlainConnector]) -> dict[str, Counter[str]]:
    counts: dict[str, Counter[str]] = {}
    for c in connectors:
        counts.setdefault(c.station, Counter())[c.simplified] += 1
    return counts


capture = pytest.mark.parametrize("path", CAPTURES or [Path("absent.kml")], ids=lambda p: p.stem)


# ---- the captures themselves: what the generator imitates ---------------------------------------------------------


@needs_captures
@capture
def test_a_capture_is_internally_consistent(path: Path) -> None:
    """What tests/feedgen.py copies the shape of: the description's counts, CPnum and numberOfConnectors agree with
    the devices' JSON, in every capture."""
    feed = read_kml(path.read_bytes())
    assert feed.placemarks
    for placemark in feed.placemarks:
        assert description_counts(placemark.description) == counts_from_json(placemark), placemark.name
        assert int(placemark.cpnum) == len(placemark.connectors)
        assert all(d["numberOfConnectors"] == len(d["connectors"]) for d in placemark.devices)
        available = any(c.state == "AVAILABLE" for c in placemark.connectors)
        assert placemark.style == ("#AVAILABLE" if available else "#UNAVAILABLE")


# ---- the parser -------------------------------------------------------------------------------------------------


@needs_captures
@capture
def test_the_parser_reads_every_connector_of_a_real_capture(path: Path) -> None:
    data = path.read_bytes()
    plain = read_kml(data)
    snapshot = parse_kml(data)

    assert dict(snapshot.skipped) == {}, "nothing of a real answer may be dropped"
    assert [s.name for s in snapshot.stations] == [p.name for p in plain.placemarks]
    assert [[d.name for d in s.devices] for s in snapshot.stations] == [
        [d["name"] for d in p.devices] for p in plain.placemarks
    ]
    assert [(s.address, s.latitude, s.longitude) for s in snapshot.stations] == [
        (p.address, p.latitude, p.longitude) for p in plain.placemarks
    ]
    got = [
        (row.station.name, row.device.name, row.connector.name, row.connector.speed, row.connector.raw_state,
         row.connector.state)
        for row in snapshot.rows()
    ]  # fmt: skip
    assert got == [(c.station, c.device, c.connector, c.speed, c.state, c.simplified) for c in plain.connectors]
    got_by_station: dict[str, Counter[str]] = {}
    for row in snapshot.rows():
        got_by_station.setdefault(row.station.name, Counter())[row.connector.state] += 1
    assert got_by_station == by_station(plain.connectors)
    assert snapshot.device_count == sum(len(p.devices) for p in plain.placemarks)


@needs_captures
def test_connector_names_are_taken_as_written_not_rebuilt_from_numbers() -> None:
    """The live feed has devices whose connector 1 is named `… - 2`: the label is the name."""
    swapped = [
        c
        for path in CAPTURES
        for c in read_kml(path.read_bytes()).connectors
        if c.connector != f"{c.device} - {c.number}"
    ]
    assert swapped, "the captures hold connectors named against their number"
    for path in CAPTURES:
        data = path.read_bytes()
        names = {(row.device.name, row.connector.name) for row in parse_kml(data).rows()}
        for c in read_kml(data).connectors:
            assert (c.device, c.connector) in names


# ---- the real process over HTTP ---------------------------------------------------------------------------------


@needs_captures
@capture
@pytest.mark.e2e
def test_the_exporter_serves_a_real_capture(path: Path, exporter_process: Callable[..., ExporterProcess]) -> None:
    plain = read_kml(path.read_bytes())
    exporter = exporter_process("--kml-url", str(path))
    exposition = exporter.wait_until_up()

    assert_matches_feed(exposition, plain)
    assert exposition.value("chargy_stations") == len(plain.placemarks)
    assert exposition.value("chargy_devices") == sum(len(p.devices) for p in plain.placemarks)
    assert exposition.value("chargy_connectors") == len(plain.connectors)
    places = {
        (s.labels["station"], s.labels["address"], float(s.labels["latitude"]), float(s.labels["longitude"]))
        for s in exposition.samples("chargy_station_info")
    }
    assert places == {(p.name, p.address, p.latitude, p.longitude) for p in plain.placemarks}
    # The users' first PromQL example, by hand: connectors of each station by state.
    got: dict[str, Counter[str]] = {}
    for sample in exposition.samples("chargy_connector_state"):
        if sample.value:
            got.setdefault(sample.labels["station"], Counter())[sample.labels["chargy_connector_state"]] += 1
    assert got == by_station(plain.connectors)
    assert not [s for s in exposition.samples("chargy_feed_skipped_records_total") if s.value], "nothing skipped"
