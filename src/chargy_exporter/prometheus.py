"""The Prometheus endpoint. Collecting costs ~200 ms for 1,800 connectors and the data only changes when a refresh
publishes, so `render()` collects once per publish and scrapes only look up bytes encoded from that collection.
Nothing a client sends is kept or echoed: any Accept value maps onto a closed set of bodies (`FORMATS` x identity/gzip,
each encoded at most once per rendering, with its canonical Content-Type); a bounded `name[]` filter is kept nowhere."""

from __future__ import annotations

import gzip
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Final
from urllib.parse import parse_qsl

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import CardinalityLimits, MetricsData
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest as text_generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_generate_latest
from prometheus_client.registry import Collector

from . import process
from .metrics import MetricsPipeline
from .server import THREADS as THREADS  # re-exported: tests and benchmarks import them from here
from .server import MetricsServer as MetricsServer
from .webconfig import WebConfig


@dataclass(frozen=True)
class Format:
    """An exposition format: its media type, the version we write, the versions a client may ask for, its encoder."""

    media: str
    version: str
    accepted_versions: str  # a regular expression
    encode: Callable[[Collector], bytes] = field(compare=False)

    @property
    def content_type(self) -> str:
        return f"{self.media}; version={self.version}; charset=utf-8"

    def specificity(self, media: str, params: dict[str, str]) -> int:
        """How precisely a media range names this format: 3 type and version, 2 type, 1 type/*, 0 */*, -1 not at all."""
        if media == self.media:
            version = params.get("version")
            return 2 if version is None else 3 if re.fullmatch(self.accepted_versions, version) else -1
        return {self.media.split("/")[0] + "/*": 1, "*/*": 0}.get(media, -1)


# Prometheus text 1.0.0 differs from 0.0.4 only for UTF-8 names (every name here is a classic one) and Prometheus parses
# any text/plain version alike; OpenMetrics 2.0 is a draft. So two formats; the first one is the fallback.
FORMATS: Final = (
    Format("text/plain", "0.0.4", ".*", text_generate_latest),
    Format("application/openmetrics-text", "1.0.0", r"1\.[0-9]{1,4}\.[0-9]{1,4}", openmetrics_generate_latest),
)

# Bounds on what negotiation reads of a header (server.py caps the whole request head at MAX_HEAD).
_MAX_MEDIA_RANGES: Final = 32
_MAX_HEADER_CHARS: Final = 4096
_QVALUE: Final = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")
_SERIES_NAME: Final = re.compile(rb"[^{ ]*")
# 4 rather than 6: half the CPU per refresh for a body 13% larger (75 KB instead of 66 KB for today's feed).
GZIP_LEVEL: Final = 4


