"""A faithful reimplementation of the original chargy exporter's design, for comparison only.

A prometheus_client custom collector: each scrape calls collect(), which re-fetches and re-parses the KML with
xmltodict when its 5-minute cache has expired, then yields a StateSet family (chargy_connector_state) and an
Info family (chargy_connector_detailed_state) built from the parsed document on every scrape.

    python benchmarks/original_design.py --kml-url http://127.0.0.1:8000/feed.kml --port 9001
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests
import xmltodict
from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, InfoMetricFamily, Metric, StateSetMetricFamily

CACHE_SECONDS = 300
SIMPLIFIED = {"AVAILABLE": "available"} | {
    state: "charging"
    for state in ("CHARGING", "PREPARING", "SUSPENDED_EV", "SUSPENDED_EVSE", "FINISHING", "OCCUPIED", "RESERVED")
}


class ChargyCollector:
    def __init__(self, url: str, cache_seconds: float = CACHE_SECONDS) -> None:
        self._url = url
        self._cache_seconds = cache_seconds
        self._document: dict[str, Any] | None = None
        self._fetched_at = 0.0

    def _placemarks(self) -> list[dict[str, Any]]:
        if self._document is None or time.monotonic() - self._fetched_at > self._cache_seconds:
            response = requests.get(self._url, headers={"Accept": "application/xml"}, timeout=30)
            self._document = xmltodict.parse(response.content)
            self._fetched_at = time.monotonic()
        placemarks = self._document["kml"]["Document"].get("Placemark", [])
        return placemarks if isinstance(placemarks, list) else [placemarks]

    def collect(self) -> Iterator[Metric]:
        labels = ["connector", "device", "station", "speed"]
        states = StateSetMetricFamily("chargy_connector_state", "Connector state", labels=labels)
        info = InfoMetricFamily("chargy_connector_detailed_state", "Raw connector state", labels=labels)
        for placemark in self._placemarks():
            data = placemark["ExtendedData"]["Data"]
            for item in data if isinstance(data, list) else [data]:
                if item["@name"] != "chargingdevice":
                    continue
                device = json.loads(item["value"])
                for connector in device["connectors"]:
                    speed = float(connector["maxchspeed"])
                    values = [connector["name"], device["name"], placemark["name"],
                              str(int(speed)) if speed.is_integer() else str(speed)]  # fmt: skip
                    current = SIMPLIFIED.get(connector["description"], "unavailable")
                    states.add_metric(values, {s: s == current for s in ("available", "charging", "unavailable")})
                    info.add_metric(values, {"state": connector["description"]})
        yield states
        yield info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kml-url", required=True)
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--cache-seconds", type=float, default=CACHE_SECONDS, help="0: every scrape is a refresh")
    args = parser.parse_args()
    REGISTRY.register(ChargyCollector(args.kml_url, args.cache_seconds))
    start_http_server(args.port, addr="127.0.0.1")
    threading.Event().wait()


if __name__ == "__main__":
    main()
