"""What one refresh produced: the snapshot served plus the feed's health, published together as one `State`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .model import EMPTY_SNAPSHOT, Snapshot


@dataclass(frozen=True)
class FeedStatus:
    up: bool = False
    last_success_time: float | None = None  # Unix time of the last refresh that produced or confirmed the data
    last_refresh_duration: float | None = None  # seconds, of the last refresh whatever its outcome
    # Cumulative since start, by reason.
    errors: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    skipped: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # The last failed refresh, kept after a recovery (the page shows what went wrong last, and when).
    last_error_reason: str | None = None  # a label of chargy_feed_refresh_errors_total
    last_error_message: str | None = None  # short, one line, secrets already redacted
    last_error_time: float | None = None  # Unix time
    failures_in_a_row: int = 0
    next_refresh_time: float | None = None  # Unix time the next refresh attempt is due


@dataclass(frozen=True)
class State:
    snapshot: Snapshot = EMPTY_SNAPSHOT
    status: FeedStatus = FeedStatus()


def add_counts(total: Mapping[str, int], more: Mapping[str, int]) -> Mapping[str, int]:
    if not more:
        return total
    merged = dict(total)
    for reason, count in more.items():
        merged[reason] = merged.get(reason, 0) + count
    return MappingProxyType(merged)
