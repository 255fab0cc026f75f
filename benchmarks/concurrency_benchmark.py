"""Scrape latency of the real chargy-exporter process under many concurrent scrapers.

It generates a feed of the real size (tests/feedgen.py), serves it on 127.0.0.1, starts `chargy-exporter`, waits
until the feed is exported, then lets N scrapers (threads, each opening a new connection per scrape, as after a
Prometheus restart) scrape M times each, all starting together, and prints a markdown table of the latencies
(connect to last byte), for plain bodies and for gzip (what Prometheus asks for).

    python benchmarks/concurrency_benchmark.py [--connectors 1800] [--scrapers 200] [--scrapes 3]
"""

from __future__ import annotations

import argparse
import http.client
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from feedgen import generate_feed  # noqa: E402
from loopback import FeedServer, exporter_command, free_port  # noqa: E402


@contextmanager
def exporter(kml_url: str) -> Iterator[int]:
    command = exporter_command()
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [*command, "--kml-url", kml_url, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log
        )
        try:
            yield port
        finally:
            process.terminate()
            process.wait(timeout=30)


def scrape(port: int, gzipped: bool) -> tuple[float, int, bytes]:
    """(seconds, status, body) of one scrape on a new connection."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"} if gzipped else {})
        response = connection.getresponse()
        body = response.read()
        return time.perf_counter() - started, response.status, body
    finally:
        connection.close()


def wait_ready(port: int, connectors: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = scrape(port, False)[2]
            if body.count(b"\nchargy_connector_detailed_state_info{") == connectors:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the exporter never served {connectors} connectors")


def load(port: int, scrapers: int, scrapes: int, gzipped: bool) -> tuple[list[float], int]:
    """Latencies of the scrapes that succeeded, and how many failed."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    start = threading.Barrier(scrapers)

    def scraper() -> None:
        nonlocal failures
        start.wait()
        for _ in range(scrapes):
            try:
                elapsed, status, _ = scrape(port, gzipped)
                ok = status == 200
            except OSError:
                elapsed, ok = 0.0, False
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    failures += 1

    threads = [threading.Thread(target=scraper) for _ in range(scrapers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connectors", type=int, default=1800)
    parser.add_argument("--scrapers", type=int, default=200)
    parser.add_argument("--scrapes", type=int, default=3)
    args = parser.parse_args()

    feed = generate_feed(connectors=args.connectors, seed=1)
    rows = []
    server = FeedServer(feed.kml)
    with exporter(server.url) as port:
        wait_ready(port, len(feed.connectors))
        for gzipped in (False, True):
            scrape(port, gzipped)  # the first scrape of a format encodes it; the next renders keep it warm
            latencies, failures = load(port, args.scrapers, args.scrapes, gzipped)
            rows.append((gzipped, latencies, failures))

    print(f"{len(feed.connectors):,} connectors, {args.scrapers} concurrent scrapers × {args.scrapes} scrapes\n")
    print("| body | scrapes ok | failed | p50 | p90 | p99 | max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for gzipped, latencies, failures in rows:
        p50, p90, p99 = (percentile(latencies, f) * 1000 for f in (0.5, 0.9, 0.99))
        print(
            f"| {'gzip' if gzipped else 'plain'} | {len(latencies)} | {failures} | {p50:.0f} ms | {p90:.0f} ms"
            f" | {p99:.0f} ms | {max(latencies) * 1000:.0f} ms |"
        )
    if any(failures for _, _, failures in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
