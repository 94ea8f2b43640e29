"""The stacker never averages in a frame its batch refused: a refused frame is as good as an absent one."""

from __future__ import annotations

import numpy as np
from corpus import _middle, all_zero_frame, linked_copy, name
from flowkit import NIGHT_ID

from mascara.lightcurves import read_batch_file
from mascara.reduce import plan_camera_night, prepare_camera_night, reduce_batch


def _reduce_batch_of(datadir, seq):
    plan = plan_camera_night(datadir / NIGHT_ID)
    outcome = reduce_batch(plan, prepare_camera_night(plan), seq // 50)
    return outcome, read_batch_file(outcome.path)


def test_binned_photometry_with_a_refused_frame_equals_it_without_the_frame(pristine_night, tmp_path):
    zeroed = linked_copy(pristine_night, tmp_path / "zeroed")
    raw = zeroed / NIGHT_ID / "raw"
    seq = _middle(raw)
    all_zero_frame(raw)
    absent = linked_copy(pristine_night, tmp_path / "absent")
    (absent / NIGHT_ID / "raw" / name(seq)).unlink()

    with_bad, pieces_bad = _reduce_batch_of(zeroed, seq)
    without, pieces_without = _reduce_batch_of(absent, seq)
    assert [r[0] for r in with_bad.rejected] == [seq] and without.rejected == []
    assert (with_bad.frames_rejected, with_bad.frames_missing, without.frames_missing) == (1, 0, 1)
    assert len(with_bad.accepted) == len(without.accepted) == 49
    assert len(pieces_bad.slow) > 50
    for field in ("flux0", "flux1", "sky", "flag"):
        np.testing.assert_array_equal(pieces_bad.slow[field], pieces_without.slow[field], err_msg=field)
    assert pieces_bad.fast.tobytes() == pieces_without.fast.tobytes()  # NaN-safe: the same bytes
