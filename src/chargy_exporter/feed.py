"""Fetch the raw feed document: HTTP(S) with retries, timeouts, a size cap and conditional requests; or a file.

Nothing here parses: a fetch returns bytes (or "not modified") or raises `FeedError` with a short reason for the
error counter and a message that never contains the API key.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3 import BaseHTTPResponse
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import ConnectionPool, HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError, ReadTimeoutError, ResponseError
from urllib3.util import Retry, Timeout

from . import __version__
from .config import Config, local_feed_path

# Re-exported until metrics.py imports it from model, where the reason vocabulary lives.

log = logging.getLogger(__name__)

# The upstream answers 406 to a client that prefers JSON: ask for KML/XML first.
ACCEPT: Final = "application/vnd.google-earth.kml+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.1"
USER_AGENT: Final = f"chargy-exporter/{__version__}"
_CHUNK: Final = 64 * 1024
# The longest a server's Retry-After may hold one retry (urllib3 would otherwise sleep up to 6 hours); never past
# the fetch's deadline either. Longer waits are the refresher's job, which keeps serving the last good data.
RETRY_AFTER_CAP: Final = 10.0
# The shortest timeout urllib3 accepts is above 0: an attempt that starts at the deadline fails at once with it.
_NO_TIME_LEFT: Final = 0.001


class FeedError(Exception):
    """A fetch failed; `reason` is a short label (timeout, connection, http_5xx, unauthorized, too_large, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---- one deadline per fetch --------------------------------------------------------------------------------------
#
# --fetch-timeout bounds a whole fetch, retries included. urllib3 runs the attempts, their timeouts and the retries
# on the fetching thread, so the fetch under way is thread-local state that each of the three reads:
# - each attempt's connect and read timeouts are what remains until the deadline (`_DeadlineTimeout.clone`, which
#   urllib3 calls once per attempt);
# - no retry is made whose backoff or Retry-After wait would reach the deadline (`_DeadlineRetry`);
# - a read timeout bounds each wait for data, not the whole: a server trickling its headers or body a byte at a
#   time never trips it. A timer shuts down the sockets of the fetch's connections at the deadline (the only way
#   to end a read blocked in another thread); the connections record themselves when they send a request, since
#   neither requests nor urllib3 give the connection in use before the headers have arrived.
_fetch = threading.local()


def _remaining() -> float:
    return float(getattr(_fetch, "deadline", float("inf"))) - time.monotonic()


class _DeadlineTimeout(Timeout):
    def clone(self) -> Timeout:
        return Timeout(total=max(_remaining(), _NO_TIME_LEFT))


class _DeadlineRetry(Retry):
    """urllib3's Retry, with a server's Retry-After honoured up to RETRY_AFTER_CAP, and no retry whose wait would
    reach the deadline: the fetch then ends with what the last attempt got (a 503 stays `http_5xx`)."""

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> _DeadlineRetry:
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        wait = retry.get_retry_after(response) if response is not None else None
        if (retry.get_backoff_time() if wait is None else wait) >= _remaining():
            raise MaxRetryError(_pool, url, error or ResponseError("no time left for a retry")) from error  # type: ignore[arg-type]
        return retry

    def get_retry_after(self, response: BaseHTTPResponse) -> float | None:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, RETRY_AFTER_CAP)


