"""Corrupt-input corpus, bad science frames: each is refused with its reason, the rest of the night reduces.

Each case breaks a copy of the pristine night (tests/flows/corpus.py) and runs
``mascprocess --no-prefect`` (the library driver) in this process; ``raw/`` is
hashed before and after.
"""

from __future__ import annotations

import pytest
from corpus import FRAME_CASES
from intakekit import check, run_case


@pytest.mark.parametrize("case", FRAME_CASES, ids=lambda c: c.__name__)
def test_bad_frame_is_refused_and_the_night_reduces(case, pristine_night, tmp_path, capsys):
    datadir, expect, code, err = run_case(case, pristine_night, tmp_path, capsys)
    check(datadir, expect, code, err)
