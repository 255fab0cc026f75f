"""kml.py: every shape the feed can take becomes the right model, and unusable documents a clear KmlError."""

from __future__ import annotations

import json

import pytest
from feedgen import generate_feed

from chargy_exporter.config import DEMO_FEED_PATH
from chargy_exporter.kml import KmlError, parse_kml

# The package bundles shared/feed-sample.kml for --demo: the same bytes, so no need for shared/ beside the clone.
SAMPLE = DEMO_FEED_PATH.read_bytes()


def rows(snapshot):  # (station, device, connector, speed, raw state, simplified)
    return [
        (r.station.name, r.device.name, r.connector.name, r.connector.speed, r.connector.raw_state, r.connector.state)
        for r in snapshot.rows()
    ]


def kml(*placemarks: str, prefix: str = "") -> bytes:
    ns = f'xmlns{":" + prefix if prefix else ""}="http://www.opengis.net/kml/2.2"'
    p = f"{prefix}:" if prefix else ""
    body = "".join(placemarks).replace("<", f"<{p}").replace(f"<{p}/", f"</{p}")
    return f'<?xml version="1.0" encoding="UTF-8"?><{p}kml {ns}><{p}Document>{body}</{p}Document></{p}kml>'.encode()


def placemark(name: str = "Station", *devices: str | dict, coordinates: str = "6.1,49.6") -> str:
    data = "".join(
        f'<Data name="chargingdevice"><value>{json.dumps(d) if isinstance(d, dict) else d}</value></Data>'
        for d in devices
    )
    return (
        f"<Placemark><name>{name}</name><address>1 Rue, Town</address><ExtendedData>"
        f'<Data name="CPnum"><value>2</value></Data>{data}</ExtendedData>'
        f"<Point><coordinates>{coordinates}</coordinates></Point></Placemark>"
    )


def device(name: str, *connectors: dict) -> dict:
    return {"id": 1, "name": name, "numberOfConnectors": len(connectors), "connectors": list(connectors)}


def connector(name: str, state: str | None = "AVAILABLE", speed: object = 22.0) -> dict:
    return {"id": 2, "name": name, "maxchspeed": speed, "connector": 1, "description": state}


def test_the_shared_sample_feed():
    snapshot = parse_kml(SAMPLE)
    assert rows(snapshot) == [
        ("Schuttrange - Parking Eglise", "CP4112", "CP4112 - 1", "22", "AVAILABLE", "available"),
        ("Schuttrange - Parking Eglise", "CP4112", "CP4112 - 2", "22", "SUSPENDED_EV", "charging"),
        ("Esch-sur-Alzette - Parking souterrain Brill - Place de la Résistance", "CP5007", "CP5007 - 1", "22",
         "CHARGING", "charging"),
        ("Esch-sur-Alzette - Parking souterrain Brill - Place de la Résistance", "CP5007", "CP5007 - 2", "22",
         "OFFLINE", "unavailable"),
        ("Esch-sur-Alzette - Parking souterrain Brill - Place de la Résistance", "CP5008", "CP5008 - 1", "22",
         "PREPARING", "charging"),
        ("Esch-sur-Alzette - Parking souterrain Brill - Place de la Résistance", "CP5008", "CP5008 - 2", "22",
         "FAULTED", "unavailable"),
        ("SuperChargy Mersch - P&R Gare", "CP8021", "CP8021 - 1", "175", "AVAILABLE", "available"),
        ("SuperChargy Mersch - P&R Gare", "CP8021", "CP8021 - 2", "7.4", "MAINTENANCE", "unavailable"),
    ]  # fmt: skip
    first = snapshot.stations[0]
    assert (first.address, first.latitude, first.longitude) == (
        "Rue de l'Eglise, 5366 Schuttrange",
        49.623866,
        6.268376,
    )
    assert dict(snapshot.skipped) == {}


def test_a_single_placemark_with_a_single_device():
    snapshot = parse_kml(kml(placemark("Only", device("CP1", connector("CP1 - 1")))))
    assert rows(snapshot) == [("Only", "CP1", "CP1 - 1", "22", "AVAILABLE", "available")]


def test_a_station_without_devices_is_kept_with_no_connectors():
    snapshot = parse_kml(kml(placemark("Empty"), placemark("Full", device("CP1", connector("CP1 - 1")))))
    assert [s.name for s in snapshot.stations] == ["Empty", "Full"]
    assert snapshot.stations[0].devices == ()
    assert snapshot.connector_count == 1


@pytest.mark.parametrize(
    ("speed", "label"),
    [(22.0, "22"), (7.4, "7.4"), (175, "175"), ("22.0", "22"), ("11", "11"), (None, ""), ("fast", ""), (-3, "")],
)
def test_speed_as_number_string_null_or_garbage(speed, label):
    snapshot = parse_kml(kml(placemark("S", device("CP1", connector("CP1 - 1", speed=speed)))))
    assert rows(snapshot)[0][3] == label


def test_a_missing_speed_key():
    raw = {"id": 2, "name": "CP1 - 1", "connector": 1, "description": "CHARGING"}
    snapshot = parse_kml(kml(placemark("S", device("CP1", raw))))
    assert rows(snapshot) == [("S", "CP1", "CP1 - 1", "", "CHARGING", "charging")]