def _media_ranges(header: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(type/subtype, parameters, q) of each well-formed element of an Accept or Accept-Encoding header."""
    for element in header[:_MAX_HEADER_CHARS].split(",", _MAX_MEDIA_RANGES)[:_MAX_MEDIA_RANGES]:
        media, *parameters = element.split(";")
        pairs = (parameter.partition("=") for parameter in parameters)
        params = {key.strip().lower(): value.strip().strip('"') for key, sep, value in pairs if sep}
        q = params.pop("q", "1")
        if _QVALUE.fullmatch(q):
            yield media.strip().lower(), params, float(q)


def negotiate(accept: str) -> Format:
    """The format for this Accept header: per RFC 9110 a format takes the q of the most specific range naming it; the
    highest q wins, then the range listed first, then FORMATS' order; nothing acceptable: FORMATS[0], text 0.0.4."""
    ranges = list(_media_ranges(accept))
    ranked = []
    for preference, fmt in enumerate(FORMATS):
        # The most specific range naming fmt, the first listed among equals.
        specificity, position, q = max(
            ((fmt.specificity(media, params), -position, q) for position, (media, params, q) in enumerate(ranges)),
            default=(-1, 0, 0.0),
        )
        if specificity >= 0 and q > 0:
            ranked.append(((q, position, -preference), fmt))
    return max(ranked, key=lambda rank: rank[0])[1] if ranked else FORMATS[0]


def gzip_wanted(accept_encoding: str) -> bool:
    """True when Accept-Encoding lists gzip (or x-gzip) with a q above 0."""
    return any(coding in ("gzip", "x-gzip") and q > 0 for coding, _, q in _media_ranges(accept_encoding))


_EOF: Final = b"# EOF\n"  # OpenMetrics' last line: the per-scrape process families end the body with it
# A gzip header (RFC 1952) without name or time: the bytes depend on the body alone.
_GZIP_HEADER: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


@dataclass(frozen=True)
class _OpenGzip:
    """A body compressed once, as a gzip member left open: its deflate blocks end on a byte boundary (a sync flush)
    but none is final, so that each scrape deflates its few process lines as more blocks and closes the member with
    the CRC-32 and size of the whole (RFC 1951/1952). One member: every gzip reader takes it, at the cost of
    compressing ~1 KB per scrape."""

    head: bytes
    crc: int
    size: int

    @classmethod
    def of(cls, body: bytes) -> _OpenGzip:
        deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        return cls(
            _GZIP_HEADER + deflate.compress(body) + deflate.flush(zlib.Z_SYNC_FLUSH), zlib.crc32(body), len(body)
        )

    def closed_with(self, tail: bytes) -> bytes:
        deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        trailer = struct.pack("<II", zlib.crc32(tail, self.crc), (self.size + len(tail)) & 0xFFFFFFFF)
        return self.head + deflate.compress(tail) + deflate.flush() + trailer


class _Rendering:
    """One collection's bodies, without the per-scrape part (the process families, and OpenMetrics' `# EOF`): the
    plain body of each format scrapers asked for lately, encoded at once; each compressed on first ask. A format
    nobody had asked for is encoded on its first ask from a collection of its own (`encode`): keeping the families
    for it would pin several MB of the collection's memory."""

    def __init__(self, bodies: dict[Format, bytes], encode: Callable[[Format], bytes]) -> None:
        self._plain = {fmt: body.removesuffix(_EOF) for fmt, body in bodies.items()}
        self._gzipped: dict[Format, _OpenGzip] = {}
        self._encode = encode
        self._lock = threading.Lock()

    def plain(self, fmt: Format) -> bytes:
        if fmt not in self._plain:
            with self._lock:  # each body encoded and compressed once, however many scrapes ask for it at once
                if fmt not in self._plain:
                    self._plain[fmt] = self._encode(fmt).removesuffix(_EOF)
        return self._plain[fmt]

    def gzipped(self, fmt: Format) -> _OpenGzip:
        if fmt not in self._gzipped:
            plain = self.plain(fmt)
            with self._lock:
                if fmt not in self._gzipped:
                    self._gzipped[fmt] = _OpenGzip.of(plain)
        return self._gzipped[fmt]

    def filtered(self, fmt: Format, names: set[str], tail: bytes) -> bytes:
        """The samples whose series (sample) name is in `names`, with their family's metadata lines, cut from the
        encoded body and `tail`: a sample is one line, its family's `# HELP`/`# TYPE`/`# UNIT` lines come before it."""
        wanted = {name.encode() for name in names}
        kept: list[bytes] = []
        metadata: list[bytes] = []  # of the family being read, until one of its samples is kept
        family = b""
        for line in (self.plain(fmt) + tail).splitlines(keepends=True):
            if line.startswith(b"# EOF"):  # OpenMetrics' last line
                kept.append(line)
            elif line.startswith(b"#"):
                name = line.split(b" ", 3)[2]
                if name != family:
                    family, metadata = name, []
                metadata.append(line)
            elif _SERIES_NAME.match(line).group() in wanted:  # type: ignore[union-attr]
                kept += metadata
                metadata = []
                kept.append(line)
        return b"".join(kept)


class _Reader(PrometheusMetricReader):
    """A Prometheus reader that also keeps the data it collected, for the pipeline's long-lived OTLP readers: one
    collection serves both outputs. `_receive_metrics` is how the SDK's MetricReader hands every reader its collection
    (abstract there, the reader's one extension point; tests/test_metrics.py fails if it stops being called)."""

    received: MetricsData | None = None

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        self.received = metrics_data
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)


def _encoded(pipeline: MetricsPipeline, formats: Iterable[Format]) -> list[bytes]:
    """The published state in each format, from one collection through readers attached for it only: their storage
    of every series goes with them."""
    registry = CollectorRegistry(auto_describe=False)

    def make_reader(limits: CardinalityLimits, network: bool) -> _Reader:
        # No otel_scope_* labels: the series' labels are exactly the documented contract. One target_info.
        return _Reader(
            disable_target_info=not network, scope_info_enabled=False, registry=registry, cardinality_limits=limits
        )

    with pipeline.attached(make_reader) as (network, _):
        families = list(registry.collect())
        # Taken from the reader: it lingers in a reference cycle (with its collector) until the GC's next full pass.
        received, network.received = network.received, None
        pipeline.keep_network(received)
    return [fmt.encode(SimpleNamespace(collect=lambda: families)) for fmt in formats]


class BadQuery(ValueError):
    """A query string over the endpoint's limits; its message is fixed text, safe to send back."""


# Limits on `/metrics?name[]=...`: a filter costs one encoding per request, so its input is bounded.
MAX_QUERY_CHARS: Final = 8192
MAX_NAMES: Final = 32
MAX_NAME_CHARS: Final = 200


