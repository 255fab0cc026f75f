"""The background refresh: fetch → parse → publish, once per interval, whatever the scrape rate. A failed refresh
publishes the last good snapshot again with `up` = 0 and the error counted; the next attempt comes sooner than the
interval (exponential backoff with jitter, capped by the interval)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Final

from . import process
from .config import Config
from .feed import FeedClient, FeedError, Validators
from .kml import KmlError, parse_kml
from .model import Snapshot, State, add_counts

log = logging.getLogger(__name__)

FIRST_RETRY_DELAY: Final = 5.0
FAILURE_LINE: Final = "feed refresh failed (%s, %d in a row): %s; %s, next try in %.0f s"
MESSAGE_LENGTH_SHOWN: Final = 300  # enough of an error message to act on: what the status page keeps of it


class Refresher:
    def __init__(
        self,
        config: Config,
        client: FeedClient,
        publish: Callable[[State], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config, self._client, self._publish, self._clock = config, client, publish, clock
        self._state = State()
        self._validators = Validators()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by refresh_now() (SIGHUP) or stop(): ends the wait for the next refresh
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> State:
        return self._state

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="feed-refresh", daemon=True)
        self._thread.start()

    def refresh_now(self) -> None:
        """Refresh at once, or right after the refresh under way (an operator's SIGHUP; tests)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                delay = self.refresh_once()
            except Exception:  # publishing failed (an output's hook): keep refreshing all the same
                log.exception("publishing the refreshed data failed")
                delay = self.retry_delay(1)
            process.release_memory()
            self._wake.wait(max(0.0, delay - (time.monotonic() - started)))
            self._wake.clear()

    def refresh_once(self) -> float:
        """One refresh; returns the delay until the next one should start."""
        started = time.monotonic()
        previous = self._state.status
        try:
            snapshot = self._fetch_snapshot()
        except (FeedError, KmlError) as error:
            return self._failed(error.reason, str(error), started)
        except Exception as error:
            # The traceback is for whoever debugs; the one error line says what happened.
            log.debug("unexpected error during refresh", exc_info=True)
            return self._failed("internal", f"{type(error).__name__}: {error}", started)

        skipped: Mapping[str, int] = {} if snapshot is self._state.snapshot else snapshot.skipped
        if skipped:
            log.warning("skipped feed records: %s", ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
        if not previous.up:
            counts = (len(snapshot.stations), snapshot.device_count, snapshot.connector_count)
            url = self._config.redacted_url
            log.info("feed refreshed: %d stations, %d devices, %d connectors from %s", *counts, url)
        delay, now = self._config.refresh_interval, self._clock()
        total = add_counts(previous.skipped, skipped)
        self._set(snapshot, started, now, delay, up=True, last_success_time=now, skipped=total, failures_in_a_row=0)
        return delay

    def _fetch_snapshot(self) -> Snapshot:
        """The new feed's snapshot, or the one served if the feed has not changed. The document goes with this
        frame, before the publish and its collection, the peak of a refresh."""
        fetched = self._client.fetch(self._validators)
        if fetched.body is None:
            log.debug("feed not modified since the last refresh")
            return self._state.snapshot
        snapshot = parse_kml(fetched.body, self._config.max_connectors)
        self._validators = fetched.validators
        return snapshot

    def _failed(self, reason: str, message: str, started: float) -> float:
        previous = self._state.status
        failures = previous.failures_in_a_row + 1
        delay = self.retry_delay(failures)
        message = " ".join(self._config.redact(message).split())  # one log line, whatever the error's text
        served = "serving the last good data" if self._state.snapshot.stations else "no data to serve yet"
        log.error(FAILURE_LINE, reason, failures, message, served, delay)
        now = self._clock()
        failure = dict(last_error_time=now, last_error_reason=reason, last_error_message=message[:MESSAGE_LENGTH_SHOWN])
        failure.update(errors=add_counts(previous.errors, {reason: 1}), failures_in_a_row=failures)
        self._set(self._state.snapshot, started, now, delay, up=False, **failure)
        return delay

    def retry_delay(self, failures_in_a_row: int) -> float:
        backoff = FIRST_RETRY_DELAY * 2 ** min(failures_in_a_row - 1, 16)
        return float(min(self._config.refresh_interval, backoff) * random.uniform(0.8, 1.0))

    def _set(self, snapshot: Snapshot, started: float, now: float, delay: float, **changes: Any) -> None:
        """Publish `snapshot` with the status changed as given, for the refresh that began at `started`."""
        elapsed = time.monotonic() - started
        # The loop waits `delay` counted from the start of this refresh, not from now.
        changes.update(last_refresh_duration=elapsed, next_refresh_time=now + max(0.0, delay - elapsed))
        self._state = State(snapshot, replace(self._state.status, **changes))
        self._publish(self._state)
