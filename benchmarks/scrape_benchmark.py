"""Scrape latency of chargy-exporter against the original design, at the live feed's size and ten times it.

For each size it generates a feed shaped like the live one (tests/feedgen.py: 523 stations and 1,801 connectors
per unit of --scales), serves it on 127.0.0.1, starts
  - chargy-exporter (the real command),
  - the original design (benchmarks/original_design.py: prometheus_client collector, StateSet + Info families),
  - the OTel PrometheusMetricReader without our cached rendering (--uncached, for reference),
waits until each has fetched the feed, then times sequential scrapes from one client and prints a markdown table.

    python benchmarks/scrape_benchmark.py [--scales 1 10] [--scrapes 40] [--skip-uncached]

Needs only the package installed (`pip install .`): it runs the `chargy-exporter` of the Python that runs it.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlib import ROOT, FeedServer, exporter_command, free_port  # puts tests/ on sys.path
from feedgen import LIVE_STATIONS, generate_feed

UNCACHED = """
import sys, threading
from prometheus_client import start_http_server, CollectorRegistry
from chargy_exporter.config import load_config
from chargy_exporter.feed import FeedClient
from chargy_exporter.kml import parse_kml
from chargy_exporter.metrics import MetricsPipeline
from chargy_exporter.refresher import Refresher
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.resources import Resource
# The same pipeline, but served by prometheus_client straight from an OTel reader: a full collection per scrape.
registry = CollectorRegistry(auto_describe=False)
pipeline = MetricsPipeline(Resource.create({}), readers=[
    lambda limits: PrometheusMetricReader(scope_info_enabled=False, registry=registry, cardinality_limits=limits)
])
config = load_config(sys.argv[1:])
Refresher(config, FeedClient(config), pipeline.publish).refresh_once()
start_http_server(config.port, addr="127.0.0.1", registry=registry)
threading.Event().wait()
"""


def scrape(url: str, gzipped: bool) -> tuple[float, int]:
    headers = {"Accept-Encoding": "gzip"} if gzipped else {}
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=120) as response:
        body = response.read()
    elapsed = time.perf_counter() - started
    if gzipped and response.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return elapsed, body.count(b"\nchargy_connector_state{")


def wait_ready(url: str, expected_series: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if scrape(url, False)[1] == expected_series:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} never served {expected_series} state series")


def measure(url: str, scrapes: int, gzipped: bool) -> float:
    times = [scrape(url, gzipped)[0] for _ in range(scrapes)]
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10], help="sizes, in live feeds")
    parser.add_argument("--scrapes", type=int, default=40)
    parser.add_argument("--skip-uncached", action="store_true")
    args = parser.parse_args()

    rows = []
    for scale in args.scales:
        feed = generate_feed(stations=LIVE_STATIONS * scale, seed=1)
        series = 3 * len(feed.connectors)
        server = FeedServer(feed.kml)
        scrapes = max(5, args.scrapes // scale)
        processes = {}
        with tempfile.TemporaryDirectory() as scratch:
            log = open(Path(scratch) / "log", "wb")  # noqa: SIM115
            commands = {
                "chargy-exporter": [*exporter_command(), "--kml-url", server.url, "--host", "127.0.0.1", "--port"],
                "original design": [
                    sys.executable,
                    str(ROOT / "benchmarks" / "original_design.py"),
                    "--kml-url",
                    server.url,
                    "--port",
                ],
            }
            if not args.skip_uncached:
                commands["OTel reader, uncached"] = [sys.executable, "-c", UNCACHED, "--kml-url", server.url, "--port"]
            try:
                for name, command in commands.items():
                    port = free_port()
                    processes[name] = (subprocess.Popen([*command, str(port)], stdout=log, stderr=log), port)
                results = {}
                for name, (_, port) in processes.items():
                    url = f"http://127.0.0.1:{port}/metrics"
                    wait_ready(url, series)
                    results[name] = (measure(url, scrapes, False), measure(url, scrapes, True))
            finally:
                for process, _ in processes.values():
                    process.terminate()
                    process.wait()
                server.close()
        original = results["original design"][0]
        for name, (plain, gzipped) in results.items():
            rows.append((len(feed.connectors), name, plain, gzipped, plain / original))
        print(f"measured {len(feed.connectors)} connectors ({scrapes} scrapes each)", file=sys.stderr)

    print("| connectors | server | scrape median | with gzip | vs original design |")
    print("|---:|---|---:|---:|---:|")
    for connectors, name, plain, gzipped, ratio in rows:
        print(f"| {connectors:,} | {name} | {plain:.1f} ms | {gzipped:.1f} ms | {ratio:.3f}× |")


if __name__ == "__main__":
    main()
