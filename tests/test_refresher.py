"""The refresh loop with a scripted client: last good data kept, 304, validators, retry delay, stop."""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from feedgen import generate_feed
from loopback import wait_until

from chargy_exporter import refresher as refresher_module
from chargy_exporter.config import Config, RedactingFilter
from chargy_exporter.feed import FeedClient, FeedError, FetchResult, Validators
from chargy_exporter.kml import KmlError
from chargy_exporter.model import State
from chargy_exporter.refresher import FIRST_RETRY_DELAY, Refresher

FEED = generate_feed(stations=30, seed=5)
OTHER_FEED = generate_feed(stations=20, seed=6)
EMPTY = b'<kml xmlns="http://www.opengis.net/kml/2.2"><Document></Document></kml>'


class ScriptedClient:
    """Answers fetches from a script: bytes (200), None (304), or an exception to raise."""

    def __init__(self, script: Iterable[Any]) -> None:
        self.script = list(script)
        self.validators_seen: list[Validators | None] = []

    def fetch(self, validators: Validators | None = None) -> FetchResult:
        self.validators_seen.append(validators)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        if isinstance(step, tuple):
            body, new_validators = step
            return FetchResult(body, new_validators)
        return FetchResult(step, validators or Validators() if step is None else Validators())

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 60
        return self.now


def make(script: Iterable[Any], interval: float = 300) -> tuple[Refresher, ScriptedClient, list[State]]:
    client = ScriptedClient(script)
    published: list[State] = []
    refresher = Refresher(
        Config(kml_url="http://127.0.0.1:1/kml?API-KEY=s3cr3t-key", refresh_interval=interval, secrets=("s3cr3t-key",)),
        client,  # type: ignore[arg-type]
        published.append,
        clock=Clock(),
    )
    return refresher, client, published


def test_success_then_failures_keep_the_last_good_snapshot() -> None:
    refresher, _, published = make(
        [FEED.kml, FeedError("http_5xx", "HTTP 503"), b"<html/>", EMPTY, RuntimeError("boom s3cr3t-key")]
    )
    assert refresher.refresh_once() == 300
    good = published[-1]
    assert good.status.up and good.snapshot.connector_count == len(FEED.connectors)

    for expected_reason in ("http_5xx", "not_kml", "empty_feed", "internal"):
        delay = refresher.refresh_once()
        assert delay < 300
        state = published[-1]
        assert state.snapshot is good.snapshot
        assert not state.status.up
        assert state.status.errors[expected_reason] == 1
        assert state.status.last_success_time == good.status.last_success_time
    assert dict(published[-1].status.errors) == {"http_5xx": 1, "not_kml": 1, "empty_feed": 1, "internal": 1}


def test_not_modified_keeps_the_snapshot_counts_as_success_and_does_not_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    refresher, client, published = make([(FEED.kml, Validators('"v1"', None)), None, None])
    refresher.refresh_once()
    first = published[-1]
    calls: list[bytes] = []
    monkeypatch.setattr(refresher_module, "parse_kml", lambda body, *limits: calls.append(body))
    refresher.refresh_once()
    refresher.refresh_once()
    assert calls == []
    latest = published[-1]
    assert latest.status.up
    assert latest.snapshot is first.snapshot
    assert latest.status.last_success_time is not None and first.status.last_success_time is not None
    assert latest.status.last_success_time > first.status.last_success_time
    assert client.validators_seen[1:] == [Validators('"v1"', None)] * 2


def test_validators_are_committed_only_after_a_successful_parse() -> None:
    refresher, client, _ = make(
        [(FEED.kml, Validators('"v1"')), (b"<broken", Validators('"v2"')), (OTHER_FEED.kml, Validators('"v3"')), None]
    )
    refresher.refresh_once()
    refresher.refresh_once()  # v2's body did not parse: asking "not modified since v2" would freeze the bad state
    refresher.refresh_once()
    refresher.refresh_once()
    assert client.validators_seen == [Validators(), Validators('"v1"'), Validators('"v1"'), Validators('"v3"')]


def test_recovery_on_the_first_good_answer() -> None:
    refresher, _, published = make([FEED.kml, FeedError("timeout", "slow"), OTHER_FEED.kml])
    refresher.refresh_once()
    refresher.refresh_once()
    assert refresher.refresh_once() == 300
    assert published[-1].status.up
    assert published[-1].snapshot.connector_count == len(OTHER_FEED.connectors)


def test_skipped_records_are_counted() -> None:
    broken = FEED.kml.replace(b"&quot;connectors&quot;", b"&quot;connectors&quot;,,", 1)
    if broken == FEED.kml:  # the generator writes raw quotes in element text
        broken = FEED.kml.replace(b'"connectors"', b'"connectors",,', 1)
    refresher, _, published = make([broken])
    refresher.refresh_once()
    assert published[-1].status.up
    assert published[-1].status.skipped == {"malformed_device_json": 1}


