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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlib import ROOT, FeedServer, cpu_seconds, exporter_command, free_port, memory_kb  # tests/ on sys.path
from feedgen import LIVE_STATIONS, GeneratedFeed, evolve, generate_feed

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


def last_success(port: int) -> float | None:
    url = f"http://127.0.0.1:{port}/metrics?name[]=chargy_feed_last_success_timestamp_seconds"
    with urllib.request.urlopen(url, timeout=60) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("chargy_feed_last_success_timestamp_seconds"):
                return float(line.split()[-1])
    return None


def refreshes(feed: GeneratedFeed, count: int, log: object) -> dict[str, tuple[float, float, float]]:
    """Each server, started afresh, refreshes `count` times while the feed changes state: (RSS after the first
    refresh, RSS after all of them, in MB; CPU seconds per refresh). chargy-exporter refreshes on SIGHUP; the
    original design on every scrape when its cache is 0 s (what it does once every 5 minutes)."""
    server = FeedServer(feed.kml)
    results = {}
    try:
        for name in ("chargy-exporter", "original design"):
            port = free_port()
            if name == "chargy-exporter":
                command = [*exporter_command(), "--kml-url", server.url, "--host", "127.0.0.1", "--port", str(port)]
            else:
                original = str(ROOT / "benchmarks" / "original_design.py")
                command = [
                    sys.executable,
                    original,
                    "--kml-url",
                    server.url,
                    "--cache-seconds",
                    "0",
                    "--port",
                    str(port),
                ]
            server.body = feed.kml
            process = subprocess.Popen(command, stdout=log, stderr=log)  # type: ignore[arg-type]
            try:
                url = f"http://127.0.0.1:{port}/metrics"
                wait_ready(url, 3 * len(feed.connectors))
                first_rss = memory_kb(process.pid)["VmRSS"] / 1024
                current, started = feed, cpu_seconds(process.pid)
                for index in range(count):
                    current = evolve(current, seed=index, state_changes=0.3)
                    server.body = current.kml
                    if name == "chargy-exporter":
                        before = last_success(port)
                        process.send_signal(signal.SIGHUP)
                        while last_success(port) == before:
                            time.sleep(0.1)  # between two looks at whether the refresh is done (each costs ~5 ms)
                    else:
                        scrape(url, False)
                used = (cpu_seconds(process.pid) - started) / count
                results[name] = (first_rss, memory_kb(process.pid)["VmRSS"] / 1024, used)
            finally:
                process.terminate()
                process.wait()
    finally:
        server.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10], help="sizes, in live feeds")
    parser.add_argument("--scrapes", type=int, default=40)
    parser.add_argument("--skip-uncached", action="store_true")
    parser.add_argument("--refreshes", type=int, default=30, help="refreshes with changing states, for memory and CPU")
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
            for name, (first, last, cpu) in refreshes(feed, args.refreshes, log).items():
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
