"""Corrupt-input corpus, night-level cases: duplicates, gaps, calibration, an empty ``raw/``."""

from __future__ import annotations

import pytest
from corpus import NIGHT_CASES
from intakekit import check, run_case


@pytest.mark.parametrize("case", NIGHT_CASES, ids=lambda c: c.__name__)
def test_bad_night_input_is_recorded(case, pristine_night, tmp_path, capsys):
    datadir, expect, code, err = run_case(case, pristine_night, tmp_path, capsys)
    check(datadir, expect, code, err)
