"""page.py: the status page at `/` shows the published state, escaped, self-contained, without the feed's key."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from types import MappingProxyType

from feedgen import generate_feed

from chargy_exporter import __version__
from chargy_exporter.config import Config
from chargy_exporter.feed import FeedError
from chargy_exporter.kml import parse_kml
from chargy_exporter.model import Connector, Device, FeedStatus, Snapshot, State, Station
from chargy_exporter.page import render_status_page
from chargy_exporter.refresher import Refresher

NOW = 1_764_460_800.0  # 2025-11-30 00:00:00 UTC
FEED = generate_feed(stations=60, seed=11, odd_shapes=True)


class _Page(HTMLParser):
    """The page as a reader sees it: its text, the text of each element with an id, its links and tags."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.attributes: list[tuple[str, str | None]] = []
        self._open_ids: list[tuple[str, str]] = []
        self._text: list[str] = []
        self.feed(html)
        self.text = " ".join(" ".join(self._text).split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.extend(attrs)
        found = dict(attrs)
        if tag == "a" and found.get("href"):
            self.links.append(str(found["href"]))
        self._open_ids.append((tag, str(found.get("id") or "")))

    def handle_endtag(self, tag: str) -> None:
        while self._open_ids:
            open_tag, _ = self._open_ids.pop()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if not any(tag == "style" for tag, _ in self._open_ids):
            self._text.append(data)
        for _, element_id in self._open_ids:
            if element_id:
                self.by_id[element_id] = self.by_id.get(element_id, "") + data


def page_of(state: State, now: float = NOW, demo: bool = False) -> _Page:
    return _Page(render_status_page(state, now, demo).decode("utf-8"))


def number(page: _Page, element_id: str) -> int:
    return int(page.by_id[element_id].replace(",", ""))


def test_the_network_counts_are_the_feeds() -> None:
    page = page_of(State(parse_kml(FEED.kml), FeedStatus(up=True, last_success_time=NOW - 30)))
    expected = FEED.counts_by_state()
    for state in ("available", "charging", "unavailable"):
        assert number(page, state) == expected.get(state, 0)
    stations, without_available, without_connectors = FEED.station_counts()
    assert without_connectors > 0, "the odd-shaped feed should have Placemarks without devices"
    assert number(page, "stations-without-available") == without_available
    assert f"of {stations:,} stations with no connector available" in page.text
    assert f"{len(FEED.connectors):,} connectors at {stations:,} stations" in page.text
    assert number(page, "stations-without-connectors") == without_connectors


def test_stations_listing_no_connector_are_apart_and_duplicate_names_count_once() -> None:
    busy = Station("busy", "", None, None, (Device("CP1", (Connector("CP1 - 1", 22.0, "CHARGING"),)),))
    free_twin = Station("busy", "", None, None, (Device("CP2", (Connector("CP2 - 1", 22.0, "AVAILABLE"),)),))
    empty = Station("empty", "", None, None, ())
    counts = Snapshot((busy, empty)).counts
    assert (counts.stations, counts.stations_without_available, counts.stations_without_connectors) == (1, 1, 1)
    # Two Placemarks of one name are one station, as `sum by (station)` sums them: one of them free, it is free.
    assert Snapshot((busy, free_twin, empty)).counts.stations_without_available == 0
    page = page_of(State(Snapshot((busy, empty)), FeedStatus(up=True, last_success_time=NOW)))
    assert "of 1 stations with no connector available" in page.text and "1 more lists no connector" in page.text
    assert "stations-without-connectors" not in page_of(State(Snapshot((busy,)), FeedStatus(up=True))).by_id


def test_the_demo_says_so_and_the_live_feed_does_not() -> None:
    state = State(parse_kml(FEED.kml), FeedStatus(up=True, last_success_time=NOW))
    assert "Not real data" in page_of(state, demo=True).by_id["demo"]
    assert "demo" not in page_of(state).by_id and "live from the Chargy feed" in page_of(state).text


def test_a_station_counts_as_without_available_only_when_none_of_its_connectors_is_available() -> None:
    def station(name: str, *states: str) -> Station:
        connectors = tuple(Connector(f"{name} - {n}", 22.0, raw) for n, raw in enumerate(states, 1))
        return Station(name, "", None, None, (Device(name, connectors),))

    snapshot = Snapshot(
        (
            station("one free", "CHARGING", "AVAILABLE"),
            station("all busy", "CHARGING", "PREPARING"),
            station("broken", "FAULTED", "MAINTENANCE"),  # an unknown state counts as unavailable
            station("free", "available"),  # the raw state is read case-insensitively, as for the metrics
        )
    )
    page = page_of(State(snapshot, FeedStatus(up=True, last_success_time=NOW)))
    assert number(page, "stations-without-available") == 2
    assert (number(page, "available"), number(page, "charging"), number(page, "unavailable")) == (2, 3, 2)


def test_the_feeds_health_is_shown() -> None:
    status = FeedStatus(
        up=False,
        last_success_time=NOW - 400,
        errors=MappingProxyType({"http_5xx": 3}),
        last_error_reason="http_5xx",
        last_error_message="the feed answered HTTP 503",
        last_error_time=NOW - 20,
        failures_in_a_row=3,
        next_refresh_time=NOW + 9,
    )
    page = page_of(State(parse_kml(FEED.kml), status))
    assert page.by_id["feed-status"] == "down"
    assert "3 failures in a row" in page.text
    assert "2025-11-29 23:53:20 UTC (6 min 40 s ago)" in page.text  # the last success, and the data's age
    assert page.by_id["last-error-reason"] == "http_5xx"
    assert page.by_id["last-error-message"] == "the feed answered HTTP 503"
    assert "2025-11-29 23:59:40 UTC (20 s ago)" in page.text
    assert "in 9 s (2025-11-30 00:00:09 UTC)" in page.text
    assert "this is the last good data, 6 min 40 s old" in page.text


def test_a_recovered_feed_is_up_and_still_names_its_last_error() -> None:
    status = FeedStatus(
        up=True,
        last_success_time=NOW - 5,
        last_error_reason="timeout",
        last_error_time=NOW - 2 * 3600 - 60,
        next_refresh_time=NOW + 295,
    )
    page = page_of(State(parse_kml(FEED.kml), status))
    assert page.by_id["feed-status"] == "up"
    assert page.by_id["last-error-reason"] == "timeout"
    assert "(2 h 1 min ago)" in page.text
    assert "in 4 min 55 s" in page.text
    assert "failing" not in page.text


def test_before_the_first_refresh_the_page_says_so() -> None:
    page = page_of(State())
    assert "No data yet" in page.text
    assert page.by_id["feed-status"] == "starting"
    assert "Last success never" in page.text
    assert "available" not in page.by_id


def test_version_and_links() -> None:
    page = page_of(State(parse_kml(FEED.kml), FeedStatus(up=True, last_success_time=NOW)))
    assert page.by_id["version"] == __version__
    assert set(page.links) == {"/metrics", "/healthz"}


def test_the_page_is_self_contained() -> None:
    """No script, nothing loaded from elsewhere: it renders the same offline, behind a proxy, with JS disabled."""
    html = render_status_page(State(parse_kml(FEED.kml), FeedStatus(up=True, last_success_time=NOW)), NOW).decode()
    page = _Page(html)
    assert not page.tags & {"script", "link", "img", "iframe", "object", "embed"}
    assert not [name for name, _ in page.attributes if name == "src" or name.startswith("on")]
    assert not re.search(r"https?:|//[a-z0-9]|@import|url\(", html, re.IGNORECASE)


def test_feed_provided_text_is_escaped() -> None:
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quoted"'
    status = FeedStatus(
        up=False,
        last_error_reason="<b>reason</b>",
        last_error_message=hostile,
        last_error_time=NOW,
        failures_in_a_row=1,
    )
    html = render_status_page(State(status=status), NOW).decode()
    page = _Page(html)
    assert "script" not in page.tags and "img" not in page.tags and "b" not in page.tags
    assert page.by_id["last-error-message"] == hostile  # shown as text, exactly
    assert page.by_id["last-error-reason"] == "<b>reason</b>"


def test_the_feeds_key_never_reaches_the_page() -> None:
    """The state comes from a refresher whose error message carried the URL; the page shows it redacted."""
    key = "page-secret-key-0123"
    url = f"http://127.0.0.1:1/kml?API-KEY={key}"

    class FailingClient:
        def fetch(self, validators: object = None) -> object:
            raise FeedError("connection", f"cannot connect to {url}")

    published: list[State] = []
    refresher = Refresher(Config(kml_url=url, secrets=(key,)), FailingClient(), published.append)  # type: ignore[arg-type]
    refresher.refresh_once()
    html = render_status_page(published[-1], NOW).decode()
    assert key not in html
    assert _Page(html).by_id["last-error-message"] == "cannot connect to http://127.0.0.1:1/kml?API-KEY=REDACTED"
