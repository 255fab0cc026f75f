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
from .status import State, add_counts

log = logging.getLogger(__name__)

FIRST_RETRY_DELAY: Final = 5.0
# Enough of an error message to act on; what the status page keeps of it.
MESSAGE_LENGTH_SHOWN: Final = 300


def one_line(text: str) -> str:
    """A message as one log line: a multi-line error (a server's answer, a traceback) must not split it."""
    return " ".join(text.split())


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
        # Set by refresh_now() (SIGHUP) or stop(): ends the wait before the next refresh.
        self._wake = threading.Event()
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
            self._wake.wait(max(0.0, delay - (time.monotonic() - started)))
            self._wake.clear()

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
            return self._failed(error.reason, str(error), started)
        except Exception as error:
            # The traceback is for whoever debugs; the one error line below says what happened.
            log.debug("unexpected error during refresh", exc_info=True)
            return self._failed("internal", f"{type(error).__name__}: {error}", started)

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
        delay = self._config.refresh_interval
        now = self._clock()
        self._set(
            State(
                snapshot,
                replace(
                    previous,
                    up=True,
                    last_success_time=now,
                    last_refresh_duration=time.monotonic() - started,
                    skipped=add_counts(previous.skipped, skipped),
                    failures_in_a_row=0,
                    next_refresh_time=self._next_refresh_time(now, delay, started),
                ),
            )
        )
        return delay

    def _failed(self, reason: str, message: str, started: float) -> float:
        self._failures_in_a_row += 1
        delay = self.retry_delay(self._failures_in_a_row)
        message = one_line(self._config.redact(message))
        log.error(
            "feed refresh failed (%s, %d in a row): %s; %s, next try in %.0f s",
            reason,
            self._failures_in_a_row,
            message,
            "serving the last good data" if self._state.snapshot.stations else "no data to serve yet",
            delay,
        )
        previous = self._state.status
        now = self._clock()
        status = replace(
            previous,
            up=False,
            last_refresh_duration=time.monotonic() - started,
            errors=add_counts(previous.errors, {reason: 1}),
            last_error_reason=reason,
            last_error_message=message[:MESSAGE_LENGTH_SHOWN],
            last_error_time=now,
            failures_in_a_row=self._failures_in_a_row,
            next_refresh_time=self._next_refresh_time(now, delay, started),
        )
        self._set(State(self._state.snapshot, status))
        return delay

    @staticmethod
    def _next_refresh_time(now: float, delay: float, started: float) -> float:
        # The loop waits `delay` counted from the start of this refresh, not from now.
        return now + max(0.0, delay - (time.monotonic() - started))

    def retry_delay(self, failures_in_a_row: int) -> float:
        backoff = FIRST_RETRY_DELAY * 2 ** min(failures_in_a_row - 1, 16)
        return float(min(self._config.refresh_interval, backoff) * random.uniform(0.8, 1.0))

    def _set(self, state: State) -> None:
        self._state = state
        self._publish(state)
