"""tests/feedgen.py makes feeds shaped like the live one (shared/README.md, "Facts of the live feed").

The generated documents are read back plainly (test_real_captures.read_kml: ElementTree and json), so these tests
check what the document says, not what the generator believes it wrote.
"""

from __future__ import annotations

from collections import Counter

import pytest
from feedgen import GeneratedFeed, evolve, generate_feed
from test_real_captures import DESCRIPTION_GROUP, PlainFeed, counts_from_json, description_counts, read_kml

LIVE_STATES = {"AVAILABLE", "CHARGING", "OFFLINE", "UNAVAILABLE", "PREPARING", "FINISHING", "SUSPENDED_EVSE", "FAULT"}
AC_SPEEDS = {22.0, 22.08}
DC_SPEEDS = {160.0, 200.0, 350.0, 400.0}


def devices_per_station(feed: PlainFeed) -> list[tuple[int, int]]:
    """(devices, connectors) of every station, largest first."""
    return sorted(((len(p.devices), len(p.connectors)) for p in feed.placemarks), reverse=True)


@pytest.fixture(scope="module", params=[0, 5], ids=lambda seed: f"seed{seed}")
def default(request: pytest.FixtureRequest) -> tuple[GeneratedFeed, PlainFeed]:
    feed = generate_feed(seed=request.param)
    return feed, read_kml(feed.kml)


def test_the_default_feed_has_the_live_feeds_size(default: tuple[GeneratedFeed, PlainFeed]) -> None:
    _, plain = default
    assert len(plain.placemarks) == pytest.approx(523, abs=5)
    assert sum(len(p.devices) for p in plain.placemarks) == pytest.approx(934, rel=0.02)
    assert len(plain.connectors) == pytest.approx(1801, rel=0.02)


def test_most_stations_have_one_device_and_the_hubs_are_large(default: tuple[GeneratedFeed, PlainFeed]) -> None:
    _, plain = default
    sizes = devices_per_station(plain)
    assert sum(1 for devices, _ in sizes if devices == 1) == pytest.approx(412, abs=10)
    assert sizes[:3] == [(34, 68), (28, 56), (27, 54)]
    assert all(devices >= 1 for devices, _ in sizes), "no Placemark without a device in the live feed"


def test_most_devices_have_two_connectors(default: tuple[GeneratedFeed, PlainFeed]) -> None:
    _, plain = default
    per_device = Counter(len(d["connectors"]) for p in plain.placemarks for d in p.devices)
    assert per_device.most_common(1)[0][0] == 2
    assert per_device[2] / sum(per_device.values()) > 0.85
    assert set(per_device) - {1, 2, 3, 4} == set()


def test_speeds_are_those_of_the_live_feed(default: tuple[GeneratedFeed, PlainFeed]) -> None:
    feed, plain = default
    speeds = Counter(c.maxchspeed for c in plain.connectors)
    assert all(isinstance(speed, float) for speed in speeds), "maxchspeed is a JSON number"
    ac = {speed: n for speed, n in speeds.items() if speed < 50}
    assert max(ac, key=lambda speed: ac[speed]) == 22.0
    assert ac[22.08] / sum(ac.values()) == pytest.approx(0.2, abs=0.05)
    around_13 = {speed for speed in ac if 13 <= speed < 14}
    assert around_13 and sum(ac[speed] for speed in around_13) < 0.02 * sum(ac.values())
    assert set(ac) == AC_SPEEDS | around_13
    assert {speed for speed in speeds if speed >= 50} == DC_SPEEDS
    # As the JSON writes them: a useless decimal on 22.0 and 350.0.
    assert b'"maxchspeed":22.0,' in feed.kml and b'"maxchspeed":350.0,' in feed.kml
    assert b'"maxchspeed":22.08,' in feed.kml


def test_raw_states_are_those_of_the_live_feed(default: tuple[GeneratedFeed, PlainFeed]) -> None:
    _, plain = default
    states = Counter(c.state for c in plain.connectors)
    assert set(states) == LIVE_STATES
    assert states["AVAILABLE"] / len(plain.connectors) == pytest.approx(0.5, abs=0.08)
    assert states.most_common(2)[1][0] == "CHARGING"


def test_some_connector_names_do_not_follow_their_numbers(default: tuple[GeneratedFeed, PlainFeed]) -> None:
    _, plain = default
    swapped = {c.device for c in plain.connectors if c.connector != f"{c.device} - {c.number}"}
    assert 0 < len(swapped) < 0.2 * sum(len(p.devices) for p in plain.placemarks)
    for device in swapped:
        names = [c.connector for c in plain.connectors if c.device == device]
        assert names == [f"{device} - 2", f"{device} - 1"]
    assert len({c.connector for c in plain.connectors}) == len(plain.connectors)
    assert len({p.name for p in plain.placemarks}) == len(plain.placemarks), "no duplicate names in the live feed"