@pytest.fixture
def redacting_caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog with the key redacted by the handler, as in cli; pytest keeps that handler for the whole session."""
    redacting = RedactingFilter(("s3cr3t-key",))
    caplog.handler.addFilter(redacting)
    yield caplog
    caplog.handler.removeFilter(redacting)


def test_messages_are_redacted(redacting_caplog: pytest.LogCaptureFixture) -> None:
    """The refresher's own message is redacted; the traceback it logs passes the handler's filter, as in cli."""
    caplog = redacting_caplog
    refresher, _, _ = make([RuntimeError("http://x/?API-KEY=s3cr3t-key")])
    refresher.refresh_once()
    assert "s3cr3t-key" not in caplog.text
    assert "REDACTED" in caplog.text


# ---- retry delay ----------------------------------------------------------------------------------------------------


def test_retry_delay_backs_off_with_jitter_and_is_capped_by_the_interval() -> None:
    refresher, _, _ = make([], interval=300)
    for failures in range(1, 30):
        nominal = min(300, FIRST_RETRY_DELAY * 2 ** (failures - 1))
        delays = [refresher.retry_delay(failures) for _ in range(200)]
        assert all(0.8 * nominal <= d <= nominal for d in delays)
        assert statistics.pstdev(delays) > 0  # jittered: exporters restarted together do not retry together
    assert refresher.retry_delay(1) < 300 / 10
    assert max(refresher.retry_delay(100) for _ in range(50)) <= 300


def test_a_short_interval_caps_the_retry_delay() -> None:
    refresher, _, _ = make([], interval=2)
    assert all(refresher.retry_delay(n) <= 2 for n in range(1, 10))


def test_loop_uses_the_retry_delay_then_the_interval() -> None:
    refresher, client, published = make([FeedError("connection", "refused")] * 3 + [FEED.kml] * 100, interval=300)
    refresher.retry_delay = lambda failures: 0.05  # type: ignore[method-assign]
    refresher.start()
    wait_until(lambda: published and published[-1].status.up, 30, "a success after the retries")
    refresher.stop()
    assert published[-1].status.errors == {"connection": 3}
    assert len(client.validators_seen) == 4  # three quick retries, one success, then the 300 s interval


def test_stop_is_prompt_between_refreshes() -> None:
    refresher, _, published = make([FEED.kml], interval=300)
    refresher.start()
    wait_until(lambda: published, 30, "the first refresh")  # now waiting for the next one, 300 s away
    started = time.monotonic()
    refresher.stop()
    assert time.monotonic() - started < 1
    assert not any(t.name == "feed-refresh" and t.is_alive() for t in threading.enumerate())


def test_kml_error_reasons_are_counted_by_name() -> None:
    refresher, _, published = make([KmlError("forbidden_xml", "entities")])
    refresher.refresh_once()
    assert published[-1].status.errors == {"forbidden_xml": 1}


# ---- what a failure publishes and logs -------------------------------------------------------------------------


def test_a_failure_publishes_its_reason_redacted_message_and_next_try() -> None:
    refresher, _, published = make([FEED.kml, FeedError("connection", "cannot reach http://h/?API-KEY=s3cr3t-key")])
    refresher.refresh_once()
    good = published[-1].status
    assert good.next_refresh_time is not None and good.last_success_time is not None
    assert 299 <= good.next_refresh_time - good.last_success_time <= 300
    assert (good.last_error_reason, good.failures_in_a_row) == (None, 0)

    delay = refresher.refresh_once()
    failed = published[-1].status
    assert (failed.last_error_reason, failed.failures_in_a_row) == ("connection", 1)
    assert failed.last_error_message == "cannot reach http://h/?API-KEY=REDACTED"
    assert failed.last_error_time is not None and failed.next_refresh_time is not None
    assert delay - 1 <= failed.next_refresh_time - failed.last_error_time <= delay


def test_failures_in_a_row_count_up_and_a_recovery_keeps_the_last_error() -> None:
    refresher, _, published = make([FeedError("timeout", "slow"), KmlError("not_kml", "html"), FEED.kml])
    refresher.refresh_once()
    refresher.refresh_once()
    assert (published[-1].status.failures_in_a_row, published[-1].status.last_error_reason) == (2, "not_kml")
    refresher.refresh_once()
    recovered = published[-1].status
    assert recovered.up and recovered.failures_in_a_row == 0
    assert (recovered.last_error_reason, recovered.last_error_message) == ("not_kml", "html")


def test_each_failure_is_one_log_line_with_reason_count_and_next_try(
    redacting_caplog: pytest.LogCaptureFixture,
) -> None:
    refresher, _, _ = make(
        [FeedError("http_5xx", "the feed answered HTTP 503"), RuntimeError("line one\nline two s3cr3t-key")]
    )
    caplog = redacting_caplog
    caplog.set_level("DEBUG", logger="chargy_exporter")
    refresher.refresh_once()
    refresher.refresh_once()
    lines = [r.getMessage() for r in caplog.records if r.levelname != "DEBUG"]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[0].startswith("feed refresh failed (http_5xx, 1 in a row): the feed answered HTTP 503;")
    assert lines[1].startswith("feed refresh failed (internal, 2 in a row): RuntimeError: line one line two REDACTED;")
    assert all(re.search(r"next try in \d+ s$", line) for line in lines)


def test_a_feed_file_that_disappears_is_a_refresh_error_and_the_data_stays(tmp_path: Path) -> None:
    feed_file = tmp_path / "feed.kml"
    feed_file.write_bytes(FEED.kml)
    config = Config(kml_url=str(feed_file))
    published: list[State] = []
    refresher = Refresher(config, FeedClient(config), published.append)
    refresher.refresh_once()
    feed_file.unlink()
    refresher.refresh_once()
    state = published[-1]
    assert not state.status.up and state.status.last_error_reason == "file"
    assert state.snapshot is published[0].snapshot and state.snapshot.connector_count == len(FEED.connectors)
