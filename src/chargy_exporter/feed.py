"""Fetch the raw feed document: HTTP(S) with retries, timeouts, a size cap and conditional requests; or a file.

Nothing here parses: a fetch returns bytes (or "not modified") or raises `FeedError` with a short reason for the
error counter and a message that never contains the API key.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError
from urllib3.util.retry import Retry

from . import __version__
from .config import Config

log = logging.getLogger(__name__)

# The upstream answers 406 to a client that prefers JSON: ask for KML/XML first.
ACCEPT: Final = "application/vnd.google-earth.kml+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.1"
USER_AGENT: Final = f"chargy-exporter/{__version__}"
_CHUNK: Final = 64 * 1024
# The longest a server's Retry-After may hold one retry (urllib3 would otherwise sleep up to 6 hours); never more
# than --fetch-timeout either. Longer waits are the refresher's job, which keeps serving the last good data.
RETRY_AFTER_CAP: Final = 10.0
FEED_ERROR_REASONS: Final = (
    "timeout",
    "connection",
    "http_5xx",
    "http_status",
    "unauthorized",
    "http_redirect",
    "broken_response",
    "too_large",
    "file",
)


class FeedError(Exception):
    """A fetch failed; `reason` is a short label (timeout, connection, http_5xx, unauthorized, too_large, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _CappedRetry(Retry):
    """urllib3's Retry, with the server's Retry-After honoured only up to `retry_after_cap` seconds."""

    retry_after_cap: float = RETRY_AFTER_CAP

    def new(self, **kwargs: Any) -> _CappedRetry:
        # Retry makes a new instance after every attempt from its own parameters only: carry the cap over.
        retry = super().new(**kwargs)
        retry.retry_after_cap = self.retry_after_cap
        return retry

    def get_retry_after(self, response: object) -> float | None:
        seconds = super().get_retry_after(response)  # type: ignore[arg-type]
        return None if seconds is None else min(seconds, self.retry_after_cap)


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
    def __init__(self, config: Config, retries: int = 2) -> None:
        self._config = config
        self._session = requests.Session()
        self._session.headers.update({"Accept": ACCEPT, "User-Agent": USER_AGENT, "Accept-Encoding": "gzip"})
        retry = _CappedRetry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=0.5,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        retry.retry_after_cap = min(RETRY_AFTER_CAP, config.fetch_timeout)
        adapter = HTTPAdapter(max_retries=retry)
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
        timeout = self._config.fetch_timeout
        headers = {}
        if validators.etag:
            headers["If-None-Match"] = validators.etag
        if validators.last_modified:
            headers["If-Modified-Since"] = validators.last_modified
        deadline = time.monotonic() + timeout
        try:
            with self._session.get(url, headers=headers, timeout=timeout, stream=True) as response:
                self._check_status(response)
                if response.status_code == 304:
                    return FetchResult(None, validators)
                body = self._read_with_watchdog(response, deadline)
                return FetchResult(
                    body,
                    Validators(response.headers.get("ETag"), response.headers.get("Last-Modified")),
                )
        except FeedError:
            raise
        except requests.exceptions.Timeout as error:
            raise self._error("timeout", f"no answer within {timeout:g} s", error) from None
        except requests.exceptions.RetryError as error:
            raise self._error("http_5xx", "the feed kept answering with an error status", error) from None
        except requests.exceptions.ConnectionError as error:
            if _timed_out(error):
                # Retries exhausted on read/connect timeouts: requests reports them as a ConnectionError.
                raise self._error("timeout", f"no answer within {timeout:g} s", error) from None
            raise self._error("connection", "cannot connect to the feed", error) from None
        except requests.exceptions.TooManyRedirects as error:
            raise self._error("http_redirect", "too many redirects", error) from None
        except requests.exceptions.RequestException as error:
            # ChunkedEncodingError, ContentDecodingError: the answer broke off or was not what it said it was.
            raise self._error("broken_response", "the answer was cut off or corrupt", error) from None

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

    def _read_with_watchdog(self, response: requests.Response, deadline: float) -> bytes:
        """`_read_capped`, with a timer that cuts the connection at the deadline.

        A read blocks until a whole chunk has arrived, so a server trickling a byte at a time, each within the
        socket timeout, would hold the refresh for hours: at the deadline the timer shuts the socket down.
        """
        fired = threading.Event()

        def cut() -> None:
            fired.set()
            shutdown = getattr(response.raw, "shutdown", None)  # urllib3 >= 2.3
            try:
                if shutdown is not None:
                    shutdown()
            except (OSError, ValueError, RuntimeError):
                pass

        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            body = self._read_capped(response, deadline)
        except requests.exceptions.RequestException:
            if fired.is_set():
                raise FeedError("timeout", self._download_too_slow()) from None
            raise
        finally:
            watchdog.cancel()
        if fired.is_set():
            raise FeedError("timeout", self._download_too_slow())
        return body

    def _download_too_slow(self) -> str:
        return f"the download took longer than {self._config.fetch_timeout:g} s"

    def _read_capped(self, response: requests.Response, deadline: float) -> bytes:
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
            if time.monotonic() > deadline:
                # A server trickling bytes never trips the socket timeout: bound the whole download.
                raise FeedError("timeout", self._download_too_slow())
            chunks.append(chunk)
        return b"".join(chunks)

    def _error(self, reason: str, summary: str, error: Exception) -> FeedError:
        return FeedError(reason, self._config.redact(f"{summary}: {plain_cause(error)}"))

    # ---- files -------------------------------------------------------------------------------------------------

    def _read_file(self, url: str) -> bytes:
        parts = urlsplit(url)
        path = Path(unquote(parts.path) if parts.scheme == "file" else url)
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


def _timed_out(error: requests.exceptions.ConnectionError) -> bool:
    cause = error.args[0] if error.args else None
    reason = getattr(cause, "reason", cause)
    # urllib3's NewConnectionError (refused, unreachable) subclasses ConnectTimeoutError: not a timeout.
    return isinstance(reason, (ReadTimeoutError, ConnectTimeoutError)) and not isinstance(reason, NewConnectionError)