def test_the_document_is_laid_out_as_the_live_one(default: tuple[GeneratedFeed, PlainFeed]) -> None:
    feed, plain = default
    assert b"\n" not in feed.kml and feed.kml.endswith(b"</kml>")
    assert feed.kml.startswith(b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><kml ')
    assert plain.document_name == "Stations"
    assert b'<Style id="AVAILABLE">' in feed.kml and b'<Style id="UNAVAILABLE">' in feed.kml


def test_descriptions_give_the_counts_per_speed_as_the_live_feed_writes_them(
    default: tuple[GeneratedFeed, PlainFeed],
) -> None:
    """The same pattern as the real captures' (test_real_captures checks it on them)."""
    _, plain = default
    for placemark in plain.placemarks:
        assert description_counts(placemark.description) == counts_from_json(placemark), placemark.name
        assert int(placemark.cpnum) == len(placemark.connectors)
        assert all(d["numberOfConnectors"] == len(d["connectors"]) for d in placemark.devices)
        available = any(c.state == "AVAILABLE" for c in placemark.connectors)
        assert placemark.style == ("#AVAILABLE" if available else "#UNAVAILABLE")
    # 22.0 and 22.08 connectors are counted as "22kW"; OFFLINE ones as occupied.
    descriptions = " ".join(p.description for p in plain.placemarks)
    assert " 22kW " in descriptions and " 350kW " in descriptions and "22.08" not in descriptions
    assert any(DESCRIPTION_GROUP.search(p.description) for p in plain.placemarks if len(p.description) > 300)


def test_the_generators_expectations_are_what_the_document_says(default: tuple[GeneratedFeed, PlainFeed]) -> None:
    feed, plain = default
    assert [(c.station, c.device, c.connector, c.speed, c.state, c.simplified) for c in feed.connectors] == [
        (c.station, c.device, c.connector, c.speed, c.state, c.simplified) for c in plain.connectors
    ]
    assert [(s.name, s.address, s.latitude, s.longitude) for s in feed.expected_stations] == [
        (p.name, p.address, p.latitude, p.longitude) for p in plain.placemarks
    ]


@pytest.mark.parametrize("stations", [1, 5, 40])
def test_small_feeds_stay_small(stations: int) -> None:
    for seed in range(5):
        plain = read_kml(generate_feed(stations=stations, seed=seed).kml)
        assert len(plain.placemarks) == stations
        assert len(plain.connectors) <= 68 + 4 * stations


def test_a_feed_by_connector_count_has_at_least_that_many() -> None:
    feed = generate_feed(connectors=1700, seed=3)
    assert 1700 <= len(feed.connectors) < 1700 + 68
    ten_times = read_kml(generate_feed(stations=5230, seed=1).kml)
    assert devices_per_station(ten_times)[:30:10] == [(34, 68), (28, 56), (27, 54)]
    assert len(ten_times.connectors) == pytest.approx(18010, rel=0.02)


def test_the_same_seed_gives_the_same_feed() -> None:
    assert generate_feed(stations=60, seed=4).kml == generate_feed(stations=60, seed=4).kml
    assert generate_feed(stations=60, seed=4).kml != generate_feed(stations=60, seed=5).kml


def test_odd_shapes_add_what_the_live_feed_has_not_shown() -> None:
    feed = generate_feed(connectors=1700, seed=21, odd_shapes=True)
    plain = read_kml(feed.kml)
    states = {c.state for c in plain.connectors}
    assert {"MAINTENANCE", "OUT_OF_ORDER_NEW", "SUSPENDED_EV", "FAULTED", "OCCUPIED", "RESERVED"} <= states
    raw_speeds = [c.maxchspeed for c in plain.connectors]
    assert None in raw_speeds and any(isinstance(speed, str) for speed in raw_speeds)
    assert any(speed in (7.4, "7.4") for speed in raw_speeds)
    assert any(not p.devices for p in plain.placemarks)
    assert len({p.name for p in plain.placemarks}) < len(plain.placemarks)
    assert [(c.connector, c.speed, c.simplified) for c in feed.connectors] == [
        (c.connector, c.speed, c.simplified) for c in plain.connectors
    ]


def test_evolve_changes_states_and_brings_new_stations_with_new_names() -> None:
    first = generate_feed(stations=100, seed=8)
    second = evolve(first, seed=9, state_changes=0.5, removed=0.05, added_stations=10)
    before = {(c.connector, c.state) for c in first.connectors}
    after = read_kml(second.kml)
    assert len(after.placemarks) == pytest.approx(100 - 5 + 10, abs=8)
    assert len({(c.connector, c.state) for c in after.connectors} - before) > 0.1 * len(after.connectors)
    new_names = {p.name for p in after.placemarks} - {s.name for s in first.stations}
    assert len(new_names) == 10
    assert len({c.connector for c in after.connectors}) == len(after.connectors)
    assert {c.state for c in after.connectors} <= LIVE_STATES
