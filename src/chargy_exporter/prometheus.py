"""The Prometheus endpoint: the OTel `PrometheusMetricReader` renders, once per published state, and scrapes
are answered from that rendering.

The reader rebuilds the whole exposition on every collection (~350 ms for 1,700 connectors), yet the data only
changes when a refresh publishes. So the pipeline asks us to `render()` after each publish: one collection
through the OTel reader, whose metric families are kept. A scrape then only looks up bytes already encoded for
its format (Prometheus text or OpenMetrics, as prometheus_client negotiates from the Accept header) and
compression; the first scrape in a new format encodes the kept families once and keeps that too.
"""

from __future__ import annotations

import gzip
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, make_server

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import CardinalityLimits
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric

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

    def restricted(self, names: set[str]) -> _Families:
        return _Families(family for family in self._families if family.name in names)


@dataclass
class _Rendering:
    """One collection's families and the bodies encoded from them so far, by (content type, gzip)."""

    families: _Families
    bodies: dict[tuple[str, bool], bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def body(self, content_type: str, encoder: Callable[[_Families], bytes], gzipped: bool) -> bytes:
        key = (content_type, gzipped)
        body = self.bodies.get(key)
        if body is None:
            with self.lock:
                body = self.bodies.get(key)
                if body is None:
                    plain = self.bodies.get((content_type, False)) or encoder(self.families)
                    self.bodies[(content_type, False)] = plain
                    body = gzip.compress(plain, compresslevel=6) if gzipped else plain
                    self.bodies[key] = body
        return body


class PrometheusEndpoint:
    def __init__(self, status_page: StatusPage | None = None) -> None:
        self._status_page = status_page
        self._registry: CollectorRegistry | None = None
        self._rendering = _Rendering(_Families(()))
        # Formats asked for since the last render: the next render encodes them up front.
        self._asked_for: set[tuple[str, bool]] = set()

    def make_reader(self, limits: CardinalityLimits) -> PrometheusMetricReader:
        """A reader for a new MeterProvider; its own registry replaces the previous reader's."""
        registry = CollectorRegistry(auto_describe=False)
        # No otel_scope_* labels: the series' labels are exactly the documented contract.
        reader = PrometheusMetricReader(scope_info_enabled=False, registry=registry, cardinality_limits=limits)
        self._registry = registry
        return reader

    def render(self) -> None:
        """Collect once through the OTel reader and keep the result for the scrapes until the next render."""
        if self._registry is None:
            return
        rendering = _Rendering(_Families(self._registry.collect()))
        asked, self._asked_for = self._asked_for, set()
        # set() copies in one step; a scrape thread may still be adding to `asked` while we loop.
        warm = set(asked) or {(choose_encoder("")[1], False)}
        for content_type, gzipped in warm:
            encoder = _encoder_for(content_type)
            if encoder is not None:
                rendering.body(content_type, encoder, gzipped)
        self._rendering = rendering  # one reference swap: a scrape sees the old or the new rendering, whole

    def exposition(self, accept: str, accept_encoding: str, names: set[str] | None = None) -> tuple[str, bool, bytes]:
        """(content type, gzipped, body) for a scrape."""
        encoder, content_type = choose_encoder(accept)
        gzipped = gzip_accepted(accept_encoding)
        rendering = self._rendering
        if names:
            plain = encoder(rendering.families.restricted(names))
            return content_type, gzipped, gzip.compress(plain) if gzipped else plain
        self._asked_for.add((content_type, gzipped))
        return content_type, gzipped, rendering.body(content_type, encoder, gzipped)

    # ---- HTTP --------------------------------------------------------------------------------------------------

    def wsgi_app(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")])
            return [b"method not allowed\n"]
        if path in ("/metrics", "/"):
            if (
                path == "/"
                and "html" in environ.get("HTTP_ACCEPT", "")
                and "openmetrics" not in environ.get("HTTP_ACCEPT", "")
                and self._status_page is not None
            ):
                headers = [("Content-Type", "text/html; charset=utf-8"), ("Vary", "Accept")]
                return _respond(start_response, method, "200 OK", headers, self._status_page())
            names = set(parse_qs(environ.get("QUERY_STRING", "")).get("name[]", ())) or None
            content_type, gzipped, body = self.exposition(
                environ.get("HTTP_ACCEPT", ""), environ.get("HTTP_ACCEPT_ENCODING", ""), names
            )
            headers = [("Content-Type", content_type), ("Vary", "Accept, Accept-Encoding")]
            if gzipped:
                headers.append(("Content-Encoding", "gzip"))
            return _respond(start_response, method, "200 OK", headers, body)
        if path == "/healthz":
            return _respond(start_response, method, "200 OK", [("Content-Type", "text/plain")], b"ok\n")
        return _respond(start_response, method, "404 Not Found", [("Content-Type", "text/plain")], b"not found\n")

    def serve(self, host: str, port: int) -> MetricsServer:
        return MetricsServer(self.wsgi_app, host, port)


def _encoder_for(content_type: str) -> Callable[[_Families], bytes] | None:
    # choose_encoder maps an Accept header to (encoder, content type); a content type is a valid Accept value.
    media = content_type.split(";")[0]
    params = ";".join(part for part in content_type.split(";")[1:] if not part.strip().startswith("charset"))
    encoder, chosen = choose_encoder(f"{media};{params}" if params else media)
    return encoder if chosen == content_type else None


def _respond(
    start_response: StartResponse, method: str, status: str, headers: list[tuple[str, str]], body: bytes
) -> list[bytes]:
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return [] if method == "HEAD" else [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer:
    """prometheus_client's threading WSGI server on host:port, IPv4 or IPv6, in a daemon thread."""

    def __init__(self, app: Callable[..., list[bytes]], host: str, port: int) -> None:
        family, address = _best_family(host, port)

        class Server(ThreadingWSGIServer):
            address_family = family

        self._httpd = make_server(address, port, app, server_class=Server, handler_class=_QuietHandler)
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _best_family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])
