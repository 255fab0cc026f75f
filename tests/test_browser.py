"""The status page at `/` in a real browser (Debian's headless Chromium), served by the real exporter process."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import TEST_API_KEY, ExporterProcess, FeedServer, require_binary
from feedgen import generate_feed

from chargy_exporter import __version__

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM_PACKAGE = "Debian package `chromium`: apt-get install chromium"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chromium(tmp_path: Path, *action: str, url: str) -> subprocess.CompletedProcess[bytes]:
    """Headless Chromium on `url`, isolated: its own profile, no network of its own beyond the page."""
    binary = require_binary("chromium", CHROMIUM_PACKAGE)
    command = [
        binary,
        "--headless",
        "--no-sandbox",  # we run as root in CI
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-proxy-server",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1000,900",
        *action,
        url,
    ]
    result = subprocess.run(command, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result


class RenderedPage(HTMLParser):
    """What Chromium rendered (its DOM): the visible text, the text of elements with an id, the links."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.links: list[str] = []
        self._open: list[tuple[str, str]] = []
        self._text: list[str] = []
        self.feed(dom)
        self.text = " ".join(" ".join(self._text).split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "a" and found.get("href"):
            self.links.append(str(found["href"]))
        if tag not in ("meta", "br", "link"):  # void elements have no end tag
            self._open.append((tag, str(found.get("id") or "")))

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        if any(tag in ("style", "title") for tag, _ in self._open):
            return
        self._text.append(data)
        for _, element_id in self._open:
            if element_id:
                self.by_id[element_id] = self.by_id.get(element_id, "") + data

    def number(self, element_id: str) -> int:
        return int(self.by_id[element_id].replace(",", ""))


def open_page(tmp_path: Path, url: str) -> RenderedPage:
    return RenderedPage(chromium(tmp_path, "--dump-dom", url=url).stdout.decode("utf-8"))


def test_the_page_shows_the_feeds_numbers(
    feed_server: FeedServer, exporter_process: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    feed = generate_feed(connectors=1700, seed=31, odd_shapes=True)
    feed_server.set_body(feed.kml)
    exporter = exporter_process("--kml-url", feed_server.url)
    exporter.wait_until_up()

    page = open_page(tmp_path, exporter.base_url + "/")
    counts = feed.counts_by_state()
    assert page.number("available") == counts["available"]
    assert page.number("charging") == counts["charging"]
    assert page.number("unavailable") == counts["unavailable"]
    stations, without_available, _ = feed.station_counts()  # as the dashboard's PromQL counts them
    assert page.number("stations-without-available") == without_available
    assert f"of {stations:,} stations" in page.text
    assert page.by_id["feed-status"] == "up"
    assert "none since the exporter started" in page.text
    assert page.by_id["version"] == __version__
    assert set(page.links) == {"/metrics", "/healthz"}
    assert TEST_API_KEY not in page.text and "127.0.0.1" not in page.text


def test_the_page_follows_the_links_and_scrapers_still_get_metrics(
    exporter_process: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    exporter = exporter_process("--demo")
    exporter.wait_until_up()
    # Prometheus and curl asking / keep getting the exposition.
    assert exporter.scrape("/").value("chargy_feed_up") == 1
    metrics = chromium(tmp_path, "--dump-dom", url=exporter.base_url + "/metrics").stdout.decode()
    assert "chargy_connector_state{" in metrics
    assert "ok" in open_page(tmp_path, exporter.base_url + "/healthz").text


def test_a_failing_feed_shows_down_with_its_reason_and_the_last_good_numbers(
    feed_server: FeedServer, exporter_process: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    feed = generate_feed(stations=40, seed=32)
    feed_server.set_body(feed.kml)
    exporter = exporter_process("--kml-url", feed_server.url, "--refresh-interval", "1")
    exporter.wait_until_up()

    def answer_503(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(503)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    feed_server.set_responder(answer_503)
    exporter.wait_for(lambda e: e.value("chargy_feed_up") == 0)

    page = open_page(tmp_path, exporter.base_url + "/")
    assert page.by_id["feed-status"] == "down"
    assert page.by_id["last-error-reason"] == "http_5xx"
    assert "the feed answered HTTP 503" in page.by_id["last-error-message"]
    assert re.search(r"\b\d+ failures?\b", page.text) and "last good data" in page.text
    assert page.number("available") == feed.counts_by_state()["available"]
    assert TEST_API_KEY not in page.text


def test_a_screenshot_of_the_page(exporter_process: Callable[..., ExporterProcess], tmp_path: Path) -> None:
    """The page renders to an image: what a person sees (kept in the test's folder for a look)."""
    exporter = exporter_process("--demo")
    exporter.wait_until_up()
    screenshot = tmp_path / "status-page.png"
    chromium(tmp_path, f"--screenshot={screenshot}", url=exporter.base_url + "/")
    image = screenshot.read_bytes()
    assert image.startswith(PNG_SIGNATURE) and len(image) > 10_000
