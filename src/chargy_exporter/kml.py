"""Parse the Chargy KML document into a `Snapshot`.

The document is untrusted: entity declarations (billion laughs, XXE) are refused by the XML parser, and every
field below `Placemark` is checked for shape. One bad device or connector is skipped and counted; only a
document that is not a usable KML feed at all raises `KmlError`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final
from xml.parsers.expat import ExpatError

import xmltodict

# Re-exported until metrics.py imports them from model, where the reason vocabulary lives.
from .model import MAX_CONNECTORS, Connector, Device, Snapshot, Station

KML_NAMESPACE: Final = "http://www.opengis.net/kml/2.2"
# Bounds on what one document may make the exporter hold (the byte cap alone does not bound it: 20 MiB of
# `<x a="1"/>` is 2 million dicts; 20 MiB of minimal connector JSON is 500,000 connectors, ~8 GB of series).
# The real feed has ~20,000 XML elements and attributes, ~1,700 connectors, device values of ~500 bytes; the limits
# leave room for a network ten times larger (a feed at the connector limit peaks near 430 MB). The connector limit
# is --max-connectors; the element budget grows with it (the real feed has ~12 elements and attributes a connector).
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


class _TooManyNodes(Exception):
    pass


class _Skipped(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_kml(document: bytes, max_connectors: int = MAX_CONNECTORS) -> Snapshot:
    """Build a snapshot from a KML document, or raise `KmlError` saying why the document is unusable."""
    root = _parse_xml(document, max(MAX_XML_NODES, XML_NODES_PER_CONNECTOR * max_connectors))
    kml = root.get("kml")
    if not isinstance(kml, dict):
        found = next(iter(root), "nothing")
        raise KmlError("not_kml", f"the document is not KML (root element: {found!r})")
    kml_document = kml.get("Document")
    if kml_document is None:
        kml_document = {}
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
    budget = max_nodes

    def keep_what_is_used(path: list[Any], key: str, value: Any) -> tuple[str, Any] | None:
        # Called for every element and attribute as it is read: count them, drop what the feed model never reads.
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise _TooManyNodes
        return (key, value) if key in _KEPT or len(path) <= 1 else None

    try:
        parsed = xmltodict.parse(
            document,
            process_namespaces=True,
            namespaces={KML_NAMESPACE: None},
            force_list=("Placemark", "Data"),
            disable_entities=True,
            postprocessor=keep_what_is_used,
        )
    except _TooManyNodes:
        raise KmlError("too_many_records", f"the document has over {max_nodes} XML elements, refused") from None
    except (LookupError, UnicodeError) as error:
        # The XML declaration names an encoding Python does not know, or one that is not a text encoding.
        raise KmlError("malformed_xml", f"the document's encoding cannot be read ({error})") from None
    except ValueError as error:
        # xmltodict raises ValueError("entities are disabled") on any <!ENTITY> declaration; pyexpat raises
        # ValueError("multi-byte encodings are not supported") for a declared encoding such as utf-32.
        if "entities" not in str(error):
            raise KmlError("malformed_xml", f"the document cannot be read ({error})") from None
        raise KmlError("forbidden_xml", f"the document declares XML entities, which are refused ({error})") from None
    except ExpatError as error:
        raise KmlError("malformed_xml", f"the document is not well-formed XML ({error})") from None
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
            skipped[skip.reason] += 1
    return Station(
        name=_text(placemark.get("name")),
        address=_text(placemark.get("address")),
        latitude=latitude,
        longitude=longitude,
        devices=tuple(devices),
    )


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
    name = device.get("name")
    connectors = device.get("connectors")
    if not isinstance(name, str) or not name.strip() or not isinstance(connectors, list):
        raise _Skipped("invalid_device")

    parsed = []
    for raw in connectors:
        try:
            connector = _connector(raw)
        except _Skipped as skip:
            skipped[skip.reason] += 1
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
    return Connector(
        name=name.strip(),
        max_speed_kw=_kilowatts(raw.get("maxchspeed")),
        raw_state=state.strip(),
    )


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
    if not isinstance(point, dict):
        return None, None
    parts = _text(point.get("coordinates")).split(",")
    try:
        longitude, latitude = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        return None, None
    if not (-90 <= latitude <= 90 and -180 <= longitude <= 180):
        return None, None
    return latitude, longitude


def _text(node: Any) -> str:
    if isinstance(node, str):
        return node.strip()
    if isinstance(node, dict) and isinstance(node.get("#text"), str):
        return str(node["#text"]).strip()
    return ""
