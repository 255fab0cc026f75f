"""Scrape latency of chargy-exporter against the original design, at the live feed's size and ten times it.

For each size it generates a feed shaped like the live one (tests/feedgen.py: 523 stations and 1,801 connectors
per unit of --scales), serves it on 127.0.0.1, starts
  - chargy-exporter (the real command),
  - the original design (benchmarks/original_design.py: prometheus_client collector, StateSet + Info families),
  - the OTel PrometheusMetricReader without our cached rendering (--uncached, for reference),
waits until each has fetched the feed, then times sequential scrapes from one client and prints a markdown table.
A second table has each server (with --compare-with other builds) refresh 30 times as states change: RSS and CPU
per refresh. OTLP push: benchmarks/push_benchmark.py.

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
from functools import partial
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # feedgen and loopback: standard library only, no pytest needed

from feedgen import LIVE_STATIONS, GeneratedFeed, evolve, generate_feed  # noqa: E402
from loopback import (  # noqa: E402
    FeedServer,
    cpu_seconds,
    exporter_command,
    free_port,
    memory_kb,
    send_kml,
)

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
pipeline = MetricsPipeline(Resource.create({}))
config = load_config(sys.argv[1:])
Refresher(config, FeedClient(config), pipeline.publish).refresh_once()
# Readers sized for the state just published, attached for as long as the process serves.
with pipeline.attached(lambda limits, network: PrometheusMetricReader(
    disable_target_info=not network, scope_info_enabled=False, registry=registry, cardinality_limits=limits
)):
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


# What Prometheus sends: OpenMetrics preferred, gzip.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4",
    "Accept-Encoding": "gzip",
}


def refreshes(
    feed: GeneratedFeed, count: int, builds: dict[str, list[str]], log: IO[bytes]
) -> dict[str, tuple[float, float, float]]:
    """Each server, started afresh, refreshes `count` times while the feed changes state, with one Prometheus-like
    scrape after each refresh: (RSS after the first refresh, RSS after all of them, in MB; CPU seconds per refresh,
    that scrape included). The exporter builds refresh every second (the smallest interval; also builds without
    SIGHUP); the original design refreshes on every scrape with its cache at 0 s (it does so every 5 minutes)."""
    feeds = [feed]
    for index in range(count + 1):
        feeds.append(evolve(feeds[-1], seed=index, state_changes=0.3, removed=0))  # the same connectors
    results = {}
    for name, command in [*builds.items(), ("original design", [])]:
        server = FeedServer(feed.kml)
        server.set_responder(partial(serve_next, server=server, feeds=feeds))
        port = free_port()
        if command:
            command = [*command, "--kml-url", server.url, "--host", "127.0.0.1", "--port", str(port)]
            command += ["--refresh-interval", "1"]
        else:
            original = str(ROOT / "benchmarks" / "original_design.py")
            command = [sys.executable, original, "--kml-url", server.url, "--cache-seconds", "0", "--port", str(port)]
        process = subprocess.Popen(command, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            wait_ready(url, 3 * len(feed.connectors))
            first_rss, started, served = memory_kb(process.pid)["VmRSS"] / 1024, cpu_seconds(process.pid), 0
            for _ in range(count):
                if name != "original design":
                    # Another fetch: a refresh has begun (and the one before it is done: they are 1 s apart).
                    while server.requests <= served:
                        time.sleep(
                            0.05
                        )  # between two looks at the feed server's count, which costs the exporter nothing
                    served = server.requests
                urllib.request.urlopen(urllib.request.Request(url, headers=PROMETHEUS_HEADERS), timeout=60).read()
            used = (cpu_seconds(process.pid) - started) / count
            results[name] = (first_rss, memory_kb(process.pid)["VmRSS"] / 1024, used)
        finally:
            process.terminate()
            process.wait()
            server.close()
    return results


def serve_next(handler: BaseHTTPRequestHandler, server: FeedServer, feeds: list[GeneratedFeed]) -> None:
    """The n-th request gets the n-th feed: every refresh sees states change."""
    send_kml(handler, feeds[min(server.requests, len(feeds) - 1)].kml)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10], help="sizes, in live feeds")
    parser.add_argument("--scrapes", type=int, default=40)
    parser.add_argument("--skip-uncached", action="store_true")
    parser.add_argument("--refreshes", type=int, default=30, help="refreshes with changing states, for memory and CPU")
    parser.add_argument(
        "--compare-with",
        metavar="EXPORTER",
        action="append",
        default=[],
        help="another chargy-exporter executable (e.g. an older build in its own venv) for the refresh table",
    )
    args = parser.parse_args()

    rows = []
    refresh_rows = []
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
        with tempfile.TemporaryDirectory() as scratch, open(Path(scratch) / "log", "wb") as log:
            builds = {"chargy-exporter": exporter_command()}
            builds |= {path: [path] for path in args.compare_with}
            for name, (first, last, cpu) in refreshes(feed, args.refreshes, builds, log).items():
                refresh_rows.append((len(feed.connectors), name, first, last, cpu))
        original = results["original design"][0]
        for name, (plain, gzipped) in results.items():
            rows.append((len(feed.connectors), name, plain, gzipped, plain / original))
        print(f"measured {len(feed.connectors)} connectors ({scrapes} scrapes each)", file=sys.stderr)

    print("| connectors | server | scrape median | with gzip | vs original design |")
    print("|---:|---|---:|---:|---:|")
    for connectors, name, plain, gzipped, ratio in rows:
        print(f"| {connectors:,} | {name} | {plain:.1f} ms | {gzipped:.1f} ms | {ratio:.3f}× |")
    print()
    print(f"| connectors | server | RSS after the first refresh | after {args.refreshes} more | CPU per refresh |")
    print("|---:|---|---:|---:|---:|")
    for connectors, name, first, last, cpu in refresh_rows:
        print(f"| {connectors:,} | {name} | {first:.1f} MB | {last:.1f} MB | {cpu * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
