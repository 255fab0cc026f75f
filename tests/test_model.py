"""model.py: the state table and the speed label."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from feedgen import EXPECTED_SIMPLIFIED

from chargy_exporter.model import SIMPLIFIED_STATES, add_counts, format_speed, simplify_state


@pytest.mark.parametrize(("raw", "simplified"), sorted(EXPECTED_SIMPLIFIED.items()))
def test_every_listed_state_maps_as_documented(raw, simplified):
    assert simplify_state(raw) == simplified


@pytest.mark.parametrize("raw", ["MAINTENANCE", "", "available-ish", "UNKNOWN"])
def test_unknown_states_are_unavailable(raw):
    assert simplify_state(raw) == "unavailable"


def test_state_matching_ignores_case_and_spaces():
    assert simplify_state(" charging ") == "charging"


def test_three_simplified_states_in_the_contract_order():
    assert SIMPLIFIED_STATES == ("available", "charging", "unavailable")


@pytest.mark.parametrize(
    ("kilowatts", "label"), [(22.0, "22"), (175.0, "175"), (7.4, "7.4"), (3.7, "3.7"), (400, "400"), (None, "")]
)
def test_speed_has_no_useless_decimal(kilowatts, label):
    assert format_speed(kilowatts) == label


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