class _RecordedHTTPConnection(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        getattr(_fetch, "connections", []).append(self)
        super().request(*args, **kwargs)


class _RecordedHTTPSConnection(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        getattr(_fetch, "connections", []).append(self)
        super().request(*args, **kwargs)


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _RecordedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _RecordedHTTPSConnection


def _cut(connections: list[HTTPConnection], fired: threading.Event) -> None:
    fired.set()
    for connection in list(connections):
        # socket.socket's own shutdown, also for TLS: SSLSocket.shutdown would drop its TLS state under the
        # reading thread; the read then sees end-of-file, and urllib3/requests raise an error we recognise.
        with contextlib.suppress(OSError, TypeError):  # already closed, or not connected (sock None)
            socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)


@dataclass(frozen=True)
class Validators:
    """HTTP cache validators of the last document that was parsed successfully."""

    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class FetchResult:
    body: bytes | None  # None: the server said 304 Not Modified
    validators: Validators

    @property
    def not_modified(self) -> bool:
        return self.body is None


class FeedClient:
    """Fetches the feed; one fetch at a time (the refresher's thread)."""

    def __init__(self, config: Config, retries: int = 2) -> None:
        self._config = config
        self._session = requests.Session()
        self._session.headers.update({"Accept": ACCEPT, "User-Agent": USER_AGENT, "Accept-Encoding": "gzip"})
        retry = _DeadlineRetry(
            total=retries,
            backoff_factor=0.5,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
        )
        adapter = HTTPAdapter(max_retries=retry)
        adapter.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        self._session.close()

    def fetch(self, validators: Validators | None = None) -> FetchResult:
        url = self._config.kml_url
        if urlsplit(url).scheme in ("http", "https"):
            return self._fetch_http(url, validators or Validators())
        return FetchResult(self._read_file(url), Validators())

    # ---- HTTP --------------------------------------------------------------------------------------------------

    def _fetch_http(self, url: str, validators: Validators) -> FetchResult:
        headers = {}
        if validators.etag:
            headers["If-None-Match"] = validators.etag
        if validators.last_modified:
            headers["If-Modified-Since"] = validators.last_modified
        fired = threading.Event()
        _fetch.deadline, _fetch.connections = time.monotonic() + self._config.fetch_timeout, []
        watchdog = threading.Timer(self._config.fetch_timeout, _cut, (_fetch.connections, fired))
        watchdog.daemon = True
        watchdog.start()
        try:
            # requests hands a urllib3 Timeout to urllib3 as it is (its types say float or tuple only).
            timeout: Any = _DeadlineTimeout(total=self._config.fetch_timeout)
            with self._session.get(url, headers=headers, timeout=timeout, stream=True) as response:
                self._check_status(response)
                if response.status_code == 304:
                    return FetchResult(None, validators)
                body = self._read_capped(response)
                if fired.is_set():  # cut after the last byte arrived, but before the deadline was checked
                    raise requests.exceptions.Timeout()
                etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
                return FetchResult(body, Validators(etag, modified))
        except FeedError:
            raise
        except requests.exceptions.RequestException as error:
            raise self._error(_reason(error, fired.is_set()), error) from None
        finally:
            watchdog.cancel()
            del _fetch.deadline, _fetch.connections

    def _check_status(self, response: requests.Response) -> None:
        status = response.status_code
        if status in (200, 304):
            return
        if status in (401, 403):
            raise FeedError(
                "unauthorized",
                f"the feed refused the API key (HTTP {status}): set --kml-url / KML_URL with a valid key",
            )
        if 500 <= status < 600:
            raise FeedError("http_5xx", f"the feed answered HTTP {status}")
        raise FeedError("http_status", f"the feed answered HTTP {status}")

    def _read_capped(self, response: requests.Response) -> bytes:
        limit = self._config.max_feed_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit and "gzip" not in response.headers.get("Content-Encoding", ""):
            raise FeedError("too_large", f"the feed announces {int(declared)} bytes, over the {limit}-byte limit")
        chunks = []
        size = 0
        # iter_content decompresses, so the cap applies to what we would parse (a gzip bomb stops here too).
        for chunk in response.iter_content(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise FeedError("too_large", f"the feed is over the {limit}-byte limit (--max-feed-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    def _error(self, reason: str, error: Exception) -> FeedError:
        summary = _SUMMARIES[reason].format(self._config.fetch_timeout)
        return FeedError(reason, self._config.redact(f"{summary}: {plain_cause(error)}"))

    # ---- files -------------------------------------------------------------------------------------------------

    def _read_file(self, url: str) -> bytes:
        path = local_feed_path(url) or Path(url)
        limit = self._config.max_feed_bytes
        try:
            with path.open("rb") as file:
                body = file.read(limit + 1)
        except OSError as error:
            raise FeedError("file", f"cannot read {path}: {error.strerror or error}") from None
        if len(body) > limit:
            raise FeedError("too_large", f"{path} is over the {limit}-byte limit (--max-feed-bytes)")
        return body


# urllib3 prefixes its messages with the connection pool's repr: "HTTPConnectionPool(host='h', port=80): ".
_POOL_PREFIX: Final = re.compile(r"^\w+\(host=[^)]*\):\s*")


def _exception_chain(error: BaseException) -> Iterator[BaseException]:
    """The error, then what caused it, outermost first (requests wraps urllib3, which wraps the socket error)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        reason = getattr(current, "reason", None)  # urllib3's MaxRetryError keeps its cause there
        wrapped = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = next(
            (
                link
                for link in (reason, current.__cause__, wrapped, current.__context__)
                if isinstance(link, BaseException)
            ),
            None,
        )


def plain_cause(error: BaseException) -> str:
    """The most specific message of an error chain, in words ("Failed to establish a new connection: [Errno 111]
    Connection refused"), without the reprs of pools, retries and URLs that requests and urllib3 pile up."""
    text = ""
    for link in _exception_chain(error):
        first = link.args[0] if link.args else None
        if isinstance(first, str) and first.strip():
            text = first
        elif not text and isinstance(link, OSError) and link.strerror:
            text = link.strerror
    return _POOL_PREFIX.sub("", " ".join(text.split())) or type(error).__name__


_SUMMARIES: Final = {
    "timeout": "no complete answer within {:g} s",
    "http_5xx": "the feed kept answering with an error status",
    "connection": "cannot connect to the feed",
    "http_redirect": "too many redirects",
    "broken_response": "the answer was cut off or corrupt",
}


def _reason(error: requests.exceptions.RequestException, cut: bool) -> str:
    """The error counter's label for what requests raised; `cut`: the watchdog fired during the fetch."""
    cause = error.args[0] if error.args else None
    cause = getattr(cause, "reason", cause)  # urllib3's MaxRetryError keeps the last attempt's error there
    if isinstance(cause, NewConnectionError):  # refused, unreachable (it subclasses ConnectTimeoutError)
        return "connection"
    # Retries exhausted on timeouts arrive as a ConnectionError.
    if (
        cut
        or isinstance(error, requests.exceptions.Timeout)
        or isinstance(cause, (ReadTimeoutError, ConnectTimeoutError))
    ):
        return "timeout"
    if isinstance(error, requests.exceptions.RetryError):
        return "http_5xx"
    if isinstance(error, requests.exceptions.ConnectionError):
        return "connection"
    if isinstance(error, requests.exceptions.TooManyRedirects):
        return "http_redirect"
    # ChunkedEncodingError, ContentDecodingError: the answer broke off or was not what it said it was.
    return "broken_response"
