"""Fetch the raw feed: HTTP(S) with retries, one deadline, a size cap and conditional requests; or a file. A fetch
returns bytes (or "not modified") or raises `FeedError`: a reason for the error counter, a message without the key."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3 import BaseHTTPResponse
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError, ReadTimeoutError
from urllib3.util import Retry, Timeout

from . import __version__
from .config import Config, local_feed_path
from .demo import DemoNetwork

log = logging.getLogger(__name__)

# The upstream answers 406 to a client that prefers JSON: ask for KML/XML first.
ACCEPT: Final = "application/vnd.google-earth.kml+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.1"
# The longest a Retry-After may hold a retry (urllib3 would sleep up to 6 h); longer waits are the refresher's.
RETRY_AFTER_CAP: Final = 10.0


class FeedError(Exception):
    """A fetch failed; `reason` is a short label (timeout, connection, http_5xx, unauthorized, too_large, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# One deadline (--fetch-timeout) bounds a whole fetch, retries included; urllib3 runs them all on the fetching
# thread, so the fetch under way is thread-local state. Each attempt gets the time that remains; no retry waits
# past the deadline. A read timeout bounds each wait for data, not the whole, which a server trickling its headers
# or body never trips: so a timer shuts the fetch's sockets down at the deadline (the only way to end a read
# blocked in another thread). Connections record themselves when they send a request: neither requests nor
# urllib3 tell the connection in use before the headers have arrived.
_fetch = threading.local()


def _remaining() -> float:
    return float(getattr(_fetch, "deadline", float("inf"))) - time.monotonic()


class _DeadlineTimeout(Timeout):
    def clone(self) -> Timeout:
        return Timeout(total=max(_remaining(), 0.001))  # urllib3 refuses 0: an attempt at the deadline fails at once


class _DeadlineRetry(Retry):
    def increment(self, method: str | None = None, url: str | None = None, *args: Any, **kwargs: Any) -> _DeadlineRetry:
        retry = super().increment(method, url, *args, **kwargs)
        response, error = kwargs.get("response"), kwargs.get("error")  # urllib3 passes them by keyword
        wait = retry.get_retry_after(response) if response is not None else None
        if (retry.get_backoff_time() if wait is None else wait) >= _remaining():
            # Out of time: urllib3 raises the error, or returns the response (a 503 stays http_5xx).
            raise MaxRetryError(kwargs.get("_pool"), url, error) from error  # type: ignore[arg-type]
        return retry

    def get_retry_after(self, response: BaseHTTPResponse) -> float | None:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, RETRY_AFTER_CAP)


