"""Memory and CPU of chargy-exporter with OTLP push on, beside Prometheus only, as the network churns.

For each size (--scales, in live feeds: 523 stations and 1,801 connectors each, tests/feedgen.py) a feed server on
127.0.0.1 answers every request with the next state of the network: a third of the connectors in a new state, and
40 stations per live feed gone and as many new ones (new station, device and connector names), so the series keep
coming and going while the size stays the same. Each build, started afresh, refreshes every second (its smallest
interval) and, for the push rows, pushes every second to a receiver here that reads and discards each export (gRPC
or OTLP/HTTP); after each refresh one Prometheus-style scrape (OpenMetrics, gzip). RSS is read from /proc after the
first refresh, after --refreshes and, with --soak N, after N (this build only; each the median of the five refreshes
up to it), and its peak; CPU per refresh over the first --refreshes.

    python benchmarks/push_benchmark.py [--scales 1 10] [--refreshes 30] [--soak 500] [--compare-with OLD-EXPORTER]
                                        [--python-malloc]

Needs the package installed (`pip install .`: grpcio and the OTLP protobufs come with it); Linux (/proc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent import futures
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import IO, Any

import grpc

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
    serve_on_loopback,
    wait_until,
)

# What Prometheus sends: OpenMetrics preferred, gzip.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4",
    "Accept-Encoding": "gzip",
}
CHURNING_STATIONS = 40  # per live feed: gone and new at each refresh


class ChurningFeed:
    """The n-th request gets the n-th state of the network, made when first asked for."""

    def __init__(self, first: GeneratedFeed, churn: int) -> None:
        self.latest, self.index = first, 0  # only the newest state is kept: it is all the next one needs
        self.churn = churn
        self.lock = threading.Lock()

    def feed(self, index: int) -> GeneratedFeed:
        with self.lock:
            while self.index < index:
                self.index += 1
                step = evolve(self.latest, seed=self.index, state_changes=0.3, removed=0, added_stations=self.churn)
                self.latest = replace(step, stations=step.stations[self.churn :])  # the oldest go: the size stays
            return self.latest

    def answer(self, handler: BaseHTTPRequestHandler, server: FeedServer) -> None:
        send_kml(handler, self.feed(server.requests - 1).kml)


class DiscardingGrpcReceiver:
    """An OTLP/gRPC receiver on 127.0.0.1 that takes each export as bytes and answers an empty success."""

    def __init__(self) -> None:
        self.exports = 0

        def export(_request: bytes, _context: Any) -> bytes:
            self.exports += 1
            return b""  # an empty ExportMetricsServiceResponse: full success

        handler = grpc.unary_unary_rpc_method_handler(export)  # no (de)serializers: raw bytes both ways
        service = "opentelemetry.proto.collector.metrics.v1.MetricsService"
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Export": handler}),))
        self.url = f"http://127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def close(self) -> None:
        self._server.stop(0)


class DiscardingHttpReceiver:
    """An OTLP/HTTP receiver on 127.0.0.1 that reads each export and answers an empty success."""

    def __init__(self) -> None:
        self.exports = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.exports += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = serve_on_loopback(Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@dataclass
class Run:
    rss_first: float  # MB, after the first refresh
    rss: dict[int, float]  # MB, after that many refreshes (the median of the five up to it)
    peak: float  # MB, the process' highest RSS (VmHWM)
    cpu_per_refresh: float  # seconds
    exports: int | None  # that the receiver took; None without push


def run(
    command: list[str],
    first: GeneratedFeed,
    churn: int,
    marks: list[int],
    push: str | None,
    log: IO[bytes],
    export_interval_ms: int = 1000,
    environment: dict[str, str] | None = None,
) -> Run:
    network = ChurningFeed(first, churn)
    server = FeedServer(first.kml)
    server.set_responder(lambda handler: network.answer(handler, server))
    receiver: DiscardingGrpcReceiver | DiscardingHttpReceiver | None = None
    port = free_port()
    command = [*command, "--kml-url", server.url, "--host", "127.0.0.1", "--port", str(port), "--refresh-interval", "1"]
    if push is not None:
        receiver = DiscardingGrpcReceiver() if push == "grpc" else DiscardingHttpReceiver()
        command += [
            "--otlp-endpoint",
            receiver.url,
            "--otlp-protocol",
            push,
            "--otlp-export-interval",
            str(export_interval_ms),
        ]
    process = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, **(environment or {})})
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> None:
        request = urllib.request.Request(url, headers=PROMETHEUS_HEADERS)
        urllib.request.urlopen(request, timeout=120).read()

    try:
        samples: list[float] = []  # MB, after each refresh
        rss_first = cpu_started = cpu_per_refresh = 0.0
        for refreshes in range(1, max(marks) + 1):

            def fetched_again(done: int = refreshes) -> bool:
                return server.requests > done

            # The next fetch has begun: the refresh before it is done (they are 1 s apart, or back to back).
            wait_until(fetched_again, 600, f"refresh {refreshes}")
            scrape()
            if refreshes == 1:
                rss_first, cpu_started = memory_kb(process.pid)["VmRSS"] / 1024, cpu_seconds(process.pid)
            if refreshes == marks[0]:
                cpu_per_refresh = (cpu_seconds(process.pid) - cpu_started) / (marks[0] - 1)
            samples.append(memory_kb(process.pid)["VmRSS"] / 1024)
        # The median of the five refreshes up to each mark: an export in flight when RSS is read adds its working
        # memory (up to ~10 MB at today's size), which one sample would take for the level.
        rss = {mark: statistics.median(samples[max(0, mark - 5) : mark]) for mark in marks}
        peak = memory_kb(process.pid)["VmHWM"] / 1024
        return Run(rss_first, rss, peak, cpu_per_refresh, receiver.exports if receiver else None)
    finally:
        process.terminate()
        process.wait()
        server.close()
        if receiver is not None:
            receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10], help="sizes, in live feeds")
    parser.add_argument("--refreshes", type=int, default=30, help="refreshes for the RSS and CPU columns")
    parser.add_argument("--soak", type=int, default=0, help="also the RSS after this many refreshes (at scale 1)")
    parser.add_argument(
        "--compare-with",
        metavar="EXPORTER",
        help="another chargy-exporter executable (an older build in its own venv): its Prometheus-only and gRPC rows",
    )
    parser.add_argument(
        "--python-malloc",
        action="store_true",
        help="run this build with PYTHONMALLOC=malloc as well (how the image and the systemd unit run it)",
    )
    args = parser.parse_args()
    builds: list[tuple[str, list[str], dict[str, str]]] = [("this build", exporter_command(), {})]
    if args.python_malloc:
        builds.append(("this build, PYTHONMALLOC=malloc", exporter_command(), {"PYTHONMALLOC": "malloc"}))
    if args.compare_with:
        builds.append(("previous build", [args.compare_with], {}))
    rows = []
    for scale in args.scales:
        first = generate_feed(stations=LIVE_STATIONS * scale, seed=1)
        for name, command, environment in builds:
            # The soak for this build only: the previous build's growth shows within --refreshes.
            soaking = args.soak > args.refreshes and scale == 1 and name == "this build"
            marks = [args.refreshes, args.soak] if soaking else [args.refreshes]
            for push in (None, "grpc", "http/protobuf") if name.startswith("this build") else (None, "grpc"):
                with tempfile.TemporaryDirectory() as scratch, open(Path(scratch) / "log", "wb") as log:
                    started = time.monotonic()
                    result = run(command, first, CHURNING_STATIONS * scale, marks, push, log, environment=environment)
                shown = "Prometheus only" if push is None else f"with {push} push"
                print(f"{len(first.connectors)} {name}, {shown}: {result} in {time.monotonic() - started:.0f} s",
                      file=sys.stderr)  # fmt: skip
                rows.append((len(first.connectors), name, shown, result))
    soak = f" | after {args.soak}" if args.soak > args.refreshes else ""
    head = f"| connectors | build | output | RSS after the first refresh | after {args.refreshes}{soak}"
    print(f"{head} | peak | CPU per refresh |")
    print("|---:|---|---|---:|---:|" + ("---:|" if soak else "") + "---:|---:|")
    for connectors, name, shown, result in rows:
        cells = [f"{result.rss_first:.1f} MB", f"{result.rss[args.refreshes]:.1f} MB"]
        if soak:
            cells.append(f"{result.rss[args.soak]:.1f} MB" if args.soak in result.rss else "–")
        cells += [f"{result.peak:.1f} MB", f"{result.cpu_per_refresh * 1000:.0f} ms"]
        print(f"| {connectors:,} | {name} | {shown} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
