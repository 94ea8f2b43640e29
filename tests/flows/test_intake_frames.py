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


def test_a_frame_replaced_by_its_gz_counts_once(pristine_night, tmp_path, caplog):
    """An operator compresses a frame after a reduction; the re-run counts the night's frames once.

    The row of the vanished ``.fits`` used to stay ``ok`` beside the ``.gz``'s
    (status showed one frame more than the night has); it is now ``gone``.
    """
    import gzip

    from corpus import linked_copy
    from flowkit import NIGHT, NIGHT_ID
    from intakekit import frame_rows, status_row

    from mascara.cli import mascprocess_main

    datadir = linked_copy(pristine_night, tmp_path / "data")
    raw = datadir / NIGHT_ID / "raw"
    args = [str(datadir), "--night", NIGHT, "--camera", "E", "--site", "LP", "--no-prefect", "-q"]
    assert mascprocess_main(args) == 0
    nframes = len([p for p in raw.iterdir() if p.name.endswith(f"{NIGHT_ID[-3:]}.fits")])
    assert status_row(datadir)["frames_ok"] == nframes
    frame = sorted(p for p in raw.iterdir() if p.name.endswith(f"{NIGHT_ID[-3:]}.fits"))[60]
    data = frame.read_bytes()
    frame.unlink()  # a hard link of the pristine night: unlinking leaves the original alone
    with gzip.open(raw / (frame.name + ".gz"), "wb") as f:
        f.write(data)
    caplog.clear()
    assert mascprocess_main(args) == 0
    assert any("no longer in raw/" in r.getMessage() and frame.name in r.getMessage() for r in caplog.records)
    row = status_row(datadir)
    assert (row["frames_ok"], row["frames_rejected"]) == (nframes, 0)
    rows = frame_rows(datadir)
    assert rows[frame.name][1] == "gone" and rows[frame.name][2].startswith("not in raw/ at the intake of")
    assert rows[frame.name + ".gz"][1] == "ok"


def test_archiving_every_frame_keeps_the_last_reduction_s_record(pristine_night, tmp_path):
    """A night whose frames were all moved to an archive is not reduced again, and its record stays as it was."""
    from corpus import linked_copy
    from flowkit import NIGHT, NIGHT_ID
    from intakekit import frame_rows, status_row

    from mascara.cli import mascprocess_main

    datadir = linked_copy(pristine_night, tmp_path / "data")
    raw = datadir / NIGHT_ID / "raw"
    args = [str(datadir), "--night", NIGHT, "--camera", "E", "--site", "LP", "--no-prefect", "-q"]
    assert mascprocess_main(args) == 0
    before = status_row(datadir)["frames_ok"]
    archive = tmp_path / "archive"
    archive.mkdir()
    for p in raw.iterdir():
        if p.name.endswith(f"{NIGHT_ID[-3:]}.fits"):
            p.rename(archive / p.name)
    mascprocess_main(args)  # nothing to reduce
    assert status_row(datadir)["frames_ok"] == before > 0
    assert not [f for f, (_seq, st, _r) in frame_rows(datadir).items() if st == "gone"]


def test_status_lists_every_rejected_file_with_its_reason(pristine_night, tmp_path, capsys):
    """``mascara status --rejected``: what a stranger had to ask sqlite3 for (the JSON equals the catalog's
    frame rows; the table names the files)."""
    import json

    from intakekit import frame_rows

    from mascara.cli import main

    datadir, expect, code, err = run_case(FRAME_CASES[0], pristine_night, tmp_path, capsys)
    check(datadir, expect, code, err)
    refused = {f: r[2] for f, r in frame_rows(datadir).items() if r[1] == "rejected"}
    assert refused
    assert main(["status", str(datadir), "--rejected", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["filename"]: r["reason"] for r in rows} == refused
    assert {(r["night"], r["camera"]) for r in rows} == {("20260301", "LPE")}
    assert main(["status", str(datadir), "--rejected", "--night", "20260302"]) == 0
    assert "no rejected raw files for night(s) 20260302" in capsys.readouterr().out
    assert main(["status", str(datadir), "--rejected"]) == 0
    table = capsys.readouterr().out
    assert all(f in table for f in refused), table