def test_malformed_json_skips_only_that_device_and_counts_it():
    good = device("CP2", connector("CP2 - 1"))
    snapshot = parse_kml(kml(placemark("S", '{"id": 1, "name": "CP1", "connectors": [', good)))
    assert [r[2] for r in rows(snapshot)] == ["CP2 - 1"]
    assert snapshot.skipped["malformed_device_json"] == 1


def test_unknown_states_are_unavailable_and_keep_their_raw_value():
    snapshot = parse_kml(kml(placemark("S", device("CP1", connector("CP1 - 1", "BRAND_NEW_STATE")))))
    assert rows(snapshot)[0][4:] == ("BRAND_NEW_STATE", "unavailable")


@pytest.mark.parametrize("state", [None, "", "   ", 3])
def test_a_connector_without_a_state_is_skipped_and_counted(state):
    snapshot = parse_kml(kml(placemark("S", device("CP1", connector("CP1 - 1", state), connector("CP1 - 2")))))
    assert [r[2] for r in rows(snapshot)] == ["CP1 - 2"]
    assert snapshot.skipped["connector_without_state"] == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [("[1, 2]", "invalid_device"), ('{"name": "CP1"}', "invalid_device"), ('{"connectors": []}', "invalid_device")],
)
def test_devices_of_the_wrong_shape_are_skipped(value, reason):
    snapshot = parse_kml(kml(placemark("S", value, device("CP2", connector("CP2 - 1")))))
    assert snapshot.skipped[reason] == 1
    assert snapshot.connector_count == 1


def test_a_repeated_connector_is_exported_once_and_counted():
    snapshot = parse_kml(
        kml(placemark("A", device("CP1", connector("CP1 - 1"))), placemark("B", device("CP1", connector("CP1 - 1"))))
    )
    assert [r[0] for r in rows(snapshot)] == ["A"]
    assert snapshot.skipped["duplicate_connector"] == 1


def test_station_names_need_not_be_unique():
    snapshot = parse_kml(
        kml(
            placemark("Same", device("CP1", connector("CP1 - 1"))),
            placemark("Same", device("CP2", connector("CP2 - 1"))),
        )
    )
    assert [(r[0], r[2]) for r in rows(snapshot)] == [("Same", "CP1 - 1"), ("Same", "CP2 - 1")]


def test_a_namespace_prefix_does_not_matter():
    snapshot = parse_kml(kml(placemark("P", device("CP1", connector("CP1 - 1"))), prefix="k"))
    assert rows(snapshot) == [("P", "CP1", "CP1 - 1", "22", "AVAILABLE", "available")]


@pytest.mark.parametrize("namespace", ['xmlns="http://earth.google.com/kml/2.2"', ""])
def test_google_s_earlier_kml_namespace_or_none_reads_the_same(namespace):
    document = kml(placemark("P", device("CP1", connector("CP1 - 1"))))
    document = document.replace(b'xmlns="http://www.opengis.net/kml/2.2"', namespace.encode())
    assert rows(parse_kml(document)) == [("P", "CP1", "CP1 - 1", "22", "AVAILABLE", "available")]


@pytest.mark.parametrize(
    ("coordinates", "expected"),
    [("6.1,49.6,0", (49.6, 6.1)), ("", (None, None)), ("abc,def", (None, None)), ("6.1,149.6", (None, None))],
)
def test_coordinates_are_lon_lat(coordinates, expected):
    station = parse_kml(kml(placemark("S", coordinates=coordinates))).stations[0]
    assert (station.latitude, station.longitude) == expected


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (b"", "malformed_xml"),
        (b"<kml><Document><Placemark>", "malformed_xml"),
        (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "not_kml"),
        (b'{"stations": []}', "malformed_xml"),
        (kml(), "empty_feed"),
        (b'<kml xmlns="http://www.opengis.net/kml/2.2"/>', "empty_feed"),
        (b'<!DOCTYPE kml [<!ENTITY a "aaaa">]><kml><Document><name>&a;</name></Document></kml>', "forbidden_xml"),
        (
            b'<!DOCTYPE kml [<!ENTITY x SYSTEM "file:///etc/passwd">]><kml><Document>&x;</Document></kml>',
            "forbidden_xml",
        ),
    ],
)
def test_unusable_documents_raise_a_clear_error(document, reason):
    with pytest.raises(KmlError) as raised:
        parse_kml(document)
    assert raised.value.reason == reason
    assert str(raised.value)


def test_a_generated_production_size_feed_is_parsed_completely():
    feed = generate_feed(connectors=1700, seed=3, odd_shapes=True)
    snapshot = parse_kml(feed.kml)
    expected = sorted((c.station, c.device, c.connector, c.speed, c.state, c.simplified) for c in feed.connectors)
    assert sorted(rows(snapshot)) == expected
    assert len(snapshot.stations) == len(feed.stations)


def test_the_connector_limit_is_a_parameter():
    feed = generate_feed(stations=30, seed=9)
    with pytest.raises(KmlError) as raised:
        parse_kml(feed.kml, max_connectors=len(feed.connectors) - 1)
    assert raised.value.reason == "too_many_records" and "--max-connectors" in str(raised.value)
    assert parse_kml(feed.kml, max_connectors=len(feed.connectors)).connector_count == len(feed.connectors)
