"""Property tests of the parser: whatever bytes come in, a Snapshot or a KmlError comes out, never anything else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from feedgen import generate_feed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chargy_exporter.kml import (
    MAX_DEVICE_JSON,
    MAX_XML_NODES,
    KmlError,
    parse_kml,
)
from chargy_exporter.model import KML_ERROR_REASONS, MAX_CONNECTORS, SKIP_REASONS, Snapshot

SAMPLE = (Path(__file__).resolve().parents[1] / "src" / "chargy_exporter" / "data" / "sample-feed.kml").read_bytes()
VALID = generate_feed(stations=12, seed=21, odd_shapes=True).kml
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(document: bytes) -> Snapshot | KmlError:
    """parse_kml's result; any exception other than KmlError fails the test."""
    try:
        snapshot = parse_kml(document)
    except KmlError as error:
        assert error.reason in KML_ERROR_REASONS
        assert str(error)
        return error
    assert isinstance(snapshot, Snapshot)
    assert snapshot.stations, "an empty snapshot must be an empty_feed error"
    assert set(snapshot.skipped) <= set(SKIP_REASONS)
    for row in snapshot.rows():  # every exported field has the type the metrics need
        assert isinstance(row.station.name, str) and isinstance(row.device.name, str)
        assert isinstance(row.connector.name, str) and row.connector.name
        assert isinstance(row.connector.raw_state, str) and row.connector.raw_state
        assert row.connector.state in ("available", "charging", "unavailable")
        assert isinstance(row.connector.speed, str)
    return snapshot


@PROPERTY_SETTINGS
@given(st.binary(max_size=4096))
def test_any_bytes(document: bytes) -> None:
    outcome(document)


XML_TOKENS = st.sampled_from(
    [
        "<kml>", "</kml>", '<kml xmlns="http://www.opengis.net/kml/2.2">', "<Document>", "</Document>", "<Document/>",
        "<Placemark>", "</Placemark>", "<name>", "</name>", "<ExtendedData>", "</ExtendedData>",
        '<Data name="chargingdevice">', '<Data name="CPnum">', "</Data>", "<value>", "</value>", "<Point>",
        "</Point>", "<coordinates>", "</coordinates>", "6.1,49.6", "&amp;", "&lt;", "&#0;", "&#x41;", "<![CDATA[",
        "]]>", "<!-- x -->", '<?xml version="1.0"?>', "<!DOCTYPE kml>", '<!ENTITY a "b">', "&a;", "{", "}", "[", "]",
        '"connectors":', '"name":"CP1"', '"description":"AVAILABLE"', "null", "1e999", ",", ":", "\x00", "é",
    ]
)  # fmt: skip


@PROPERTY_SETTINGS
@given(st.lists(st.one_of(XML_TOKENS, st.text(max_size=8)), max_size=60))
def test_xml_like_token_soup(tokens: list[str]) -> None:
    outcome("".join(tokens).encode("utf-8", "surrogatepass"))


@PROPERTY_SETTINGS
@given(st.integers(min_value=0, max_value=len(VALID)))
def test_truncated_feed(cut: int) -> None:
    result = outcome(VALID[:cut])
    if cut < len(VALID.rstrip()):
        assert isinstance(result, KmlError)


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(VALID) - 1), st.integers(0, 255)), max_size=20))
def test_byte_flips(flips: list[tuple[int, int]]) -> None:
    document = bytearray(VALID)
    for position, value in flips:
        document[position] = value
    outcome(bytes(document))


@PROPERTY_SETTINGS
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=len(SAMPLE)))
def test_inserted_garbage(garbage: bytes, position: int) -> None:
    outcome(SAMPLE[:position] + garbage + SAMPLE[position:])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
CONNECTOR_KEYS = ("id", "name", "maxchspeed", "connector", "description")


@st.composite
def device_values(draw: st.DrawFn) -> str:
    """A device `value`: random JSON, or a realistic device with random JSON in some of its fields, or not JSON."""
    kind = draw(st.sampled_from(["random", "mutated", "text"]))
    if kind == "random":
        return json.dumps(draw(JSON_VALUES))
    if kind == "text":
        return draw(st.text(max_size=40))
    device: dict[str, Any] = {
        "id": 1,
        "name": draw(st.one_of(st.just("CP1"), JSON_VALUES)),
        "numberOfConnectors": 2,
        "connectors": [
            {key: draw(st.one_of(st.just(value), JSON_VALUES)) for key, value in zip(
                CONNECTOR_KEYS, (10 + n, f"CP1 - {n}", 22.0, n, "AVAILABLE"), strict=True)}
            for n in (1, 2)
        ],
    }  # fmt: skip
    if draw(st.booleans()):
        device["connectors"] = draw(st.one_of(st.just(device["connectors"]), JSON_VALUES))
    return json.dumps(device, allow_nan=True)


