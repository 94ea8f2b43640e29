"""Parameter parsing and run decisions of flows._runs (plain functions, no server)."""

from __future__ import annotations

import datetime as dt

import pytest

from flows._runs import parse_letters, parse_nights, previous_night


def test_nights_from_every_form_a_deployment_parameter_can_take():
    # --param nights=20260301 arrives as an int (Prefect parses --param values as JSON)
    assert parse_nights(20260301) == ["20260301"]
    assert parse_nights("20260301+20260302") == ["20260301", "20260302"]
    assert parse_nights(["20260301", 20260302]) == ["20260301", "20260302"]
    assert parse_nights("all") is None


def test_empty_nights_mean_the_previous_night():
    today = dt.date(2026, 3, 1)
    assert previous_night(today) == "20260228"
    for value in (None, "", "yesterday", "YESTERDAY"):
        assert parse_nights(value, today=today) == ["20260228"]
    assert parse_nights("yesterday+20260101", today=today) == ["20260228", "20260101"]


@pytest.mark.parametrize("bad", ["2026031", "2026-03-01", "20260301+x"])
def test_malformed_nights_are_refused(bad):
    with pytest.raises(ValueError):
        parse_nights(bad)


def test_cameras_and_sites():
    assert parse_letters("E+S") == ["E", "S"]
    assert parse_letters(["E"]) == ["E"]
    assert parse_letters(None) is None
    assert parse_letters("") is None
    assert parse_letters("all") is None
