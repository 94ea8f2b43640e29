"""The pure parts of the lifecycle: output generations, decisions, idempotent journal actions."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mascara.catalog import JournalEntry, RunInfo
from mascara.catalog.lifecycle import (
    BIN_PREFIX,
    LifecycleError,
    decide,
    execute_action,
    output_generations,
    plan_actions,
    remove_bins,
)


def _night(tmp_path: Path, *names: str) -> Path:
    night = tmp_path / "20260301LPE"
    (night / "raw").mkdir(parents=True)
    (night / "raw" / "00000001LPE.fits").write_bytes(b"raw")
    for n in names:
        (night / n).mkdir()
        (night / n / "f").write_text(n)
    return night


def _apply(night: Path, actions) -> None:  # type: ignore[no-untyped-def]
    for i, (src, dst, action, reason) in enumerate(actions):
        execute_action(JournalEntry(f"id{i}", "cn", "run", i, src, dst, action, "intended", reason), night)


def _finished(night: Path, gen: str = "lightcurves") -> None:
    """Night files in ``gen``: the mark of a finished reduction."""
    for kind in ("fLC", "sLC"):
        (night / gen / f"{kind}_{night.name}.hdf5").write_bytes(kind.encode())


def test_generations_rotate_and_the_oldest_makes_room(tmp_path):
    night = _night(tmp_path, "work", "lightcurves", "work_old", "lightcurves_old", "astrometry_old")
    _finished(night)
    assert {b: sorted(g) for b, g in output_generations(night).items()} == {
        "astrometry": [1], "lightcurves": [0, 1], "work": [0, 1]}
    actions = plan_actions(night, "move", keep_old=1, reason="re-run")
    assert [(Path(s).name, d and Path(d).name, a) for s, d, a, _ in actions] == [
        ("astrometry_old", None, "erased"), ("lightcurves_old", None, "erased"), ("work_old", None, "erased"),
        ("lightcurves", "lightcurves_old", "renamed"), ("work", "work_old", "renamed")]
    _apply(night, actions)
    assert sorted(p.name for p in night.iterdir()) == ["lightcurves_old", "raw", "work_old"]
    assert (night / "work_old" / "f").read_text() == "work"


def test_keep_old_two_shifts_generations_oldest_first(tmp_path):
    night = _night(tmp_path, "work", "work_old", "work_old2", "lightcurves")
    _finished(night)
    actions = plan_actions(night, "move", keep_old=2)
    assert [(Path(s).name, d and Path(d).name, a) for s, d, a, _ in actions] == [
        ("work_old2", None, "erased"), ("work_old", "work_old2", "renamed"),
        ("lightcurves", "lightcurves_old", "renamed"), ("work", "work_old", "renamed")]
    _apply(night, actions)
    assert (night / "work_old2" / "f").read_text() == "work_old" and (night / "work_old" / "f").read_text() == "work"


@pytest.mark.parametrize("keep_old", [1, 2])
def test_an_unfinished_reduction_never_pushes_a_finished_one_out(tmp_path, keep_old):
    """Runs that fail in a row under new settings (the trial: gain 0, then gain -1): the first moves
    the finished reduction aside and leaves unfinished outputs; the second must erase those, not the
    finished generation, which would leave the night without any night files."""
    night = _night(tmp_path, "work", "lightcurves", "astrometry")
    _finished(night)
    _apply(night, plan_actions(night, "move", keep_old=keep_old))  # the first failed run moves it aside ...
    (night / "work").mkdir()  # ... and leaves outputs of its own, without night files
    (night / "astrometry").mkdir()
    # killed before its combine: no lightcurves/ at all; the second run
    assert sorted((Path(s).name, a) for s, _, a, _ in plan_actions(night, "move", keep_old=keep_old)) == [
        ("astrometry", "erased"), ("work", "erased")]
    (night / "lightcurves").mkdir()
    (night / "lightcurves" / "fLC_20260301LPE.hdf5").write_bytes(b"half")  # killed between the two files
    actions = plan_actions(night, "move", keep_old=keep_old)  # the second run
    assert sorted((Path(s).name, a) for s, _, a, _ in actions) == [
        ("astrometry", "erased"), ("lightcurves", "erased"), ("work", "erased")]
    _apply(night, actions)
    assert sorted(p.name for p in night.iterdir()) == ["astrometry_old", "lightcurves_old", "raw", "work_old"]
    assert (night / "lightcurves_old" / "sLC_20260301LPE.hdf5").read_bytes() == b"sLC"
    # with nothing older to protect, an unfinished reduction is kept as a generation like any other
    fresh = _night(tmp_path / "fresh", "work")
    assert [(Path(s).name, a) for s, _, a, _ in plan_actions(fresh, "move")] == [("work", "renamed")]



def test_the_catalog_not_the_disk_says_whether_its_runs_finished(tmp_path):
    """Outputs made by a run of this catalog are judged by its status. A failed run killed after writing
    both night files (never recorded) did not finish: its outputs are erased and the older generation
    stays. A succeeded run whose fLC was removed by hand (an outside trial: its sLC and batch files were
    erased as "never finished") did finish: its outputs are moved aside like any finished reduction."""
    night = _night(tmp_path, "work", "lightcurves", "work_old", "lightcurves_old")
    _finished(night)
    _finished(night, "lightcurves_old")
    killed = plan_actions(night, "move", keep_old=1, made_by=("run-b", "failed"))
    assert sorted((Path(s).name, a) for s, _, a, _ in killed) == [("lightcurves", "erased"), ("work", "erased")]
    assert all("run run-b, which never finished (failed" in r for *_, r in killed)
    (night / "lightcurves" / f"fLC_{night.name}.hdf5").unlink()  # by hand, after a run that succeeded
    kept = plan_actions(night, "move", keep_old=1, made_by=("run-b", "succeeded"))
    assert [(Path(s).name, d and Path(d).name, a) for s, d, a, _ in kept] == [
        ("lightcurves_old", None, "erased"), ("work_old", None, "erased"),
        ("lightcurves", "lightcurves_old", "renamed"), ("work", "work_old", "renamed")]
    # outputs no run of this catalog made: judged from disk (no fLC, so not finished; the older stays)
    assert sorted((Path(s).name, a) for s, _, a, _ in plan_actions(night, "move", keep_old=1)) == [
        ("lightcurves", "erased"), ("work", "erased")]

def test_erase_takes_every_generation_and_never_raw(tmp_path):
    night = _night(tmp_path, "work", "work_old", "lightcurves")
    _apply(night, plan_actions(night, "erase"))
    assert [p.name for p in night.iterdir()] == ["raw"]
    assert (night / "raw" / "00000001LPE.fits").read_bytes() == b"raw"
    assert plan_actions(night, "resume") == [] and plan_actions(night, "new") == []


@pytest.mark.parametrize("decision", ["move", "erase"])
def test_copies_of_raw_named_like_its_generations_are_never_outputs(tmp_path, decision):
    """A user's earlier copy of the frames beside raw/ as raw_old or raw_old2 (an outside trial: raw_old was
    erased as "generation 1 of raw" by the first reduction of a night) is neither moved nor erased, nor is
    any entry whose name starts like raw (a later trial's raw_retransfer/ of frames was moved aside, then
    erased by -o); a name that does not (rawx_old) is an output as before."""
    kept = ("raw_old", "raw_old2", "raw_old10", "raw_older", "raw_retransfer", "raw.bak", "raw2")
    night = _night(tmp_path, *kept, "work", "lightcurves", "rawx_old")
    _finished(night)
    gens = output_generations(night)
    assert not {"raw", "raw_older", "raw_retransfer", "raw.bak", "raw2"} & set(gens), gens
    assert gens["rawx"] == {1: night / "rawx_old"}
    actions = plan_actions(night, decision, keep_old=1)
    touched = {Path(p).name for src, dst, _, _ in actions for p in (src, dst) if p}
    assert not touched & {"raw", *kept}, actions
    _apply(night, actions)
    for n in kept:
        assert (night / n / "f").read_text() == n
    assert (night / "raw" / "00000001LPE.fits").read_bytes() == b"raw"
    # and the first reduction of a night that has only raw data beside raw/ plans nothing at all
    bare = _night(tmp_path / "bare", "raw_old")
    assert output_generations(bare) == {} and plan_actions(bare, "move") == [] == plan_actions(bare, "erase")


def test_actions_are_idempotent_and_finish_what_a_crash_left(tmp_path):
    night = _night(tmp_path, "work", "lightcurves")
    rename = JournalEntry("r1", "cn", "run", 0, str(night / "work"), str(night / "work_old"), "renamed",
                          "intended", None)
    assert execute_action(rename, night) is None
    assert execute_action(rename, night) is None  # done before: nothing to do, no complaint
    # a crash after the erase moved the directory to its bin: the next run removes the bin
    erase = JournalEntry("e1", "cn", "run", 1, str(night / "lightcurves"), None, "erased", "intended", None)
    (night / "lightcurves").rename(night / f"{BIN_PREFIX}e1")
    assert execute_action(erase, night) is None
    assert not (night / f"{BIN_PREFIX}e1").exists()
    assert execute_action(erase, night) == "lightcurves was already gone"
    # an erase asked to leave its bin (a caller holding signals): done and out of view, removed later
    (night / "astrometry").mkdir()
    (night / "astrometry" / "f").write_text("astrometry")
    erase2 = JournalEntry("e2", "cn", "run", 2, str(night / "astrometry"), None, "erased", "intended", None)
    assert execute_action(erase2, night, remove_bin=False) is None
    assert not (night / "astrometry").exists() and (night / f"{BIN_PREFIX}e2" / "f").read_text() == "astrometry"
    assert execute_action(erase2, night, remove_bin=False) is None  # again: the bin is its state, no complaint
    (night / f"{BIN_PREFIX}e3").symlink_to(night / "raw")  # a bin that is a link: the link goes, not raw
    assert remove_bins(night) == [f"{BIN_PREFIX}e2", f"{BIN_PREFIX}e3"]
    assert not list(night.glob(f"{BIN_PREFIX}*")) and (night / "raw" / "00000001LPE.fits").read_bytes() == b"raw"
    assert remove_bins(night) == []
    # both ends of a rename present: nothing in the journal explains it, a person must look
    (night / "work").mkdir()
    with pytest.raises(LifecycleError, match="both exist"):
        execute_action(rename, night)


def _run(status: str, fp: str = "fp1") -> RunInfo:
    t = datetime(2026, 3, 2, tzinfo=UTC)
    return RunInfo(run_id="r0", camera_night_id="cn", status=status, fingerprint={}, fingerprint_key=fp,
                   host="h", flow_run_id=None, started_at=t, heartbeat_at=t, finished_at=t, error=None,
                   live=False, phase="reducing", decision="move")


@pytest.mark.parametrize("previous, overwrite, current, anything, expected", [
    (None, False, False, False, "new"),
    (None, False, True, True, "move"),  # outputs without a catalog run are kept aside too
    (_run("succeeded"), False, True, True, "move"),  # a completed reduction re-run
    (_run("failed"), False, True, True, "resume"),  # an interrupted one, same fingerprint
    (_run("failed"), False, False, True, "resume"),  # interrupted right after moving aside
    (_run("failed", "fp2"), False, True, True, "move"),  # an interrupted *other* reduction
    (_run("failed"), True, True, True, "erase"),  # -o: fresh, whatever the state
    (_run("failed"), True, False, False, "new"),
    (None, True, False, True, "erase"),  # only _old generations: -o erases them too
])
def test_decisions(previous, overwrite, current, anything, expected):
    decision, resumed, _ = decide(previous, "fp1", overwrite, current, anything)
    assert decision == expected
    assert (resumed == "r0") == (expected == "resume")


def test_a_live_run_that_recorded_its_inventory_but_did_not_succeed_is_not_called_a_completed_reduction():
    """A live run records the raw inventory it reduced as it starts its combine; killed or failed after
    that, it did not end: the next run moves its outputs aside as another (unfinished) reduction's, not as
    "the completed reduction" of an offline plan of the same raw/, and the night is not up to date."""
    from mascara.catalog.catalog import fingerprint_key

    fields = {"code_version": "c", "settings_hash": "s", "catalogue_hash": "k", "raw_inventory_hash": "live"}
    offline = fingerprint_key({**fields, "raw_inventory_hash": "final"})
    for status, same in (("succeeded", True), ("failed", False), ("running", False)):
        run = dataclasses.replace(_run(status, fingerprint_key(fields)), fingerprint=fields,
                                  final_raw_inventory_hash="final")
        assert run.same_reduction_as(offline) is same, status
        _, _, reason = decide(run, offline, False, True, True)
        assert ("completed reduction" in reason) is same, (status, reason)


def test_run_info_is_plain_data():
    assert dataclasses.asdict(_run("failed"))["decision"] == "move"


def test_one_sqlite_catalog_spelled_two_ways_is_one_catalog_for_the_night_lock(tmp_path, monkeypatch):
    """The night directory's lock tells catalogs apart by URL: a relative path, a path through a symbolic
    link and the absolute path of one SQLite file are one catalog (its lease decides between its runs)."""
    from mascara.catalog._engine import shown_url as _shown_url

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "real")
    absolute = f"sqlite:///{tmp_path / 'real' / 'catalog.sqlite'}"
    assert _shown_url("sqlite:///catalog.sqlite") == _shown_url(absolute) == \
        _shown_url(f"sqlite:///{tmp_path / 'link' / 'catalog.sqlite'}")
    assert _shown_url("postgresql+psycopg://mascara:secret@db/cat") == "postgresql+psycopg://mascara:***@db/cat"


def test_files_moved_aside_outside_the_catalog_are_followed_not_recorded_erased(tmp_path, catalog):
    """Stop 33's "left alone": catalog X reduced a night, then a run of catalog Y moved X's outputs aside
    (``lightcurves`` to ``lightcurves_old``, X's own ``lightcurves_old`` to ``lightcurves_old2``) and wrote
    no night files of its own yet. X's next run recorded X's files as erased while they sat in the ``_old``
    directories. They are recorded where they are now, the oldest generation first; a file removed by hand
    is still recorded erased, and a file replaced under its name is left to the rules of a replaced night."""
    import os

    from mascara.catalog.lifecycle import product_in_place, reconcile_products

    night = _night(tmp_path, "lightcurves", "lightcurves_old", "work")
    cn = catalog.register_camera_night("LP", "E", "20260301", night)
    fp = {"code_version": "1", "settings_hash": "s", "catalogue_hash": "c", "raw_inventory_hash": "r"}
    run = catalog.start_run(cn, fingerprint=fp, settings={}, versions={}, host="h")
    files = {"fLC0": night / "lightcurves" / "fLC_x.hdf5", "sLC0": night / "lightcurves" / "sLC_x.hdf5",
             "fLC1": night / "lightcurves_old" / "fLC_x.hdf5", "diag": night / "work" / "diagnostics.hdf5",
             "gone": night / "work" / "gone.json", "replaced": night / "work" / "replaced.json"}
    for i, (name, path) in enumerate(files.items()):
        path.write_bytes(name.encode() * (10 + i))
        os.utime(path, ns=(10**18 + i, 10**18 + i))
        catalog.record_product(run, "fLC" if name.startswith("fLC") else "diagnostics", path, "0" * 64,
                               path.stat().st_size)
    catalog.finish_run(run, "succeeded")
    # another catalog's run: the generations shift (oldest first), no new night files
    (night / "lightcurves_old").rename(night / "lightcurves_old2")
    (night / "lightcurves").rename(night / "lightcurves_old")
    files["gone"].unlink()
    files["replaced"].write_bytes(b"another file under its name")

    run2 = catalog.start_run(cn, fingerprint=fp, settings={}, versions={}, host="h")
    recorded = reconcile_products(catalog, cn, run2, night)
    assert sorted(recorded) == sorted(str(files[k]) for k in ("fLC0", "sLC0", "fLC1", "gone"))
    live = {Path(p["path"]).relative_to(night).as_posix(): p for p in catalog.live_products(cn)}
    assert sorted(live) == ["lightcurves_old/fLC_x.hdf5", "lightcurves_old/sLC_x.hdf5", "lightcurves_old2/fLC_x.hdf5",
                            "work/diagnostics.hdf5", "work/replaced.json"]
    assert (night / "lightcurves_old" / "fLC_x.hdf5").read_bytes() == b"fLC0" * 10  # the rows name X's own files
    assert all(product_in_place(p) for k, p in live.items() if k != "work/replaced.json")
    from sqlmodel import Session, select

    from mascara.catalog.models import DirectoryMove

    with Session(catalog.engine) as s:
        moves = {(Path(m.src).relative_to(night).as_posix(), m.dst and Path(m.dst).relative_to(night).as_posix(),
                  m.action) for m in s.exec(select(DirectoryMove).where(DirectoryMove.run_id == run2))}
    assert moves == {("lightcurves", "lightcurves_old", "renamed"),  # the whole directory, at once
                     ("lightcurves_old/fLC_x.hdf5", "lightcurves_old2/fLC_x.hdf5", "renamed"),  # its directory is
                     ("work/gone.json", None, "erased")}  # still there (another generation took its name)
    assert reconcile_products(catalog, cn, run2, night) == []  # nothing more to say


def _products(catalog, night: Path, names: dict[str, Path]) -> tuple[str, str]:
    """A camera-night of ``catalog`` with a succeeded run that recorded ``names``' files (written here)."""
    import os

    cn = catalog.register_camera_night("LP", "E", "20260301", night)
    fp = {"code_version": "1", "settings_hash": "s", "catalogue_hash": "c", "raw_inventory_hash": "r"}
    run = catalog.start_run(cn, fingerprint=fp, settings={}, versions={}, host="h")
    for i, (name, path) in enumerate(names.items()):
        path.write_bytes(name.encode() * (10 + i))
        os.utime(path, ns=(10**18 + i, 10**18 + i))
        catalog.record_product(run, "fLC", path, "0" * 64, path.stat().st_size)
    catalog.finish_run(run, "succeeded")
    return cn, catalog.start_run(cn, fingerprint=fp, settings={}, versions={}, host="h")


def test_a_generation_another_catalog_erased_is_recorded_erased_not_left_naming_the_next_one(tmp_path, catalog):
    """A review: with keep_old 1, a run of another catalog erases lightcurves_old and moves lightcurves into its
    place. The older file's row must not go on naming the path where the newer file now is."""
    import shutil

    from mascara.catalog.lifecycle import product_in_place, reconcile_products

    night = _night(tmp_path, "lightcurves", "lightcurves_old")
    p0, p1 = night / "lightcurves" / "fLC_x.hdf5", night / "lightcurves_old" / "fLC_x.hdf5"
    cn, run2 = _products(catalog, night, {"p0": p0, "p1": p1})
    shutil.rmtree(night / "lightcurves_old")
    (night / "lightcurves").rename(night / "lightcurves_old")
    reconcile_products(catalog, cn, run2, night)
    live = catalog.live_products(cn)
    assert [Path(p["path"]).relative_to(night).as_posix() for p in live] == ["lightcurves_old/fLC_x.hdf5"]
    assert all(product_in_place(p) for p in live) and p1.read_bytes() == b"p0" * 10


def test_files_swapped_by_hand_are_left_as_recorded_not_both_rewritten(tmp_path, catalog):
    """A review: two directories swapped by hand (renames through a third name): recording one rename at a
    time moved both rows onto one path. A cycle of moves is left as it is recorded, with a warning."""
    from mascara.catalog.lifecycle import reconcile_products

    night = _night(tmp_path, "lightcurves", "lightcurves_old")
    p0, p1 = night / "lightcurves" / "fLC_x.hdf5", night / "lightcurves_old" / "fLC_x.hdf5"
    cn, run2 = _products(catalog, night, {"p0": p0, "p1": p1})
    (night / "lightcurves").rename(night / "swap")
    (night / "lightcurves_old").rename(night / "lightcurves")
    (night / "swap").rename(night / "lightcurves_old")
    before = sorted(p["path"] for p in catalog.live_products(cn))
    assert reconcile_products(catalog, cn, run2, night) == []
    assert sorted(p["path"] for p in catalog.live_products(cn)) == before  # two rows, two paths, as recorded