def series_names(query: str) -> set[str] | None:
    """The `name[]` values of a query string (None: no filter), or BadQuery when over the limits."""
    if len(query) > MAX_QUERY_CHARS:
        raise BadQuery(f"query string longer than {MAX_QUERY_CHARS} characters\n")
    try:
        pairs = parse_qsl(query, max_num_fields=4 * MAX_NAMES)
    except ValueError:  # more fields than that
        raise BadQuery(f"more than {MAX_NAMES} name[] values\n") from None
    names = {value for key, value in pairs if key == "name[]"}
    if len(names) > MAX_NAMES:
        raise BadQuery(f"more than {MAX_NAMES} name[] values\n")
    if any(len(name) > MAX_NAME_CHARS for name in names):
        raise BadQuery(f"a name[] value longer than {MAX_NAME_CHARS} characters\n")
    return names or None


IDLE_TIMEOUT: Final = 15  # seconds


class PrometheusEndpoint:
    def __init__(self, status_page: Callable[[], bytes] | None = None) -> None:
        self._status_page = status_page  # the HTML a browser gets at `/` (page.py)
        self._rendering = _Rendering({}, lambda fmt: fmt.encode(CollectorRegistry()))  # empty, until a render
        # Bodies asked for since the last render, and in the period before it (a subset of FORMATS x gzip): a render
        # encodes them. Two periods, so that a scrape landing just before or just after a render counts for both.
        self._asked: set[tuple[Format, bool]] = set()
        self._asked_before: set[tuple[Format, bool]] = set()
        self._asked_lock = threading.Lock()

    def render(self, pipeline: MetricsPipeline) -> None:
        """Collect once and keep the bodies for the scrapes until the next render."""
        with self._asked_lock:
            asked = self._asked | self._asked_before
            self._asked_before, self._asked = self._asked, set()
        formats = list({fmt for fmt, _ in asked})  # none: nobody scrapes, nothing to collect until someone does
        plain = _encoded(pipeline, formats) if formats else []
        rendering = _Rendering(dict(zip(formats, plain, strict=True)), lambda fmt: _encoded(pipeline, [fmt])[0])
        for fmt, gzipped in asked:
            if gzipped:
                rendering.gzipped(fmt)
            else:
                rendering.plain(fmt)
        self._rendering = rendering  # one reference swap: a scrape sees the old or the new rendering, whole

    def exposition(self, accept: str, accept_encoding: str, names: set[str] | None = None) -> tuple[str, bool, bytes]:
        """(content type, gzipped, body) for a scrape."""
        fmt, gzipped = negotiate(accept), gzip_wanted(accept_encoding)
        # The process families, read now (~1 KB), after the rendering's body: fresh at every scrape.
        tail = process.exposition(openmetrics=fmt.media == "application/openmetrics-text")
        rendering = self._rendering
        if names:
            plain = rendering.filtered(fmt, names, tail)
            return fmt.content_type, gzipped, gzip.compress(plain, compresslevel=GZIP_LEVEL) if gzipped else plain
        with self._asked_lock:
            self._asked.add((fmt, gzipped))
        body = rendering.gzipped(fmt).closed_with(tail) if gzipped else rendering.plain(fmt) + tail
        return fmt.content_type, gzipped, body

    def wsgi_app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/")
        accept = environ.get("HTTP_ACCEPT", "")
        status, headers, body = "200 OK", [("Content-Type", "text/plain")], b"ok\n"
        if method not in ("GET", "HEAD"):
            status, body = "405 Method Not Allowed", b"method not allowed\n"
            headers.append(("Allow", "GET, HEAD"))
        elif path == "/" and self._status_page and "html" in accept and "openmetrics" not in accept:
            headers = [("Content-Type", "text/html; charset=utf-8"), ("Vary", "Accept")]
            body = self._status_page()
        elif path in ("/metrics", "/"):
            try:
                names = series_names(environ.get("QUERY_STRING", ""))
            except BadQuery as error:
                status, headers = "400 Bad Request", [("Content-Type", "text/plain; charset=utf-8")]
                body = str(error).encode()
            else:
                content_type, gzipped, body = self.exposition(accept, environ.get("HTTP_ACCEPT_ENCODING", ""), names)
                headers = [("Content-Type", content_type), ("Vary", "Accept, Accept-Encoding")]
                if gzipped:
                    headers.append(("Content-Encoding", "gzip"))
        elif path != "/healthz":
            status, body = "404 Not Found", b"not found\n"
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [] if method == "HEAD" else [body]  # server.py writes the kept bytes in slices, never a copy

    def serve(
        self, host: str, port: int, idle_timeout: float = IDLE_TIMEOUT, web_config: WebConfig | None = None
    ) -> MetricsServer:
        """The server of wsgi_app; with a web configuration, over TLS and/or behind basic auth as it says."""
        app, tls = (self.wsgi_app, None) if web_config is None else web_config.wrap(self.wsgi_app)
        return MetricsServer(app, host, port, idle_timeout, tls)
