"""status.py: the cumulative counts a refresh carries forward."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from chargy_exporter.status import add_counts


def test_counts_add_up_by_reason_and_the_previous_totals_stay_untouched():
    before = MappingProxyType({"timeout": 2, "http_5xx": 1})
    after = add_counts(before, {"timeout": 1, "unauthorized": 1})
    assert dict(after) == {"timeout": 3, "http_5xx": 1, "unauthorized": 1}
    assert dict(before) == {"timeout": 2, "http_5xx": 1}
    with pytest.raises(TypeError):
        after["timeout"] = 0  # type: ignore[index]


def test_adding_nothing_keeps_the_same_totals():
    before = MappingProxyType({"timeout": 2})
    assert add_counts(before, {}) is before