class _RecordedHTTPConnection(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        getattr(_fetch, "connections", []).append(self)
        super().request(*args, **kwargs)


class _RecordedHTTPSConnection(_RecordedHTTPConnection, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _RecordedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _RecordedHTTPSConnection


@dataclass(frozen=True)
class Validators:
    """HTTP cache validators of the last document that was parsed successfully."""

    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class FetchResult:
    body: bytes | None  # None: the server said 304 Not Modified
    validators: Validators


class FeedClient:
    """Fetches the feed; one fetch at a time (the refresher's thread)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._session = requests.Session()
        user_agent = f"chargy-exporter/{__version__}"
        self._session.headers.update({"Accept": ACCEPT, "User-Agent": user_agent, "Accept-Encoding": "gzip"})
        retried = (429, 500, 502, 503, 504)
        retry = _DeadlineRetry(total=2, backoff_factor=0.5, status_forcelist=retried, raise_on_status=False)
        adapter = HTTPAdapter(max_retries=retry)
        adapter.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._demo = DemoNetwork() if config.demo else None
        if self._demo is not None:
            counts = (f"{n:,}" for n in (len(self._demo.stations), self._demo.devices, self._demo.connectors))
            log.info(
                "serving the built-in demo network: %s stations, %s devices, %s connectors (not real data)", *counts
            )

    def close(self) -> None:
        self._session.close()

    def fetch(self, validators: Validators | None = None) -> FetchResult:
        if self._demo is not None:  # a new document per refresh, read by the same parser as the live feed's
            return FetchResult(self._demo.document(), Validators())
        if urlsplit(self._config.kml_url).scheme in ("http", "https"):
            return self._fetch_http(validators or Validators())
        path = local_feed_path(self._config.kml_url)
        try:
            with path.open("rb") as file:
                return FetchResult(self._capped([file.read(self._config.max_feed_bytes + 1)]), Validators())
        except OSError as error:
            raise FeedError("file", f"cannot read {path}: {error.strerror or error}") from None

    def _fetch_http(self, validators: Validators) -> FetchResult:
        conditions = {"If-None-Match": validators.etag, "If-Modified-Since": validators.last_modified}
        headers = {name: value for name, value in conditions.items() if value}
        # requests hands a urllib3 Timeout to urllib3 as it is (its types say float or tuple only).
        timeout: Any = _DeadlineTimeout(total=self._config.fetch_timeout)
        url = self._config.kml_url
        with self._deadline() as fired, self._session.get(url, headers=headers, timeout=timeout, stream=True) as answer:
            status = answer.status_code
            if status == 304:
                return FetchResult(None, validators)
            if status in (401, 403):
                key = "set --kml-url / KML_URL with a valid key"
                raise FeedError("unauthorized", f"the feed refused the API key (HTTP {status}): {key}")
            if status != 200:
                reason = "http_5xx" if 500 <= status < 600 else "http_status"
                raise FeedError(reason, f"the feed answered HTTP {status}")
            declared, limit = answer.headers.get("Content-Length", ""), self._config.max_feed_bytes
            if declared.isdigit() and int(declared) > limit and "Content-Encoding" not in answer.headers:
                raise FeedError("too_large", f"the feed announces {declared} bytes, over the {limit}-byte limit")
            # iter_content decompresses: the cap applies to what we would parse (a gzip bomb stops here too).
            body = self._capped(answer.iter_content(64 * 1024))
            if fired.is_set():  # cut after the last byte arrived, but before the deadline was checked
                raise requests.Timeout()
            return FetchResult(body, Validators(answer.headers.get("ETag"), answer.headers.get("Last-Modified")))

    @contextlib.contextmanager
    def _deadline(self) -> Iterator[threading.Event]:
        """The fetch under way; the event tells whether the deadline cut it. Its errors become FeedErrors."""
        fired, connections = threading.Event(), list[HTTPConnection]()

        def cut() -> None:
            fired.set()
            for connection in list(connections):
                # Reads then see end-of-file. socket.socket's shutdown: SSLSocket's would unwrap TLS under the reader.
                with contextlib.suppress(OSError, TypeError):  # already closed, or not connected (sock None)
                    socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)

        _fetch.deadline, _fetch.connections = time.monotonic() + self._config.fetch_timeout, connections
        watchdog = threading.Timer(self._config.fetch_timeout, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            yield fired
        except requests.RequestException as error:
            raise self._failure(error, fired.is_set()) from None
        finally:
            watchdog.cancel()
            del _fetch.deadline, _fetch.connections

    def _capped(self, chunks: Iterable[bytes]) -> bytes:
        limit, kept, size = self._config.max_feed_bytes, [], 0
        for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise FeedError("too_large", f"the feed is over the {limit}-byte limit (--max-feed-bytes)")
            kept.append(chunk)
        return b"".join(kept)

    def _failure(self, error: requests.RequestException, cut: bool) -> FeedError:
        """The FeedError for what requests raised; `cut`: the deadline cut the fetch's connections."""
        cause = error.args[0] if error.args else None
        cause = getattr(cause, "reason", cause)  # urllib3's MaxRetryError keeps the last attempt's error there
        if isinstance(cause, NewConnectionError):  # refused, unreachable (it subclasses ConnectTimeoutError)
            reason, summary = "connection", "cannot connect to the feed"
        elif cut or isinstance(error, requests.Timeout) or isinstance(cause, (ReadTimeoutError, ConnectTimeoutError)):
            # Retries exhausted on timeouts arrive as a ConnectionError, with the timeout as cause.
            reason, summary = "timeout", f"no complete answer within {self._config.fetch_timeout:g} s"
        elif isinstance(error, requests.ConnectionError):
            reason, summary = "connection", "cannot connect to the feed"
        elif isinstance(error, requests.TooManyRedirects):
            reason, summary = "http_redirect", "too many redirects"
        else:  # ChunkedEncodingError, ContentDecodingError: cut off, or not what it said it was
            reason, summary = "broken_response", "the answer was cut off or corrupt"
        return FeedError(reason, self._config.redact(f"{summary}: {plain_cause(error)}"))


# urllib3 prefixes its messages with the pool's repr: "HTTPConnectionPool(host='h', port=80): ".
_REPR_PREFIX: Final = re.compile(r"^\w+\(host=[^)]*\):\s*")


def plain_cause(error: BaseException) -> str:
    """The most specific message of an error chain (requests wraps urllib3, which wraps the socket error), in words,
    without the reprs of pools, retries and URLs that requests and urllib3 pile up."""
    text, seen = "", set[int]()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        first = link.args[0] if link.args else None
        if isinstance(first, str) and first.strip():
            text = first
        elif not text and isinstance(link, OSError) and link.strerror:
            text = link.strerror
        causes = (getattr(link, "reason", None), link.__cause__, first, link.__context__)
        link = next((cause for cause in causes if isinstance(cause, BaseException)), None)
    return _REPR_PREFIX.sub("", " ".join(text.split())) or type(error).__name__
