"""Running a corpus case (tests/flows/corpus.py) and checking what the user sees."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import h5py
import numpy as np
from corpus import Expect, raw_digest, seqs_of
from flowkit import NIGHT, NIGHT_ID

from mascara.cli import mascprocess_main


def run_case(case, pristine: Path, tmp_path: Path, capsys) -> tuple[Path, Expect, int, str]:
    """Break a copy of the night with ``case``, reduce it with ``mascprocess --no-prefect`` in this process."""
    from corpus import linked_copy

    datadir = linked_copy(pristine, tmp_path / "data")
    raw = datadir / NIGHT_ID / "raw"
    all_seqs = seqs_of(raw)
    expect = case(raw)
    expect.all_seqs = all_seqs  # type: ignore[attr-defined]
    before = raw_digest(raw)
    capsys.readouterr()
    code = mascprocess_main([str(datadir), "--night", NIGHT, "--camera", "E", "--site", "LP", "--no-prefect", "-q",
                             *expect.args])
    err = capsys.readouterr().err
    assert raw_digest(raw) == before, "raw/ changed"
    return datadir, expect, code, err


def frame_rows(datadir: Path) -> dict[str, tuple]:
    with sqlite3.connect(f"file:{datadir / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT filename, lstseq, status, reason FROM frame").fetchall()
    return {f: (seq, st, reason) for f, seq, st, reason in rows}


def status_row(datadir: Path) -> dict:
    from mascara.catalog import connect

    with connect(datadir=datadir) as cat:
        (row,) = cat.night_status(NIGHT)
    return row


def check(datadir: Path, expect: Expect, code: int, err: str) -> dict:
    """The checks every case shares: exit code, recorded reasons, the rest of the night reduced."""
    assert code == expect.exit_code, err
    row = status_row(datadir)
    assert row["state"] == expect.state, (row, err)
    assert row["warning"] == expect.warning, row
    assert row["calibration"] == expect.calibration, row
    if expect.error:
        assert expect.error in (row["error"] or ""), row
    frames = frame_rows(datadir)
    # the command names the refused files with their reasons (the first few; mascara status --rejected has all)
    from flows.mascprocess import REJECTED_SHOWN

    refused = sorted((f, r[2]) for f, r in frames.items() if r[1] == "rejected")
    for fname, reason in refused[:REJECTED_SHOWN]:
        assert f"  {fname}: {reason}\n" in err, (fname, err)
    assert (f"... and {len(refused) - REJECTED_SHOWN} more" in err) == (len(refused) > REJECTED_SHOWN), err
    for fname, words in {**expect.rejected, **expect.calib_rejected}.items():
        assert fname in frames, f"{fname} not recorded; frames recorded: {len(frames)}"
        assert frames[fname][1] == "rejected" and words in frames[fname][2], frames[fname]
    for fname in expect.ok_files:
        assert frames[fname][1] == "ok", frames[fname]
    for fname, words in expect.ok_reasons.items():
        assert fname in frames, f"{fname} not recorded; frames recorded: {len(frames)}"
        assert frames[fname][1] == "ok" and words in frames[fname][2], frames[fname]
    if expect.state != "succeeded":
        return row
    reduced = set(expect.all_seqs) - expect.not_reduced  # type: ignore[attr-defined]
    assert row["frames_ok"] == len(reduced)
    assert row["frames_rejected"] == len(expect.rejected)
    assert row["missing_ranges"] == expect.missing_ranges
    assert row["frames_missing"] == sum(b - a + 1 for a, b in expect.missing_ranges)
    flc = datadir / NIGHT_ID / "lightcurves" / f"fLC_{NIGHT_ID}.hdf5"
    with h5py.File(flc, "r") as f:
        seqs = set(np.unique(np.concatenate([f["data"][k]["lstseq"] for k in f["data"]])).tolist())
        assert f["global"].attrs["CALIBRATION"] == expect.calibration
        rejected_cal = dict(json.loads(f["global"].attrs["CALREJECTED"]))
    assert seqs == reduced, f"frames missing from the fLC: {sorted(reduced - seqs)[:5]}, extra {sorted(seqs - reduced)[:5]}"
    assert set(rejected_cal) == set(expect.calib_rejected)
    return row