def _escape(text: str) -> str:
    cleaned = "".join(ch for ch in text if ch in "\t\n\r" or (ch >= " " and not 0xD800 <= ord(ch) <= 0xDFFF))
    cleaned = "".join(ch for ch in cleaned if ch not in "\ufffe\uffff")
    return cleaned.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@PROPERTY_SETTINGS
@given(st.lists(device_values(), min_size=1, max_size=4), st.text(max_size=30))
def test_random_json_in_device_values(values: list[str], station_name: str) -> None:
    data = "".join(f'<Data name="chargingdevice"><value>{_escape(v)}</value></Data>' for v in values)
    document = (
        '<kml xmlns="http://www.opengis.net/kml/2.2"><Document><Placemark>'
        f"<name>{_escape(station_name)}</name><ExtendedData>{data}</ExtendedData>"
        "<Point><coordinates>6.1,49.6</coordinates></Point></Placemark></Document></kml>"
    ).encode()
    result = outcome(document)
    assert isinstance(result, Snapshot), "a Placemark with bad devices is still a station"
    assert len(result.stations) == 1


def test_valid_feeds_parse_completely() -> None:
    for seed in range(5):
        feed = generate_feed(stations=25, seed=seed, odd_shapes=True)
        snapshot = parse_kml(feed.kml)
        got = {(r.connector.name, r.connector.raw_state, r.connector.speed) for r in snapshot.rows()}
        assert got == {(c.connector, c.state, c.speed) for c in feed.connectors}
        assert not snapshot.skipped


def test_external_dtd_is_not_loaded(tmp_path: Path) -> None:
    """A DOCTYPE naming an external DTD (no entity declared inline): expat does not fetch it."""
    marker = "DTD-MARKER-51c0e7"
    dtd = tmp_path / "evil.dtd"
    dtd.write_text(f'<!ENTITY leak "{marker}">')
    document = (
        f'<?xml version="1.0"?><!DOCTYPE kml SYSTEM "{dtd.as_uri()}">'
        '<kml xmlns="http://www.opengis.net/kml/2.2"><Document><Placemark><name>a</name></Placemark>'
        "</Document></kml>"
    ).encode()
    result = outcome(document)
    assert marker not in repr(result)


def test_declared_encodings_python_cannot_read_are_malformed_xml() -> None:
    """Found by test_byte_flips: a flipped byte in encoding="UTF-8" made pyexpat raise LookupError."""
    for encoding in ("UTF-9", "rot13", "hex", "idna", "utf-32", "utf_7", "punycode"):
        result = outcome(f'<?xml version="1.0" encoding="{encoding}"?><kml><Document/></kml>'.encode())
        assert isinstance(result, KmlError) and result.reason == "malformed_xml", encoding


def test_limits_refuse_documents_that_would_hold_too_much() -> None:
    head, tail = b'<kml xmlns="http://www.opengis.net/kml/2.2"><Document>', b"</Document></kml>"
    junk = outcome(head + b'<x a="1"/>' * (MAX_XML_NODES // 2 + 1) + tail)
    assert isinstance(junk, KmlError) and junk.reason == "too_many_records"

    devices = "".join(
        '<Data name="chargingdevice"><value>'
        + json.dumps(
            {"name": f"CP{d}", "connectors": [{"name": f"CP{d} - {n}", "description": "A"} for n in range(50)]}
        )
        + "</value></Data>"
        for d in range(MAX_CONNECTORS // 50 + 1)
    )
    many = outcome(head + f"<Placemark><ExtendedData>{devices}</ExtendedData></Placemark>".encode() + tail)
    assert isinstance(many, KmlError) and many.reason == "too_many_records"


def test_an_oversized_device_value_is_skipped() -> None:
    big = json.dumps({"name": "CP9", "connectors": [{"name": "CP9 - 1", "description": "X" * MAX_DEVICE_JSON}]})
    small = json.dumps({"name": "CP1", "connectors": [{"name": "CP1 - 1", "description": "AVAILABLE"}]})
    document = (
        '<kml xmlns="http://www.opengis.net/kml/2.2"><Document><Placemark><name>s</name><ExtendedData>'
        f'<Data name="chargingdevice"><value>{big}</value></Data>'
        f'<Data name="chargingdevice"><value>{small}</value></Data>'
        "</ExtendedData></Placemark></Document></kml>"
    ).encode()
    result = outcome(document)
    assert isinstance(result, Snapshot)
    assert [row.connector.name for row in result.rows()] == ["CP1 - 1"]
    assert result.skipped == {"invalid_device": 1}


def test_unused_elements_are_dropped_but_the_feed_is_intact() -> None:
    """The parser keeps only what the model reads; styles, descriptions and foreign namespaces are dropped."""
    feed = generate_feed(stations=40, seed=3, odd_shapes=True)
    snapshot = parse_kml(feed.kml)
    assert {s.name for s in snapshot.stations} == {s.name for s in feed.stations}
    assert {(s.address, s.latitude, s.longitude) for s in snapshot.stations} == {
        (s.address, s.latitude, s.longitude) for s in feed.stations
    }
