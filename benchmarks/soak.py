"""Soak test: the real chargy-exporter against a changing local feed; does memory stay flat?

A feed server on 127.0.0.1 answers every request with the next state of a production-size feed (tests/feedgen.py):
connectors change state, devices disappear, new stations (with new device and connector names) appear and empty
ones go, so the set of series keeps churning while the feed's size stays about the same. The exporter refreshes
every --refresh-interval seconds (1 s, its minimum) while scraper threads hit /metrics in a loop (plain text,
gzip and OpenMetrics). The exporter's RSS is sampled from /proc every second.

    python benchmarks/soak.py                       # the live feed's size, >= 500 refreshes, >= 10,000 scrapes
    python benchmarks/soak.py --refreshes 50 --scrapes 1000 --connectors 300   # a quick run

Needs only the package installed (`pip install .`); Linux (/proc) for the memory samples.

Prints a markdown table; exits 1 if a scrape failed, a refresh failed, or memory grew past --max-growth-mb
between the end of the warm-up and the end of the run.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # feedgen and loopback: standard library only, no pytest needed

from feedgen import GeneratedFeed, evolve, generate_feed  # noqa: E402
from loopback import (  # noqa: E402
    TEST_API_KEY,
    FeedServer,
    cpu_seconds,
    exporter_command,
    free_port,
    memory_kb,
    send_kml,
)

SCRAPE_HEADERS: tuple[dict[str, str], ...] = (
    {},
    {"Accept-Encoding": "gzip"},
    {"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"},
)


def churned(feed: GeneratedFeed, step: int, target_stations: int, rng: random.Random) -> GeneratedFeed:
    """The next feed: ~15% of connectors change state, ~0.5% of devices go, a few new stations come, empty
    stations and the oldest surplus ones go, so the size stays near `target_stations`."""
    live = sum(1 for s in feed.stations if s.devices)
    added = max(0, target_stations - live) + rng.randint(1, 4)
    nxt = evolve(feed, seed=step, state_changes=0.15, removed=0.005, added_stations=added)
    stations = [s for s in nxt.stations if s.devices]
    surplus = len(stations) - target_stations
    if surplus > 0:
        stations = stations[surplus:]
    nxt.stations = stations
    return nxt


class ChurningFeedServer:
    def __init__(self, connectors: int | None, seed: int) -> None:
        self.feed = generate_feed(connectors=connectors, seed=seed)  # None: the live feed's shape
        self.target = sum(1 for s in self.feed.stations if s.devices)
        self.rng = random.Random(seed)
        self.step = 0
        self.served = 0
        self.connector_names: set[str] = {c.connector for c in self.feed.connectors}
        self._body = self.feed.kml
        self._lock = threading.Lock()
        self._next: bytes | None = None
        self.server = FeedServer()
        self.server.set_responder(lambda handler: send_kml(handler, self.take()))
        self._prepare()

    @property
    def url(self) -> str:
        return self.server.url

    def _prepare(self) -> None:
        """Build the next feed ahead of time, so that serving it costs nothing."""
        self.step += 1
        self.feed = churned(self.feed, self.step, self.target, self.rng)
        self.connector_names.update(c.connector for c in self.feed.connectors)
        self._next = self.feed.kml

    def take(self) -> bytes:
        with self._lock:
            body, self._body = self._body, self._next or self._body
            self.served += 1
        threading.Thread(target=self._prepare, daemon=True).start()
        return body

    def close(self) -> None:
        self.server.close()


def metric_value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    return None


@dataclass
class Scrapes:
    count: int = 0
    failures: int = 0
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def scraper(base: str, stop: threading.Event, scrapes: Scrapes, index: int, period: float) -> None:
    turn = index
    next_at = time.monotonic()
    while not stop.is_set():
        next_at += period
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        headers = SCRAPE_HEADERS[turn % len(SCRAPE_HEADERS)]
        turn += 1
        started = time.monotonic()
        try:
            with urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers=headers), timeout=5) as r:
                r.read()
                ok = r.status == 200
        except OSError:
            ok = False
        elapsed = time.monotonic() - started
        with scrapes.lock:
            scrapes.count += 1
            scrapes.latencies.append(elapsed)
            if not ok:
                scrapes.failures += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connectors", type=int, default=None, help="default: the live feed (1,801)")
    parser.add_argument("--refreshes", type=int, default=500)
    parser.add_argument("--scrapes", type=int, default=10_000)
    parser.add_argument("--refresh-interval", default="1")
    parser.add_argument("--scrapers", type=int, default=2, help="concurrent scraping threads")
    parser.add_argument("--scrape-rate", type=float, default=40.0, help="scrapes per second, all threads")
    parser.add_argument("--warmup-refreshes", type=int, default=50)
    parser.add_argument("--max-seconds", type=float, default=1800, help="give up after this long")
    parser.add_argument("--max-growth-mb", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    feed = ChurningFeedServer(args.connectors, args.seed)
    port = free_port()
    command = exporter_command()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CHARGY_", "KML_URL"))}
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--kml-url", feed.url,
         "--refresh-interval", args.refresh_interval, "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    stderr_lines: list[bytes] = []
    threading.Thread(target=lambda: stderr_lines.extend(process.stderr or ()), daemon=True).start()

    began = time.monotonic()
    samples: list[tuple[float, int, int]] = []  # (seconds, refreshes served, RSS kB)
    try:
        while True:
            try:
                with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
                    if metric_value(response.read().decode(), "chargy_feed_up") == 1.0:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() - began > 60:
                print(b"".join(stderr_lines).decode(errors="replace"), file=sys.stderr)
                raise SystemExit("the exporter did not come up")
            time.sleep(0.2)
        start_rss = memory_kb(process.pid)["VmRSS"]
        start_cpu = cpu_seconds(process.pid)
        start_refreshes = feed.served
        t0 = time.monotonic()

        stop = threading.Event()
        scrapes = Scrapes()
        period = args.scrapers / args.scrape_rate
        threads = [
            threading.Thread(target=scraper, args=(base, stop, scrapes, i, period), daemon=True)
            for i in range(args.scrapers)
        ]
        for thread in threads:
            thread.start()
        warm_rss: int | None = None
        last_report = 0.0
        while True:
            time.sleep(1)
            elapsed = time.monotonic() - t0
            refreshes = feed.served - start_refreshes
            rss = memory_kb(process.pid)["VmRSS"]
            samples.append((elapsed, refreshes, rss))
            if warm_rss is None and refreshes >= args.warmup_refreshes:
                warm_rss = rss
            if elapsed - last_report >= 30:
                last_report = elapsed
                print(f"[{elapsed:5.0f} s] refreshes {refreshes}, scrapes {scrapes.count}, RSS {rss / 1024:.1f} MB",
                      file=sys.stderr, flush=True)  # fmt: skip
            if process.poll() is not None:
                raise SystemExit(f"the exporter exited with {process.returncode}")
            if refreshes >= args.refreshes and scrapes.count >= args.scrapes:
                break
            if time.monotonic() - began > args.max_seconds:
                print("time limit reached", file=sys.stderr)
                break
        stop.set()
        for thread in threads:
            thread.join(10)
        with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
            final = response.read().decode()
        end = memory_kb(process.pid)
        end_cpu = cpu_seconds(process.pid)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        feed.close()

    duration = samples[-1][0]
    refreshes = samples[-1][1]
    errors = sum(
        float(line.rsplit(" ", 1)[1])
        for line in final.splitlines()
        if line.startswith("chargy_feed_refresh_errors_total{")
    )
    latencies = sorted(scrapes.latencies)
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    warm = warm_rss if warm_rss is not None else start_rss
    # Least-squares slope of RSS over the refreshes after the warm-up: kB per 100 refreshes.
    tail = [(r, kb) for _, r, kb in samples if r >= args.warmup_refreshes]
    slope = 0.0
    if len(tail) > 2 and len({r for r, _ in tail}) > 1:
        mean_r = statistics.fmean(r for r, _ in tail)
        mean_kb = statistics.fmean(kb for _, kb in tail)
        slope = sum((r - mean_r) * (kb - mean_kb) for r, kb in tail) / sum((r - mean_r) ** 2 for r, _ in tail) * 100
    growth_mb = (end["VmRSS"] - warm) / 1024

    def mb(kb: float) -> str:
        return f"{kb / 1024:.1f} MB"

    rows = [
        ("feed", f"{f'{args.connectors} connectors asked' if args.connectors else 'the live feed shape'}, "
                 f"{len(feed.feed.connectors)} connectors at the end, "
                 f"{len(feed.connector_names)} distinct connector names over the run"),
        ("duration", f"{duration:.0f} s, refresh interval {args.refresh_interval} s"),
        ("refreshes", f"{refreshes} (errors counted by the exporter: {errors:g})"),
        ("scrapes", f"{scrapes.count} by {args.scrapers} threads, {scrapes.failures} failed; latency p50 "
                    f"{1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms, max {1000 * latencies[-1]:.1f} ms"),
        ("RSS at start (first refresh done)", mb(start_rss)),
        (f"RSS after warm-up ({args.warmup_refreshes} refreshes)", mb(warm)),
        ("RSS at the end", mb(end["VmRSS"])),
        ("RSS min / max after warm-up", f"{mb(min(kb for _, kb in tail))} / {mb(max(kb for _, kb in tail))}"
         if tail else "-"),
        ("peak RSS (VmHWM)", mb(end["VmHWM"])),
        ("RSS trend after warm-up", f"{slope / 1024:+.2f} MB per 100 refreshes"),
        ("exporter CPU", f"{end_cpu - start_cpu:.0f} s ({100 * (end_cpu - start_cpu) / duration:.0f}% of one core)"),
    ]  # fmt: skip
    print("| soak | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")

    ok = scrapes.failures == 0 and errors == 0 and growth_mb <= args.max_growth_mb
    ok = ok and refreshes >= args.refreshes and scrapes.count >= args.scrapes
    if not ok:
        print(f"\nFAILED: growth after warm-up {growth_mb:.1f} MB, scrape failures {scrapes.failures}, "
              f"refresh errors {errors:g}", file=sys.stderr)  # fmt: skip
    if TEST_API_KEY.encode() in b"".join(stderr_lines) or TEST_API_KEY in final:
        print("FAILED: the API key leaked", file=sys.stderr)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
