"""The Prometheus endpoint: the OTel `PrometheusMetricReader` renders, once per published state, and scrapes
are answered from that rendering.

The reader rebuilds the whole exposition on every collection (~150 ms for 1,800 connectors), yet the data only
changes when a refresh publishes. So the pipeline asks us to `render()` after each publish: one collection
through an OTel reader attached for it, whose metric families are kept. A scrape only looks up encoded bytes.

What a client sends never decides what is kept. The bodies form a closed set: the formats in `FORMATS`
(Prometheus text 0.0.4, OpenMetrics 1.0.0) times identity/gzip, so at most four per rendering, each encoded at
most once per rendering, each answered with its own canonical Content-Type. `negotiate` maps any Accept value
onto one of them (anything it does not understand falls back to Prometheus text 0.0.4). A `name[]` filter is
encoded per request and kept nowhere; its size is capped. No response header carries client text.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import resource
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl

import waitress
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest as text_generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_generate_latest

from .metrics import MetricsPipeline

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
# The page a browser gets at `/` (HTML bytes, built from the published state; see page.py).
StatusPage = Callable[[], bytes]


class _Families:
    """The collector interface prometheus_client's encoders read from, over families collected already."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = tuple(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


# ---- formats and negotiation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """One exposition format the endpoint serves: its canonical Content-Type and its encoder."""

    name: str
    content_type: str
    encode: Callable[[_Families], bytes] = field(compare=False, repr=False)


PROMETHEUS_TEXT: Final = Format(
    "prometheus-text-0.0.4", "text/plain; version=0.0.4; charset=utf-8", text_generate_latest
)
OPENMETRICS: Final = Format(
    "openmetrics-1.0.0", "application/openmetrics-text; version=1.0.0; charset=utf-8", openmetrics_generate_latest
)
# In order of preference when a client likes several equally. Prometheus text 1.0.0 (and its `escaping`
# parameter) differs from 0.0.4 only for UTF-8 metric and label names: every name here is a classic one, so its
# body would be the same bytes under another label; Prometheus parses any text/plain version with the same
# parser. OpenMetrics 2.0.0 is still a draft. So two formats: a client asking for anything else gets text 0.0.4.
FORMATS: Final = (PROMETHEUS_TEXT, OPENMETRICS)

# Bounds on what negotiation reads of a header (waitress already caps all headers at max_request_header_size).
_MAX_MEDIA_RANGES: Final = 32
_MAX_HEADER_CHARS: Final = 4096
_QVALUE: Final = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")
_OPENMETRICS_1: Final = re.compile(r"1\.[0-9]{1,4}\.[0-9]{1,4}")


