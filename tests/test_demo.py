"""demo.py: `--demo` serves a network of the live feed's size and shape (shared/README.md's facts), read through the
real parser, whose states move from refresh to refresh like charging sessions, the same on every run."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest
from feedgen import LIVE_STATES

from chargy_exporter.config import load_config
from chargy_exporter.demo import DemoNetwork
from chargy_exporter.feed import FeedClient
from chargy_exporter.kml import parse_kml
from chargy_exporter.model import AVAILABLE, CHARGING, Connector, Snapshot

LUXEMBOURG = {"latitude": (49.44, 50.19), "longitude": (5.73, 6.54)}  # the country's bounding box


def refreshes(count: int) -> list[Snapshot]:
    network = DemoNetwork()
    return [parse_kml(network.document()) for _ in range(count)]


@pytest.fixture(scope="module")
def first() -> Snapshot:
    return refreshes(1)[0]


def test_the_demo_has_the_live_feeds_size(first: Snapshot) -> None:
    assert len(first.stations) == 523 and first.device_count == 934
    assert 1_750 <= first.connector_count <= 1_850
    assert not first.skipped, "every record of the demo is one the parser keeps"


def test_it_is_laid_out_like_the_live_feed(first: Snapshot) -> None:
    devices = sorted(len(station.devices) for station in first.stations)
    assert devices[-3:] == [27, 28, 34] and devices.count(1) == 412
    per_device = Counter(len(device.connectors) for station in first.stations for device in station.devices)
    assert per_device[2] > 0.85 * first.device_count
    speeds = Counter(connector.speed for connector in _connectors(first))
    ac = speeds["22"] + speeds["22.08"]
    assert speeds["22"] > speeds["22.08"] and 0.15 < speeds["22.08"] / ac < 0.25
    assert {"160", "200", "350", "400"} <= set(speeds) and {"13.2", "13.8"} & set(speeds)
    assert set(speeds) <= {"22", "22.08", "13.2", "13.8", "160", "200", "350", "400"}  # no 7.4 or 175: never seen
    # Connector labels do not always follow their numbers: some devices list "… - 2" first.
    assert any(device.connectors[0].name.endswith(" - 2") for station in first.stations for device in station.devices)


def test_stations_are_named_and_placed_in_luxembourg(first: Snapshot) -> None:
    names = [station.name for station in first.stations]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"\S.* - \S.*", name) for name in names)
    assert any(name.startswith("Luxembourg - ") for name in names) and any("SuperChargy" in name for name in names)
    for station in first.stations:
        assert station.latitude is not None and station.longitude is not None
        assert LUXEMBOURG["latitude"][0] < station.latitude < LUXEMBOURG["latitude"][1]
        assert LUXEMBOURG["longitude"][0] < station.longitude < LUXEMBOURG["longitude"][1]
        assert station.address.endswith("Luxembourg")


def test_states_are_the_live_ones_about_half_available(first: Snapshot) -> None:
    raw = Counter(connector.raw_state for connector in _connectors(first))
    assert set(raw) == set(LIVE_STATES)
    assert 0.4 < raw["AVAILABLE"] / first.connector_count < 0.65


def test_states_move_like_sessions_and_some_stations_have_nothing_available() -> None:
    snapshots = refreshes(13)  # an hour at the default interval
    starts = ends = 0
    for before, after in itertools.pairwise(snapshots):
        pairs = [(a.state, b.state) for a, b in zip(_connectors(before), _connectors(after), strict=True)]
        changed = sum(1 for a, b in pairs if a != b)
        assert 0 < changed < 0.3 * len(pairs), "each refresh changes some states, not all"
        starts += pairs.count((AVAILABLE, CHARGING))
        ends += pairs.count((CHARGING, AVAILABLE))
        assert after.counts.stations_without_available > 0
        assert 0.4 < after.counts.available / after.counts.connectors < 0.65, "the mix stays steady"
    assert starts > 50 and ends > 50


def test_the_same_seed_and_refresh_give_the_same_network() -> None:
    one, other = DemoNetwork(), DemoNetwork()
    documents = [one.document() for _ in range(4)]
    assert [other.document() for _ in range(4)] == documents
    assert len(set(documents)) == 4
    assert DemoNetwork(seed=16).document() != documents[0]


def test_the_feed_client_serves_the_demo_without_the_network(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    client = FeedClient(load_config(["--demo"], {}))
    assert "serving the built-in demo network: 523 stations, 934 devices" in caplog.text
    assert "(not real data)" in caplog.text
    fetched = [client.fetch() for _ in range(2)]
    assert fetched[0].body != fetched[1].body
    assert [len(parse_kml(f.body or b"").stations) for f in fetched] == [523, 523]


def _connectors(snapshot: Snapshot) -> list[Connector]:
    return [row.connector for row in snapshot.rows()]
