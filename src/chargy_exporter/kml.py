"""Parse the Chargy KML document into a `Snapshot`. The document is untrusted: entity declarations (billion laughs,
XXE) are refused and every field below `Placemark` is checked for shape. A bad device or connector is skipped and
counted; only a document that is not a usable feed at all raises `KmlError`."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final
from xml.parsers.expat import ExpatError

import xmltodict

from .model import MAX_CONNECTORS, Connector, Device, Snapshot, Station

# What one document may make the exporter hold: the byte cap alone does not bound it (20 MiB of `<x a="1"/>` is
# 2 million dicts). The real feed has ~20,000 elements and attributes (~12 a connector) and device values of ~500
# bytes: ten times that fits. The element budget grows with --max-connectors.
MAX_XML_NODES: Final = 500_000
XML_NODES_PER_CONNECTOR: Final = 25
MAX_DEVICE_JSON: Final = 64 * 1024
# Only these elements and attributes are kept below the root while parsing; the rest is dropped as it is read.
_KEPT: Final = frozenset(
    {"kml", "Document", "Placemark", "name", "address", "ExtendedData", "Data", "value", "Point", "coordinates"}
    | {"@name", "#text"}
)


class KmlError(Exception):
    """The document cannot be used as a feed; `reason` is a short label for the error counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Skipped(Exception):
    """A record dropped from an otherwise good feed; its one argument is the reason (one of SKIP_REASONS)."""


def parse_kml(document: bytes, max_connectors: int = MAX_CONNECTORS) -> Snapshot:
    """Build a snapshot from a KML document, or raise `KmlError` saying why the document is unusable."""
    root = _parse_xml(document, max(MAX_XML_NODES, XML_NODES_PER_CONNECTOR * max_connectors))
    kml = root.get("kml")
    if not isinstance(kml, dict):
        found = next(iter(root), "nothing")
        raise KmlError("not_kml", f"the document is not KML (root element: {found!r})")
    kml_document = kml.get("Document") or {}
    if not isinstance(kml_document, dict):
        raise KmlError("not_kml", "the KML has no usable <Document>")

    skipped: Counter[str] = Counter()
    seen_connectors: set[str] = set()
    stations = []
    for placemark in kml_document.get("Placemark") or ():
        if not isinstance(placemark, dict):
            skipped["invalid_placemark"] += 1
            continue
        stations.append(_station(placemark, skipped, seen_connectors, max_connectors))

    if not stations:
        # The real network never has zero stations: an empty document is an upstream fault, not a fact to publish.
        raise KmlError("empty_feed", "the feed contains no stations")
    return Snapshot(stations=tuple(stations), skipped=MappingProxyType(dict(skipped)))


def _parse_xml(document: bytes, max_nodes: int) -> dict[str, Any]:
    nodes = itertools.count(1)

    def keep_what_is_used(path: list[Any], key: str, value: Any) -> tuple[str, Any] | None:
        # Called for every element and attribute as it is read: count them, drop what the feed model never reads.
        if next(nodes) > max_nodes:
            raise KmlError("too_many_records", f"the document has over {max_nodes} XML elements, refused")
        if key[0] != "@":
            key = key.rpartition(":")[2]  # kml:Placemark: read by its local name, whatever prefix the KML has
        return (key, value) if key in _KEPT or len(path) <= 1 else None

    try:
        parsed = xmltodict.parse(
            document, force_list=("Placemark", "Data"), disable_entities=True, postprocessor=keep_what_is_used
        )
    except (ExpatError, ValueError, LookupError) as error:
        # xmltodict raises ValueError("entities are disabled") on any <!ENTITY>; an unreadable declared encoding
        # is a LookupError, a UnicodeError or pyexpat's ValueError("multi-byte encodings are not supported").
        if isinstance(error, ValueError) and "entities" in str(error):
            raise KmlError("forbidden_xml", f"the document declares XML entities, refused ({error})") from None
        raise KmlError("malformed_xml", f"the document cannot be read as XML ({error})") from None
    if not isinstance(parsed, dict) or not parsed:
        raise KmlError("malformed_xml", "the document is empty")
    return parsed


def _station(
    placemark: Mapping[str, Any], skipped: Counter[str], seen_connectors: set[str], max_connectors: int
) -> Station:
    latitude, longitude = _coordinates(placemark.get("Point"))
    devices = []
    extended = placemark.get("ExtendedData")
    data_items = extended.get("Data") if isinstance(extended, dict) else None
    for data in data_items or ():
        if not isinstance(data, dict) or data.get("@name") != "chargingdevice":
            continue
        try:
            devices.append(_device(data.get("value"), skipped, seen_connectors, max_connectors))
        except _Skipped as skip:
            skipped[skip.args[0]] += 1
    return Station(_text(placemark.get("name")), _text(placemark.get("address")), latitude, longitude, tuple(devices))


def _device(value: Any, skipped: Counter[str], seen_connectors: set[str], max_connectors: int) -> Device:
    if not isinstance(value, str):
        raise _Skipped("malformed_device_json")
    if len(value) > MAX_DEVICE_JSON:
        raise _Skipped("invalid_device")
    try:
        device = json.loads(value)
    except (ValueError, RecursionError):
        raise _Skipped("malformed_device_json") from None
    if not isinstance(device, dict):
        raise _Skipped("invalid_device")
    name, connectors = device.get("name"), device.get("connectors")
    if not isinstance(name, str) or not name.strip() or not isinstance(connectors, list):
        raise _Skipped("invalid_device")
    parsed = []
    for raw in connectors:
        try:
            connector = _connector(raw)
        except _Skipped as skip:
            skipped[skip.args[0]] += 1
            continue
        if connector.name in seen_connectors:
            # Two series with the same identity would be merged by the SDK; keep the first, say so.
            skipped["duplicate_connector"] += 1
            continue
        if len(seen_connectors) >= max_connectors:
            raise KmlError("too_many_records", f"the feed has over {max_connectors} connectors (--max-connectors)")
        seen_connectors.add(connector.name)
        parsed.append(connector)
    return Device(name=name.strip(), connectors=tuple(parsed))


def _connector(raw: Any) -> Connector:
    if not isinstance(raw, dict):
        raise _Skipped("invalid_connector")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _Skipped("connector_without_name")
    state = raw.get("description")
    if not isinstance(state, str) or not state.strip():
        raise _Skipped("connector_without_state")
    return Connector(name=name.strip(), max_speed_kw=_kilowatts(raw.get("maxchspeed")), raw_state=state.strip())


def _kilowatts(value: Any) -> float | None:
    """`maxchspeed` as a positive finite float, whether the feed wrote it as a number or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        kilowatts = float(value)
    except ValueError:
        return None
    return kilowatts if math.isfinite(kilowatts) and kilowatts > 0 else None


def _coordinates(point: Any) -> tuple[float | None, float | None]:
    """KML writes "lon,lat[,alt]"; returns (latitude, longitude), or Nones when absent or out of range."""
    parts = _text(point.get("coordinates")).split(",") if isinstance(point, dict) else []
    try:
        longitude, latitude = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        return None, None
    return (latitude, longitude) if -90 <= latitude <= 90 and -180 <= longitude <= 180 else (None, None)


def _text(node: Any) -> str:
    """An element's text, whether xmltodict gave it as a string or, with attributes, under "#text"."""
    if isinstance(node, dict):
        node = node.get("#text")
    return node.strip() if isinstance(node, str) else ""