def _media_ranges(header: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(type/subtype, parameters, q) of each well-formed element of an Accept or Accept-Encoding header."""
    for element in header[:_MAX_HEADER_CHARS].split(",", _MAX_MEDIA_RANGES)[:_MAX_MEDIA_RANGES]:
        media, *parameters = element.split(";")
        params: dict[str, str] = {}
        for parameter in parameters:
            key, sep, value = parameter.partition("=")
            if sep:
                params[key.strip().lower()] = value.strip().strip('"')
        q = params.pop("q", "1")
        if _QVALUE.fullmatch(q):
            yield media.strip().lower(), params, float(q)


def _specificity(fmt: Format, media: str, params: dict[str, str]) -> int:
    """How precisely a media range names `fmt`: 3 type and version, 2 type, 1 type/*, 0 */*, -1 not at all."""
    if fmt is OPENMETRICS:
        if media == "application/openmetrics-text":
            version = params.get("version")
            if version is None:
                return 2
            # OpenMetrics 1.x is what we write; another version (or garbage) is not this format.
            return 3 if _OPENMETRICS_1.fullmatch(version) else -1
        return 1 if media == "application/*" else 0 if media == "*/*" else -1
    # Prometheus text: any text/plain; it is also where everything else falls back to.
    if media == "text/plain":
        return 3 if "version" in params else 2
    return 1 if media == "text/*" else 0 if media == "*/*" else -1


def negotiate(accept: str) -> Format:
    """The format of `FORMATS` a client with this Accept header gets: per RFC 9110, each format takes the q of
    the most specific range naming it; the highest q wins, then the range listed first, then FORMATS' order.
    Nothing acceptable, or an unreadable header: Prometheus text 0.0.4."""
    best: tuple[float, int, int] | None = None
    chosen = PROMETHEUS_TEXT
    ranges = list(_media_ranges(accept))
    for preference, fmt in enumerate(FORMATS):
        match: tuple[int, float, int] | None = None  # (specificity, q, position)
        for position, (media, params, q) in enumerate(ranges):
            specificity = _specificity(fmt, media, params)
            if specificity >= 0 and (match is None or specificity > match[0]):
                match = (specificity, q, position)
        if match is None or match[1] <= 0:
            continue
        rank = (match[1], -match[2], -preference)
        if best is None or rank > best:
            best, chosen = rank, fmt
    return chosen


def gzip_wanted(accept_encoding: str) -> bool:
    """True when Accept-Encoding lists gzip (or x-gzip) with a q above 0."""
    return any(coding in ("gzip", "x-gzip") and q > 0 for coding, _, q in _media_ranges(accept_encoding))


# ---- the kept rendering -----------------------------------------------------------------------------------------


class _Rendering:
    """One collection's families and the bodies encoded from them so far: at most one per (format, gzipped)."""

    def __init__(self, families: Iterable[Metric], count_encoding: Callable[[], None]) -> None:
        self.families = tuple(families)
        # Sample (series) name -> the families holding such samples, for `name[]`.
        holders: dict[str, list[Metric]] = {}
        for family in self.families:
            for name in {sample.name for sample in family.samples}:
                holders.setdefault(name, []).append(family)
        self.by_series_name = {name: tuple(families) for name, families in holders.items()}
        self.bodies: dict[tuple[Format, bool], bytes] = {}
        self._lock = threading.Lock()
        self._count_encoding = count_encoding

    def body(self, fmt: Format, gzipped: bool) -> bytes:
        key = (fmt, gzipped)
        body = self.bodies.get(key)
        if body is None:
            with self._lock:
                body = self.bodies.get(key)
                if body is None:
                    plain = self.bodies.get((fmt, False))
                    if plain is None:
                        plain = fmt.encode(_Families(self.families))
                        self._count_encoding()
                        self.bodies[(fmt, False)] = plain
                    body = plain
                    if gzipped:
                        body = gzip.compress(plain, compresslevel=6)
                        self._count_encoding()
                        self.bodies[key] = body
        return body

    def filtered(self, fmt: Format, names: set[str]) -> bytes:
        """The samples whose series name is in `names`, in their families: encoded now, kept nowhere."""
        wanted = {id(family) for name in names for family in self.by_series_name.get(name, ())}
        selected = []
        for family in self.families:  # in exposition order
            if id(family) in wanted:
                subset = Metric(family.name, family.documentation, family.type, family.unit)
                subset.samples = [sample for sample in family.samples if sample.name in names]
                selected.append(subset)
        return fmt.encode(_Families(selected))


class BadQuery(ValueError):
    """A query string over the endpoint's limits; its message is fixed text, safe to send back."""


# Limits on `/metrics?name[]=...`: a filter costs one encoding per request, so its input is bounded.
MAX_QUERY_CHARS: Final = 8192
MAX_NAMES: Final = 32
MAX_NAME_CHARS: Final = 200


def series_names(query: str) -> set[str] | None:
    """The `name[]` values of a query string (None: no filter), or BadQuery when over the limits."""
    if not query:
        return None
    if len(query) > MAX_QUERY_CHARS:
        raise BadQuery(f"query string longer than {MAX_QUERY_CHARS} characters\n")
    try:
        pairs = parse_qsl(query, max_num_fields=4 * MAX_NAMES)
    except ValueError:
        raise BadQuery(f"more than {MAX_NAMES} name[] values\n") from None
    names = {value for key, value in pairs if key == "name[]"}
    if len(names) > MAX_NAMES:
        raise BadQuery(f"more than {MAX_NAMES} name[] values\n")
    if any(len(name) > MAX_NAME_CHARS for name in names):
        raise BadQuery(f"a name[] value longer than {MAX_NAME_CHARS} characters\n")
    return names or None


class PrometheusEndpoint:
    def __init__(self, status_page: StatusPage | None = None) -> None:
        self._status_page = status_page
        self._encodings = 0
        self._encodings_lock = threading.Lock()
        self._rendering = _Rendering((), self._count_encoding)
        # Bodies asked for since the last render (a subset of FORMATS x gzip): the next render encodes them.
        self._asked_for: set[tuple[Format, bool]] = set()
        self._asked_lock = threading.Lock()

    def render(self, pipeline: MetricsPipeline) -> None:
        """Collect once, through a reader attached for this collection only, and keep the result for the scrapes
        until the next render: the reader's storage (every series' aggregation) goes with it."""
        registry = CollectorRegistry(auto_describe=False)
        # No otel_scope_* labels: the series' labels are exactly the documented contract.
        reader = PrometheusMetricReader(scope_info_enabled=False, registry=registry, cardinality_limits=pipeline.limits)
        with pipeline.attached(reader):
            rendering = _Rendering(registry.collect(), self._count_encoding)
        with self._asked_lock:
            asked, self._asked_for = self._asked_for, set()
        for fmt, gzipped in asked or {(PROMETHEUS_TEXT, False)}:
            rendering.body(fmt, gzipped)
        self._rendering = rendering  # one reference swap: a scrape sees the old or the new rendering, whole

    @property
    def encodings(self) -> int:
        """Full-exposition encodings (and compressions) done so far: what renders and cache misses cost."""
        return self._encodings

    def kept_bodies(self) -> set[tuple[str, bool]]:
        """(Content-Type, gzipped) of each body the current rendering keeps."""
        return {(fmt.content_type, gzipped) for fmt, gzipped in list(self._rendering.bodies)}

    def _count_encoding(self) -> None:
        with self._encodings_lock:  # an old rendering may still encode for a scrape while render() encodes
            self._encodings += 1

    def exposition(self, accept: str, accept_encoding: str, names: set[str] | None = None) -> tuple[str, bool, bytes]:
        """(content type, gzipped, body) for a scrape."""
        fmt = negotiate(accept)
        gzipped = gzip_wanted(accept_encoding)
        rendering = self._rendering
        if names:
            plain = rendering.filtered(fmt, names)
            return fmt.content_type, gzipped, gzip.compress(plain, compresslevel=6) if gzipped else plain
        if (fmt, gzipped) not in self._asked_for:
            with self._asked_lock:
                self._asked_for.add((fmt, gzipped))
        return fmt.content_type, gzipped, rendering.body(fmt, gzipped)

    # ---- HTTP --------------------------------------------------------------------------------------------------

    def wsgi_app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")])
            return [b"method not allowed\n"]
        if path in ("/metrics", "/"):
            accept = environ.get("HTTP_ACCEPT", "")
            if path == "/" and "html" in accept and "openmetrics" not in accept and self._status_page is not None:
                headers = [("Content-Type", "text/html; charset=utf-8"), ("Vary", "Accept")]
                return _respond(environ, start_response, "200 OK", headers, self._status_page())
            try:
                names = series_names(environ.get("QUERY_STRING", ""))
            except BadQuery as error:
                headers = [("Content-Type", "text/plain; charset=utf-8")]
                return _respond(environ, start_response, "400 Bad Request", headers, str(error).encode())
            content_type, gzipped, body = self.exposition(accept, environ.get("HTTP_ACCEPT_ENCODING", ""), names)
            headers = [("Content-Type", content_type), ("Vary", "Accept, Accept-Encoding")]
            if gzipped:
                headers.append(("Content-Encoding", "gzip"))
            return _respond(environ, start_response, "200 OK", headers, body)
        if path == "/healthz":
            return _respond(environ, start_response, "200 OK", [("Content-Type", "text/plain")], b"ok\n")
        return _respond(environ, start_response, "404 Not Found", [("Content-Type", "text/plain")], b"not found\n")

    def serve(self, host: str, port: int, limits: ServerLimits | None = None) -> MetricsServer:
        return MetricsServer(self.wsgi_app, host, port, limits or ServerLimits())


def _respond(
    environ: dict[str, Any], start_response: StartResponse, status: str, headers: list[tuple[str, str]], body: bytes
) -> Iterable[bytes]:
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    if environ.get("REQUEST_METHOD") == "HEAD":
        return []
    file_wrapper = environ.get("wsgi.file_wrapper")
    if file_wrapper is not None and len(body) > 65536:
        # PEP 3333's file wrapper: waitress sends from the BytesIO, which shares the kept bytes, instead of
        # copying the body into a per-connection buffer (or a temporary file, past 1 MB) for each scrape.
        return file_wrapper(io.BytesIO(body))  # type: ignore[no-any-return]
    return [body]


# ---- the HTTP server --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerLimits:
    """How much the HTTP server gives its clients (waitress' adjustments of the same names)."""

    # Worker threads running the WSGI app; connections are read and written by one event loop thread.
    threads: int = 4
    # listen() backlog: connections the kernel completes before the loop accepts them.
    backlog: int = 1024
    # Open connections at most (lowered to fit the process' file descriptor limit); above it the server stops
    # accepting until some close, and new ones wait in the backlog.
    connection_limit: int = 2048
    # A connection with no request in progress and no activity for this long is closed (seconds).
    channel_timeout: int = 15
    # How often idle connections are looked for (seconds).
    cleanup_interval: int = 1
    # Request line plus headers, in bytes; over it: 431.
    max_request_header_size: int = 16384
    # We take no request bodies: one over this is answered 413 before the app sees it.
    max_request_body_size: int = 1024


# Headroom of file descriptors for everything else in the process (feed client, OTLP exporter, logs).
_FD_RESERVE: Final = 64


class MetricsServer:
    """waitress on host:port, IPv4 or IPv6, its event loop in a daemon thread.

    Why waitress rather than socketserver tuned by hand, or cheroot: a scrape takes a millisecond; what made
    scrapers wait seconds was the I/O model. socketserver gives every connection a thread for its whole life
    (idle or slow clients hold threads without bound) behind a backlog of 5. A bounded thread pool in front of
    blocking sockets only moves the problem: idle and slow connections then hold the pool. waitress reads and
    writes every connection in one select/poll loop and hands only complete requests to a fixed pool of
    workers, so an idle, slowly-sending or slowly-reading client costs a file descriptor and a small buffer,
    never a thread; it has the listen backlog, a hard connection limit, an inactivity timeout and header/body
    size limits as plain options; it is pure Python with no dependencies, maintained by the Pylons project.
    cheroot has a public stop() (waitress has none, see `shutdown`), but its workers read requests and write
    responses with blocking sockets, so each slow client holds a worker for up to its timeout per byte.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], host: str, port: int, limits: ServerLimits) -> None:
        family, address = _best_family(host, port)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as socketserver did: restarts rebind
            sock.bind((address, port))
        except OSError:
            sock.close()
            raise
        self.limits = limits
        # waitress warns at every request queued behind busy workers: under a burst of scrapers that is a log line
        # per scrape, for a wait of milliseconds. Its connection-limit warnings (logger "waitress") stay.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        soft_fds, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        connection_limit = limits.connection_limit
        if soft_fds != resource.RLIM_INFINITY:
            connection_limit = max(16, min(connection_limit, soft_fds - _FD_RESERVE))
        # One map per server: shutdown() empties it, which is what ends the event loop.
        self._map: dict[int, Any] = {}
        self._server: Any = waitress.create_server(
            app,
            map=self._map,
            sockets=[sock],  # bound above, like socketserver did (no IPV6_V6ONLY): `--host` means the same
            threads=limits.threads,
            backlog=limits.backlog,
            connection_limit=connection_limit,
            channel_timeout=limits.channel_timeout,
            cleanup_interval=limits.cleanup_interval,
            max_request_header_size=limits.max_request_header_size,
            max_request_body_size=limits.max_request_body_size,
            asyncore_use_poll=True,  # select() cannot watch descriptors past 1024
            ident="chargy-exporter",
        )
        self.port: int = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, name="metrics-http", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 1.0) -> None:
        """Stop accepting, close every connection, end the loop and the workers; within about `timeout`.

        waitress has no public stop (its maintainers say so: Pylons/waitress#343, #372); its own Ctrl-C path
        closes every dispatcher of the loop's map and shuts the task dispatcher down. We do the same, running the
        closing in the loop thread through waitress' trigger (the way waitress hands work to that thread), so no
        socket is closed under the loop's feet. tests/test_http_limits.py checks the port is free and the threads
        gone afterwards, so a waitress release that changes this fails there, not in production.
        """

        def close_everything() -> None:  # runs in the event loop thread
            for dispatcher in list(self._map.values()):
                if dispatcher is self._server:
                    dispatcher.close()  # the listening socket (and the trigger, closed with it)
                else:
                    dispatcher.handle_close()  # a connection: also wakes a worker waiting to write to it

        if self._thread.is_alive():
            self._server.trigger.pull_trigger(close_everything)
            self._thread.join(timeout)
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=max(0.1, timeout / 2))


def _best_family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])
