"""The background refresh: fetch → parse → publish, once per interval, whatever the scrape rate.

A failed refresh publishes the previous snapshot again with `up` = 0 and the error counted, so the last good
data keeps being served. After a failure the next attempt comes sooner than the full interval (exponential
backoff with jitter, capped by the interval).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Final

from .config import Config
from .feed import FeedClient, FeedError, Validators
from .kml import KmlError, parse_kml
from .status import FeedStatus, State, add_counts

log = logging.getLogger(__name__)

FIRST_RETRY_DELAY: Final = 5.0


class Refresher:
    def __init__(
        self,
        config: Config,
        client: FeedClient,
        publish: Callable[[State], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._client = client
        self._publish = publish
        self._clock = clock
        self._state = State()
        self._validators = Validators()
        self._failures_in_a_row = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> State:
        return self._state

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="feed-refresh", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
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
            self._stop.wait(max(0.0, delay - (time.monotonic() - started)))

    def refresh_once(self) -> float:
        """One refresh; returns the delay until the next one should start."""
        started = time.monotonic()
        previous = self._state.status
        try:
            fetched = self._client.fetch(self._validators)
            if fetched.not_modified:
                snapshot = self._state.snapshot
                skipped: Mapping[str, int] = MappingProxyType({})
                log.debug("feed not modified since the last refresh")
            else:
                assert fetched.body is not None
                snapshot = parse_kml(fetched.body, self._config.max_connectors)
                skipped = snapshot.skipped
                self._validators = fetched.validators
        except (FeedError, KmlError) as error:
            return self._failed(error.reason, self._config.redact(str(error)), started)
        except Exception as error:
            log.exception("unexpected error during refresh")
            return self._failed("internal", self._config.redact(f"{type(error).__name__}: {error}"), started)

        if skipped:
            log.warning(
                "skipped feed records: %s", ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
            )
        if not previous.up:
            log.info(
                "feed refreshed: %d stations, %d devices, %d connectors from %s",
                len(snapshot.stations),
                snapshot.device_count,
                snapshot.connector_count,
                self._config.redacted_url,
            )
        self._failures_in_a_row = 0
        self._set(
            State(
                snapshot,
                replace(
                    previous,
                    up=True,
                    last_success_time=self._clock(),
                    last_refresh_duration=time.monotonic() - started,
                    skipped=add_counts(previous.skipped, skipped),
                ),
            )
        )
        return self._config.refresh_interval

    def _failed(self, reason: str, message: str, started: float) -> float:
        self._failures_in_a_row += 1
        delay = self.retry_delay(self._failures_in_a_row)
        log.error(
            "feed refresh failed (%s): %s; serving the last good data, next try in %.0f s", reason, message, delay
        )
        previous = self._state.status
        status = FeedStatus(
            up=False,
            last_success_time=previous.last_success_time,
            last_refresh_duration=time.monotonic() - started,
            errors=add_counts(previous.errors, {reason: 1}),
            skipped=previous.skipped,
        )
        self._set(State(self._state.snapshot, status))
        return delay

    def retry_delay(self, failures_in_a_row: int) -> float:
        backoff = FIRST_RETRY_DELAY * 2 ** min(failures_in_a_row - 1, 16)
        return float(min(self._config.refresh_interval, backoff) * random.uniform(0.8, 1.0))

    def _set(self, state: State) -> None:
        self._state = state
        self._publish(state)
