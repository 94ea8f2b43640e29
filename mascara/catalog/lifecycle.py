"""The life of a camera-night reduction, one state machine for the Prefect flow and the library driver.

Phases of a run (``reduction_run.phase``; ``docs/lifecycle.md`` has the diagram)::

    registered -> moving -> reducing -> combining -> finished

- **registered**: the run row and the camera-night's lease are committed, and
  the night directory's lock is taken (:mod:`mascara.nightlock`: it keeps out
  runs recorded in *other* catalogs, which the lease cannot see; a refused
  run is recorded as failed). Nothing was decided; a run killed here did nothing on disk and is ignored
  by later decisions.
- **moving**: the run decided (``new``, ``resume``, ``move`` or ``erase``)
  and journaled every filesystem action it implies as ``intended``, in the
  same transaction. Each action is then done and confirmed; confirming
  rewrites (rename) or retires (erase) the catalog rows of the files under it.
  Whoever holds the lease next finishes unconfirmed actions before anything
  else: an intent is always rolled forward, never forgotten.
- **reducing**: batches registered; for a fresh reduction the batch rows of
  the same fingerprint were reset first. A batch is done only if its row says
  so *and* its file is in this night's current ``work/batches`` with the
  recorded sha256.
- **combining** then **finished**: the night files are written, then the
  products and the run's success are recorded in one transaction.

A retried step of the same run (a Prefect retry reuses the run id) reads the
phase and the decision from the catalog and redoes only what is not confirmed;
it never takes its own half-done state for a resume.

Output generations of a night directory: ``work``, ``lightcurves``,
``astrometry`` (and anything else beside ``raw/``) are the current outputs;
``<name>_old`` the previous reduction, ``<name>_old2`` the one before, and so
on up to ``keep_old`` generations; the current outputs of a reduction that never
finished (its run failed, even after writing night files it never recorded) do not
push a finished one out (:func:`plan_actions`). ``raw/`` is never
touched. An erase first renames the directory to a hidden bin
(``.mascara-erasing-<id>``) so that it disappears at once; a crash during the
removal leaves only the bin, which the next run removes. A caller that holds
signals while the run opens (the library driver) asks for the bins to be left
(``defer_bin_removal``) and removes them with :func:`remove_bins` once a
signal can stop it again: the held part is then renames and catalog writes
only, however large the erased outputs are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from mascara import faults, nightlock
from mascara.catalog._engine import shown_url
from mascara.catalog.catalog import (ABANDONED, Catalog, CatalogError, JournalEntry, LeaseHeld, RunInfo, fingerprint_key,
                                     flow_run_run_id, pid_running)
from mascara.selection import is_output_entry, night_dir_path

log = logging.getLogger(__name__)

#: Lease length of a run (s); runs heartbeat every third of it. ``MASCARA_LEASE_SECONDS`` sets
#: it (a longer lease for a catalog reached over a slow link, a short one for tests).
LEASE_SECONDS = float(os.environ.get("MASCARA_LEASE_SECONDS", "300"))
#: Generations of earlier outputs kept by default (``<name>_old``), as the original pipeline did.
KEEP_OLD = 1
#: Packages whose versions are stored with every run.
PROVENANCE_PACKAGES = ("mascara", "numpy", "scipy", "astropy", "photutils", "h5py", "numba", "prefect",
                       "prefect-dask", "dask", "distributed", "sqlalchemy", "sqlmodel", "alembic")

#: The directories a reduction writes beside ``raw/``.
PIPELINE_OUTPUTS = ("work", "lightcurves", "astrometry", "quicklook")

_OLD_RE = re.compile(r"^(?P<base>.+?)_old(?P<gen>[2-9]|[1-9]\d+)?$")
BIN_PREFIX = ".mascara-erasing-"


class LifecycleError(RuntimeError):
    """The night directory is in a state no journaled action can explain (needs a person)."""


class IncompleteNight(RuntimeError):
    """The combine was asked for batch files that are not in the current outputs."""


class Plan(Protocol):
    """What the lifecycle needs of a :class:`mascara.reduce.CameraNightPlan`."""

    night: Any  # NightDir: path, night, site, camera, night_id
    settings: Any
    batches: Mapping[int, list]

    def fingerprint(self) -> dict[str, str]: ...
    def batch_rows(self) -> list[tuple[int, int, int, int]]: ...
    def batch_path(self, batch: int) -> Path: ...


# --------------------------------------------------------------------------- output generations


def generation_name(base: str, gen: int) -> str:
    """``work`` (0), ``work_old`` (1), ``work_old2`` (2), ..."""
    return base if gen == 0 else f"{base}_old" if gen == 1 else f"{base}_old{gen}"


def _base_and_generation(name: str) -> tuple[str, int]:
    """``('lightcurves', 0)`` for ``lightcurves``, ``('lightcurves', 1)`` for ``lightcurves_old``, 2 for ``_old2``..."""
    m = _OLD_RE.match(name)
    return (m["base"], int(m["gen"] or 1)) if m else (name, 0)


def output_generations(night_path: str | Path) -> dict[str, dict[int, Path]]:
    """Outputs of a night directory: ``{base name: {generation: path}}`` (generation 0 is current).

    ``raw/``, the entries named like its generations (``raw_old``, ``raw_old2``: a copy of frames a
    user keeps there, :func:`mascara.selection.is_raw_entry`) and hidden entries (the erase bins) are not
    outputs: no decision ever moves or erases them.
    """
    out: dict[str, dict[int, Path]] = {}
    for p in sorted(Path(night_path).iterdir()):
        if not is_output_entry(p.name):
            continue
        base, gen = _base_and_generation(p.name)
        out.setdefault(base, {})[gen] = p
    return out


def current_outputs(night_path: str | Path) -> list[Path]:
    return [g[0] for g in output_generations(night_path).values() if 0 in g]


def holds_night_files(path: str | Path) -> bool:
    """Whether a ``lightcurves`` directory holds both night files (fLC and sLC): a finished reduction."""
    p = Path(path)
    return p.is_dir() and any(p.glob("fLC_*.hdf5")) and any(p.glob("sLC_*.hdf5"))


def _check_keep_old(keep_old: int) -> None:
    if keep_old < 1:
        raise ValueError("keep_old must be at least 1 (use overwrite to erase instead)")


def plan_actions(night_path: str | Path, decision: str, keep_old: int = KEEP_OLD,
                 reason: str | None = None, made_by: tuple[str, str] | None = None
                 ) -> list[tuple[str, str | None, str, str | None]]:
    """Filesystem actions ``(src, dst, action, reason)`` of a decision, in the order they must run.

    ``move``: every generation shifts by one; those that would exceed
    ``keep_old`` are erased first. Current outputs of a reduction that never
    finished do not push a kept generation out: when older generations exist,
    the unfinished reduction's directories are erased instead (recorded like
    any erase) and the older ones stay where they are, so that failed runs in
    a row never erase the last finished reduction. ``made_by`` is ``(run id,
    status)`` of the run of this catalog that made the current outputs (the
    latest that acted, when the catalog ties the outputs to it:
    :func:`_maker_of_current`), or None. Its status decides: a run that
    succeeded finished, even if a night file was since removed by hand; one
    that failed never did, even if it wrote both night files before it was
    killed (it never recorded them, so they count for nothing). Outputs not
    tied to a run of this catalog are judged from disk: finished with both
    night files (fLC and sLC) in ``lightcurves/``.
    ``erase``: every output, all generations. ``new``/``resume``: nothing.
    """
    gens = output_generations(night_path)
    if decision == "erase":
        return [(str(p), None, "erased", reason) for g in gens.values() for _, p in sorted(g.items())]
    if decision != "move":
        return []
    _check_keep_old(keep_old)
    if made_by is None:
        finished = 0 in gens.get("lightcurves", {}) and holds_night_files(gens["lightcurves"][0])
    else:
        finished = made_by[1] == "succeeded"
    older = any(gen > 0 for g in gens.values() for gen in g)
    erases, renames = [], []
    if not finished and older:
        unfinished = {b for b in PIPELINE_OUTPUTS if 0 in gens.get(b, {})}
        why = (f"of run {made_by[0]}, which never finished ({made_by[1]}; any night files in it were never "
               "recorded)" if made_by else "of a reduction that never finished (no night files)")
        erases = [(str(gens[b][0]), None, "erased", f"{b} {why}; the older generations are kept")
                  for b in sorted(unfinished)]
        gens = {b: g for b, g in gens.items() if b not in PIPELINE_OUTPUTS}  # their older generations stay
    for base, g in gens.items():
        for gen, p in g.items():
            if gen >= keep_old:
                erases.append((str(p), None, "erased",
                               f"generation {gen} of {base} makes room (keep_old={keep_old})"))
            else:
                renames.append((gen, str(p), str(p.with_name(generation_name(base, gen + 1)))))
    # the oldest generation moves first, so no rename lands on an existing directory
    ordered = [(src, dst, "renamed", reason) for _, src, dst in sorted(renames, key=lambda r: -r[0])]
    return erases + ordered


def execute_action(entry: JournalEntry, night_path: str | Path, remove_bin: bool = True) -> str | None:
    """Do (or finish) one journaled action; idempotent. Returns a note for the journal, if any.

    ``remove_bin`` False: an erase ends with the directory in its bin (out of
    view, its action done); :func:`remove_bins` removes it (a later run's, if
    this one stops first; a :func:`recover` that removes bins also sweeps it).

    Raises
    ------
    LifecycleError
        Both the source and the destination of a rename exist.
    """
    src = Path(entry.src)
    if entry.action == "renamed":
        dst = Path(entry.dst)  # type: ignore[arg-type]
        if src.exists() or src.is_symlink():
            if dst.exists():
                raise LifecycleError(f"cannot rename {src} to {dst}: both exist (journal entry {entry.id})")
            os.rename(src, dst)
            faults.checkpoint("mid_move")
            return None
        return None if dst.exists() else f"{src.name} was already gone"
    bin_ = Path(night_path) / f"{BIN_PREFIX}{entry.id}"
    note = None
    if src.exists() or src.is_symlink():
        os.rename(src, bin_)  # gone from view at once; the removal below may take a while
        faults.checkpoint("mid_move")
    elif not bin_.exists():
        note = f"{src.name} was already gone"
    if remove_bin and (bin_.exists() or bin_.is_symlink()):
        _remove(bin_)
    return note


def _remove(path: Path) -> None:
    """Remove an erase's bin (a directory, a file or a link)."""
    faults.checkpoint("removing_bins")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_bins(night_path: str | Path) -> list[str]:
    """Remove the bins of erased directories in a night directory (their actions are confirmed); their names.

    Call it holding the camera-night's lease, after :func:`recover` (every
    erase of this catalog confirmed): a bin then holds only what a done erase
    took out of view. Every bin is tried; if any cannot be removed, an
    ``OSError`` naming each of them is raised after the others are gone (the
    caller fails its run, so that a later run tries again rather than a
    finished night keeping an erased reduction on disk). Interrupted, it
    leaves the rest of a bin to the next call.
    """
    removed, failed = [], []
    for bin_ in sorted(Path(night_path).glob(f"{BIN_PREFIX}*")):
        try:
            _remove(bin_)
        except OSError as exc:
            failed.append(f"{bin_}: {exc}")
            continue
        removed.append(bin_.name)
    if failed:
        raise OSError(f"could not remove what an erase left: {'; '.join(failed)}")
    return removed


def recover(cat: Catalog, camera_night_id: str, night_path: str | Path, remove_bins_: bool = True,
            own_run: str | None = None) -> list[JournalEntry]:
    """Finish every journaled action of the camera-night not yet confirmed (of any run), oldest first.

    Call it holding the camera-night's lease. Returns the entries it finished.
    ``remove_bins_`` False leaves the bins of erased directories for
    :func:`remove_bins` (see :func:`execute_action`).
    """
    done = []
    for entry in cat.pending_actions(camera_night_id):
        note = execute_action(entry, night_path, remove_bin=remove_bins_)
        cat.confirm_action(entry.id, note)
        done.append(entry)
        if entry.action == "erased":  # the run that decided it said so when it did (open_run): here, an earlier
            # run's intent finished now deserves the warning; one's own is only confirmed
            (log.info if entry.run_id == own_run else log.warning)(
                "%s: erased %s (%s)", Path(night_path).name, entry.src, entry.reason or "")
    if remove_bins_:
        for stray in Path(night_path).glob(f"{BIN_PREFIX}*"):
            # a bin whose action was confirmed before its removal finished
            shutil.rmtree(stray, ignore_errors=True) if stray.is_dir() else stray.unlink(missing_ok=True)
    return done


def reconcile_products(cat: Catalog, camera_night_id: str, run_id: str, night_path: str | Path) -> list[str]:
    """Bring the live products of a camera-night whose file is not in place up to date with the disk.

    A file moved aside outside this catalog (a run of another catalog on the
    same night directory renamed ``lightcurves/`` to ``lightcurves_old``, or a
    user did) is found in a generation of its output directory, the same
    size and modification time (:func:`product_in_place`), and recorded as
    renamed there: a whole directory at once when every such file under it
    went to the same generation and the directory is gone, else file by file.
    A file found nowhere is recorded as erased when its path is empty (removed
    by hand) or holds another file of this catalog found moved there (a run
    of another catalog erased a generation and moved the next into its
    place); erasures are recorded first, so that no row moved onto such a
    path goes with them. A file found nowhere whose name a foreign file took
    is left as it is (a copy that did not keep times looks like that too:
    :func:`up_to_date` and the decisions already treat it as replaced).
    Renames are recorded oldest generation first, each once no other pending
    rename still has to move a row off its destination; files moved in a
    cycle (two directories swapped by hand) are left as recorded, with a
    warning. This keeps "every live product row names its file" true
    whatever happened outside mascara. Returns the paths recorded.
    """
    night_path = Path(night_path)
    live = cat.live_products(camera_night_id)
    astray = [p for p in live if not product_in_place(p)]
    if not astray:
        return []
    gens = output_generations(night_path) if night_path.is_dir() else {}
    found = {p["path"]: at for p in astray if (at := _moved_copy(p, night_path, gens)) is not None}
    # renames: (generation of the source, source, destination, reason, {recorded path: path now})
    renames: list[tuple[int, str, str, str, dict[str, str]]] = []
    by_dir: dict[Path, list[str]] = {}
    for p in astray:
        top = _output_dir_of(Path(p["path"]), night_path)
        if top is not None:
            by_dir.setdefault(top, []).append(p["path"])
    whole: set[str] = set()
    for top, paths in by_dir.items():
        targets = {_output_dir_of(found[q], night_path) for q in paths if q in found}
        others = [p for p in live if p["path"] not in paths and _output_dir_of(Path(p["path"]), night_path) == top]
        if len(targets) == 1 and all(q in found for q in paths) and not others and not top.exists():
            dst = targets.pop()
            renames.append((_base_and_generation(top.name)[1], str(top), str(dst),
                            f"found in {dst.name} when run {run_id} started: "
                            "moved aside outside this catalog (by a run of another catalog, or by hand)",
                            {q: str(found[q]) for q in paths}))
            whole.update(paths)
    for p in astray:
        path = p["path"]
        if path in found and path not in whole:
            top = _output_dir_of(Path(path), night_path)
            renames.append((_base_and_generation(top.name)[1] if top is not None else 0, path, str(found[path]),
                            f"found at {found[path]} when run {run_id} started: moved outside this catalog",
                            {path: str(found[path])}))
    taken = {new for r in renames for new in r[4].values()}  # paths a file of this catalog was found at
    # erased: found nowhere, and its path empty, or taken by another file of this catalog (its own file went:
    # a run of another catalog erased a generation and moved the next one into its place). Recorded before
    # the renames, so that the rows moved onto such a path are not erased with it.
    erased = sorted(p["path"] for p in astray if p["path"] not in found
                    and (not Path(p["path"]).exists() or p["path"] in taken))
    # (a file whose name another file took, its own found nowhere, is left to the rules of a replaced night)
    for path in erased:
        cat.record_move(camera_night_id, run_id, path, None, "erased",
                        f"not found on disk when run {run_id} started (removed outside mascara"
                        + (", another of its files moved to its place)" if path in taken else ")"))
        log.warning("catalog: %s was removed outside mascara; recorded", path)
    done = list(erased)
    pending = sorted(renames, key=lambda r: (-r[0], r[1]))  # the oldest generation first, as moves go
    while pending:
        # a rename waits while it would move a row onto a path whose own row another pending rename moves
        ready = [r for r in pending if not any(set(r[4].values()) & set(o[4]) for o in pending if o is not r)]
        if not ready:
            log.warning("catalog: files of %s were moved in a cycle outside mascara (%s); left as recorded",
                        night_path, ", ".join(f"{Path(r[1]).name} -> {Path(r[2]).name}" for r in pending))
            break
        _, src, dst, reason, moved = ready[0]
        cat.record_move(camera_night_id, run_id, src, dst, "renamed", reason)
        log.warning("catalog: %s was moved to %s outside mascara; recorded", src, dst)
        done.extend(moved)
        pending.remove(ready[0])
    return sorted(done)


def _output_dir_of(path: Path, night_path: Path) -> Path | None:
    """The output directory of the night directory that holds ``path`` (``<night>/lightcurves_old``), or None."""
    try:
        rel = path.relative_to(night_path)
    except ValueError:
        return None
    return night_path / rel.parts[0] if len(rel.parts) > 1 else None


def _moved_copy(product: Mapping[str, Any], night_path: Path, gens: dict[str, dict[int, Path]]) -> Path | None:
    """Where a product's file is now, in another generation of its output directory (``gens``:
    :func:`output_generations`; the lowest one holding the same file by :func:`product_in_place`), or None."""
    path = Path(product["path"])
    top = _output_dir_of(path, night_path)
    if top is None:
        return None
    rel = path.relative_to(top)
    for gen, d in sorted(gens.get(_base_and_generation(top.name)[0], {}).items()):
        if d != top and product_in_place({**product, "path": str(d / rel)}):
            return d / rel
    return None


# --------------------------------------------------------------------------- decisions


def decide(previous: RunInfo | None, fp_key: str, overwrite: bool, has_current: bool,
           has_any: bool) -> tuple[str, str | None, str | None]:
    """``(decision, resumed run id, reason)`` of a new run from the latest run that acted (pure).

    - ``overwrite``: always a fresh reduction; every earlier output is erased.
    - the latest run that acted did not succeed and has the same fingerprint:
      resume it (its batches in the current outputs count as done).
    - current outputs exist: move them aside (``_old``).
    - otherwise: a new reduction.
    """
    if overwrite:
        return ("erase" if has_any else "new"), None, "re-run with -o (overwrite)"
    if previous is not None and previous.status != "succeeded" and previous.fingerprint_key == fp_key:
        return "resume", previous.run_id, f"resumes run {previous.run_id} ({previous.status})"
    if has_current:
        if previous is None:
            reason = "outputs without a catalog run"
        elif not previous.same_reduction_as(fp_key):
            reason = f"changed reduction (run {previous.run_id} had another fingerprint)"
        else:
            reason = f"re-run of the completed reduction of run {previous.run_id}"
        return "move", None, reason
    return "new", None, None


def _maker_of_current(cat: Catalog, camera_night_id: str, previous: RunInfo | None, night_path: Path
                      ) -> tuple[str, str] | None:
    """``(run id, status)`` of the run of this catalog that made the current outputs, when the catalog ties
    them to it: for a run that succeeded, a night file it recorded (still live after
    :func:`reconcile_products`) is in the current ``lightcurves/``; for one that did not, a batch file
    recorded under its fingerprint is in the current ``work/batches``. Otherwise None: the outputs are
    judged from disk (another catalog's run may have moved this one's aside since, or the user removed
    them), as outputs no run of this catalog made are."""
    if previous is None:
        return None
    if previous.status == "succeeded":
        here = night_path / "lightcurves"
        tied = any(p["run_id"] == previous.run_id and p["kind"] in ("fLC", "sLC") and Path(p["path"]).parent == here
                   for p in cat.live_products(camera_night_id))
    else:
        here = night_path / "work" / "batches"
        tied = any(path and Path(path).parent == here and Path(path).is_file()
                   for path, _ in cat.done_batches(camera_night_id, previous.fingerprint_key).values())
    return (previous.run_id, previous.status) if tied else None


def product_in_place(product: Mapping[str, Any]) -> bool:
    """Whether a recorded product's file is still the one its run wrote, by one ``stat`` (no checksum: a
    season holds terabytes): there, with the recorded size and modification time (``mtime_ns``; products
    recorded before migration 0008 by size alone). An outside trial's second catalog rewrote an fLC of the
    same size in place. Renames, ``cp -a`` and ``rsync -a`` keep both; a copy that does not keep times
    makes the night look replaced, and a re-run reduces it again."""
    try:
        st = os.stat(product["path"])
    except OSError:
        return False
    recorded = product.get("mtime_ns")
    return st.st_size == int(product["size"]) and (recorded is None or st.st_mtime_ns == int(recorded))


def up_to_date(cat: Catalog, camera_night_id: str, fp_key: str) -> str | None:
    """Why a camera-night needs no reduction under ``fp_key``, or None when it does (a backfill's test).

    It is up to date when its latest run that acted succeeded under the same
    fingerprint (same code version, settings, star catalogue and raw
    inventory) and every file that run recorded is in place
    (:func:`product_in_place`). A run in progress is reported too, so nobody
    starts a second. :func:`why_reduce` says why when it is None.
    """
    latest = cat.last_run(camera_night_id)
    if latest is not None and latest.live and process_gone(cat, latest.run_id) is None:
        # (a holder killed on this host is not in progress: the run that starts takes its lease over at once)
        return f"in progress: run {latest.run_id} on {latest.host} holds the lease"
    why, last = _reduce_reason(cat, camera_night_id, fp_key)
    if why is not None:
        return None
    when = last.finished_at.strftime("%Y-%m-%d %H:%M UTC") if last.finished_at else "earlier"
    return f"up to date: run {last.run_id} finished {when} with the same fingerprint; its files are in place"


def why_reduce(cat: Catalog, camera_night_id: str | None, fp_key: str,
               fingerprint: Mapping[str, str] | None = None) -> str | None:
    """Why a camera-night needs reducing under ``fp_key`` (``fingerprint``: its fields, to name those that
    changed), or None when its last run that acted left it up to date. A run in progress is not looked at
    (:func:`up_to_date` does)."""
    return _reduce_reason(cat, camera_night_id, fp_key, fingerprint)[0]


def _reduce_reason(cat: Catalog, camera_night_id: str | None, fp_key: str,
                   fingerprint: Mapping[str, str] | None = None) -> tuple[str | None, RunInfo | None]:
    """:func:`why_reduce`'s answer and the last run that acted, which it was judged by."""
    last = None if camera_night_id is None else cat.last_run(camera_night_id, decided=True)
    if last is None:
        return "never reduced", None
    if last.status == "running":
        gone = process_gone(cat, last.run_id)
        if gone is not None:  # killed: recorded running until a run takes it over, as the submitted one will
            return f"its last run {last.run_id} is recorded running, but its process {gone} is gone", last
    if last.status != "succeeded":
        return f"its last run {last.run_id} {last.status}" + (f": {last.error}"[:300] if last.error else ""), last
    if not last.same_reduction_as(fp_key):
        changed = [k for k in (fingerprint or {}) if (last.fingerprint or {}).get(k) != fingerprint[k]]
        what = ", ".join(k.replace("_hash", "").replace("_", " ") for k in changed) or "fingerprint"
        return f"reduced by run {last.run_id} with other {what}", last
    products = [p for p in cat.live_products(camera_night_id) if p["run_id"] == last.run_id]
    if not any(p["kind"] == "fLC" for p in products):
        return f"run {last.run_id} recorded no fLC", last
    moved = sorted(p["kind"] for p in products if not product_in_place(p))
    if moved:
        return f"{'+'.join(moved)} of run {last.run_id} deleted or replaced since", last
    return None, last


# --------------------------------------------------------------------------- opening a run


@dataclasses.dataclass
class RunHandle:
    """What the batch and combine steps of one camera-night need (plain, picklable values)."""

    db_url: str
    night_path: str
    night_id: str
    camera_night_id: str
    run_id: str
    fingerprint_key: str
    decision: str  # new, resume, move, erase
    moves: list[tuple[str, str | None]]
    done: dict[int, str]  # batch -> sha256 of batches verified done in the current outputs
    warnings: list[str] = dataclasses.field(default_factory=list)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the packages a run depends on (provenance), and the exact code under :data:`REVISION_KEY`."""
    out = {}
    for name in PROVENANCE_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    out[REVISION_KEY] = code_revision()
    return out


#: The ``package_version`` row of a run that names the code it ran, not only its release: ``mascara``'s
#: version stays the same between releases (it is the fingerprint's ``code_version``), the revision does not.
REVISION_KEY = "mascara (revision)"

#: The code a reduction runs: the package and its flows (the migrations change no result).
SOURCE_PACKAGES = ("mascara", "flows")


def source_digest(roots: list[Path]) -> str:
    """sha256 (16 hex digits) of the ``.py`` files under ``roots``: their paths relative to each root's parent
    and their bytes, in sorted order. Any edit changes it; a copy of the same files elsewhere does not."""
    h = hashlib.sha256()
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            if "__pycache__" in p.parts:
                continue
            h.update(p.relative_to(root.parent).as_posix().encode() + b"\0")
            try:
                h.update(p.read_bytes() + b"\0")
            except OSError as exc:  # provenance never stops a run: the digest says a file could not be read
                h.update(f"unreadable: {exc.errno}".encode() + b"\0")
    return h.hexdigest()[:16]


_REVISION: str | None = None


def code_revision() -> str:
    """What code this process runs, for provenance (computed once per process).

    ``source <digest>`` of the running ``mascara`` and ``flows`` sources
    (:func:`source_digest`), and where they are a git checkout, ``git
    <commit>`` with ``+changes`` when those files differ from the commit: a
    reduction can be traced to its code between version numbers, and an
    installed copy by its digest alone.
    """
    global _REVISION
    if _REVISION is not None:
        return _REVISION
    import importlib.util
    import subprocess

    roots = []
    for name in SOURCE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            roots.append(Path(spec.origin).parent)
    out = f"source {source_digest(roots)}"
    top = roots[0].parent if roots else None
    if top is not None and (top / ".git").exists():
        try:
            def git(*args: str) -> str:
                # --no-optional-locks: `git status` must not take index.lock under a developer's own git
                return subprocess.run(["git", "--no-optional-locks", "-C", str(top), *args], capture_output=True,
                                      text=True, timeout=10, check=True).stdout.strip()

            commit = git("rev-parse", "--short=12", "HEAD")
            changed = git("status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PACKAGES)
            out += f"; git {commit}{'+changes' if changed else ''}"
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("no git revision for %s: %s", top, exc)
    _REVISION = out
    return out


def verified_done(cat: Catalog, camera_night_id: str, fp_key: str, batch_dir: str | Path) -> dict[int, str]:
    """Batches done under ``fp_key``: row ``succeeded``, file in ``batch_dir`` with the recorded sha256.

    A file anywhere else (a directory moved aside) is not current, whatever its row says.
    """
    batch_dir = Path(batch_dir).absolute()
    out = {}
    for b, (path, sha) in cat.done_batches(camera_night_id, fp_key).items():
        if not path or not sha:
            continue
        p = Path(path)
        if p.parent.absolute() == batch_dir and p.is_file() and file_sha256(p) == sha:
            out[int(b)] = sha
    return out


def process_gone(cat: Catalog, run_id: str) -> int | None:
    """The pid of run ``run_id`` when the catalog says it ran on this host in a process that no longer exists.

    Such a run is recorded ``running`` until the next run of its camera-night
    takes it over (a ``kill -9``, or a catalog it could not write its end to);
    views say so. None for a run of another host, or whose process lives.
    """
    from sqlmodel import Session

    from mascara.catalog.models import ReductionRun

    with Session(cat.engine) as s:
        run = s.get(ReductionRun, run_id)
        host, pid = (run.host, run.pid) if run is not None else (None, None)
    if host != socket.gethostname() or pid is None or pid_running(pid):
        return None
    return pid


def abandoned_flow_run(cat: Catalog, camera_night_id: str, run_id: str, flow_run_id: str | None) -> RunInfo | None:
    """The previous run of a camera-night when its flow run may be called crashed, else None.

    That is: the catalog ended it as abandoned (its process gone, its lease
    expired) when a later run (``run_id``, of flow run ``flow_run_id``) took
    the camera-night over, it ran in another flow run, and no run of that flow
    run is still recorded ``running``: one flow run reduces several cameras,
    and a process that only stalled past one camera-night's lease may still
    hold the others'.
    """
    prev = cat.last_run(camera_night_id, exclude=run_id)
    if (prev is None or prev.status != "failed" or not (prev.error or "").startswith(ABANDONED)
            or not prev.flow_run_id or prev.flow_run_id == flow_run_id
            or cat.running_runs_of_flow_run(prev.flow_run_id)):
        return None
    return prev


def _release_dead_lease(cat: Catalog, exc: LeaseHeld) -> bool:
    """End the holder's run when it ran on this host in a process that no longer exists.

    A killed run keeps its lease until it expires; on the same host the process
    table tells for sure that it is gone, so a re-run need not wait.
    """
    pid = process_gone(cat, exc.run_id)
    if pid is None:
        return False
    log.warning("run %s (pid %d on this host) is gone; ending it and taking over its lease", exc.run_id, pid)
    cat.finish_run(exc.run_id, "failed", error=f"{ABANDONED} process {pid} on {exc.host} no longer exists")
    return True


def _register(cat: Catalog, plan: Plan) -> tuple[str, Path]:
    """The camera-night of ``plan`` registered (idempotent): its id and its absolute night directory."""
    night = plan.night
    night_path = night_dir_path(night.path)  # the spelling every recorded path uses
    return cat.register_camera_night(night.site, night.camera, night.night, night_path), night_path


def _run_fields(plan: Plan, *, flow_run_id: str | None, lease_seconds: float = LEASE_SECONDS,
                host: str | None = None, pid: int | None = None) -> dict[str, Any]:
    """The keyword arguments of :meth:`Catalog.start_run` for a run of ``plan`` (fingerprint and provenance)."""
    return dict(fingerprint=plan.fingerprint(), settings=plan.settings.to_dict(), versions=versions(),
                host=host or socket.gethostname(), flow_run_id=flow_run_id, lease_seconds=lease_seconds, pid=pid)


def open_run(cat: Catalog, db_url: str, plan: Plan, *, overwrite: bool = False, keep_old: int = KEEP_OLD,
             flow_run_id: str | None = None, lease_seconds: float = LEASE_SECONDS, host: str | None = None,
             pid: int | None = None, end_on_error: bool = False, take_lock: bool = True,
             defer_bin_removal: bool = False) -> RunHandle:
    """Take a camera-night through registered -> moving -> reducing; idempotent for the same run id.

    Raises
    ------
    LeaseHeld
        another live run of this catalog reduces this camera-night.
    mascara.nightlock.NightLocked
        a run of another catalog (or another run of this process under another
        catalog) reduces this night directory; the refused run is recorded as failed.
    LifecycleError
        the night directory contradicts the journal.

    ``take_lock``: False when the caller's process already holds the night
    directory's lock for this run (a Prefect flow holds it in its own process
    while its tasks may run on Dask workers: :func:`lock_for_flow`).

    ``end_on_error`` (the library drivers, which do not retry): a run that
    fails to open after it was registered is recorded as failed with the
    error before the exception propagates, so that it does not stay
    ``running`` until its lease is taken over. A Prefect start task leaves it
    running for its retries (same run id) and ends it after the last one.

    ``defer_bin_removal`` (a caller that holds signals while the run opens):
    erased directories are left in their hidden bins, out of view and with
    their actions confirmed; the caller removes them with :func:`remove_bins`
    once it can be interrupted again (a run stopped before that leaves them
    to the next run's :func:`remove_bins`, or to a Prefect run's
    :func:`recover`).
    """
    _check_keep_old(keep_old)  # before anything is registered: a refusal must not leave a run holding the lease
    cn_id, night_path = _register(cat, plan)
    kwargs = _run_fields(plan, flow_run_id=flow_run_id, lease_seconds=lease_seconds, host=host, pid=pid)
    fp_key = fingerprint_key(kwargs["fingerprint"])
    try:
        run_id = cat.start_run(cn_id, **kwargs)
    except LeaseHeld as exc:
        if not _release_dead_lease(cat, exc):
            raise
        run_id = cat.start_run(cn_id, **kwargs)
    # the lease keeps out runs of this catalog, the night directory's lock those of any other (before anything
    # is looked at or moved); a refusal is recorded in this catalog as the run's failure
    if take_lock:
        try:
            nightlock.acquire(night_path, run_id, shown_url(db_url))
        except nightlock.NightLocked as exc:
            cat.finish_run(run_id, "failed", error=f"refused: {exc}"[:2000])
            raise
    try:
        return _open_registered(cat, db_url, plan, run_id, cn_id, fp_key, night_path, overwrite, keep_old,
                                not defer_bin_removal)
    except Exception as exc:
        if end_on_error:
            try:
                cat.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
            except Exception as record:  # noqa: BLE001 - the error that stopped the run is the one to raise
                log.warning("run %s: its failure could not be recorded: %s", run_id, record)
                nightlock.release(run_id)
        raise


def lock_for_flow(cat: Catalog, db_url: str, plan: Plan, flow_run_id: str | None) -> str:
    """Take the night directory's lock in this (a flow's) process for the run its start task will open.

    A Prefect flow's tasks may run on Dask workers, each its own process; the
    lock must be held by the process that lives as long as the camera-night's
    reduction (the flow's), and released by it (:func:`mascara.nightlock.release_dir`)
    however the night ends. The run id is the one the start task derives
    from the flow run. Returns it.

    Raises
    ------
    LeaseHeld
        a live run of this catalog reduces the camera-night (nothing is
        recorded, as when :func:`open_run` is refused by the lease).
    mascara.nightlock.NightLocked
        a run of another catalog holds the night directory; recorded here as a
        failed run of this catalog (:func:`record_refusal`). Or a run of this
        catalog holds it that has not lost its lease, or is not registered yet
        (another flow of the camera-night, started at the same moment): nothing
        is recorded, as for :class:`LeaseHeld`.
    """
    cn_id, night_path = _register(cat, plan)
    run_id = flow_run_run_id(cn_id, flow_run_id) if flow_run_id else f"flow-{os.getpid()}-{plan.night.night_id}"
    # a live run of this catalog: refused here, before its lock is looked at (the lock is taken before the
    # lease on this path, and a lock held by this catalog's run is otherwise one whose lease was taken over)
    held = cat.live_lease(cn_id, run_id)
    if held is not None and not _release_dead_lease(cat, held):
        raise held

    def stalled(holder: dict) -> bool:
        """Whether a run of this catalog holding the lock may be gone on without: it lost its lease.

        A holder the catalog does not know yet is another flow between its lock and its start task
        (two flows of one camera-night started at once): it is refused, not taken over.
        """
        other = holder.get("run_id")
        if other == run_id:  # this run's own earlier try, in a process not yet gone
            return True
        try:
            info = cat.run_info(str(other))
        except CatalogError:  # starting, unless it has been "starting" for longer than a lease (a hung process)
            age = nightlock.held_for(holder)
            return age is not None and age > LEASE_SECONDS
        return info.finished_at is not None or cat.live_lease(cn_id, run_id) is None

    try:
        nightlock.acquire(night_path, run_id, shown_url(db_url), take_over=stalled)
    except nightlock.NightLocked as exc:
        # refused for another catalog's run: recorded here. Refused for a starting run of this catalog: nothing
        # is recorded (a refusal's run would take the lease for a moment, from under the run that is starting)
        if exc.holder.get("catalog") != shown_url(db_url):
            record_refusal(cat, plan, str(exc), flow_run_id=flow_run_id)
        raise
    faults.checkpoint("after_flow_lock")
    return run_id


def record_refusal(cat: Catalog, plan: Plan, error: str, *, flow_run_id: str | None = None,
                   host: str | None = None, pid: int | None = None) -> str | None:
    """Record a run refused before it opened (the night directory is locked by another catalog's run) as failed.

    Nothing is decided or moved. Returns the run id, or None when a run of
    this catalog holds the camera-night's lease (then nothing needs saying).
    """
    cn_id, _ = _register(cat, plan)
    try:
        run_id = cat.start_run(cn_id, **_run_fields(plan, flow_run_id=flow_run_id, host=host, pid=pid))
    except LeaseHeld:
        return None
    cat.finish_run(run_id, "failed", error=f"refused: {error}"[:2000])
    return run_id


def _open_registered(cat: Catalog, db_url: str, plan: Plan, run_id: str, cn_id: str, fp_key: str, night_path: Path,
                     overwrite: bool, keep_old: int, remove_bins_: bool = True) -> RunHandle:
    """:func:`open_run` once the run is registered and holds the lease and the lock: decide, move, begin."""
    night = plan.night
    faults.checkpoint("after_register")

    recover(cat, cn_id, night_path, remove_bins_)  # what earlier runs left half done comes first
    warnings: list[str] = []
    info = cat.run_info(run_id)
    if info.decision is None:
        reconcile_products(cat, cn_id, run_id, night_path)
        previous = cat.last_run(cn_id, decided=True, exclude=run_id)
        has_current = bool(current_outputs(night_path))
        has_any = bool(output_generations(night_path))
        decision, resumed, reason = decide(previous, fp_key, overwrite, has_current, has_any)
        actions = plan_actions(night_path, decision, keep_old, reason,
                               made_by=_maker_of_current(cat, cn_id, previous, night_path))
        entries = cat.decide(run_id, decision, resumed, actions)
        faults.checkpoint("after_intent")
    else:
        decision = info.decision
        entries = cat.decide(run_id, decision, info.resumed_run_id, [])  # the journal of the first try
    for e in entries:
        if e.action == "erased" and decision == "move":
            warnings.append(f"{night.night_id}: erasing {Path(e.src).name} ({e.reason})")
            log.warning(warnings[-1])
    # a move's erases were announced above ("erasing ..."); an -o's are announced as they are done
    recover(cat, cn_id, night_path, remove_bins_, own_run=run_id if decision == "move" else None)
    faults.checkpoint("after_move")

    cat.begin_reducing(run_id, plan.batch_rows(), fresh=decision != "resume", grown=bool(getattr(plan, "live", False)))
    faults.checkpoint("after_begin")
    batch_dir = Path(plan.batch_path(0)).parent
    done = verified_done(cat, cn_id, fp_key, batch_dir)
    if getattr(plan, "live", False):  # a live plan holds the batches ready so far, not the night's
        log.info("%s: %s run %s, %d batch(es) already done, %d ready now", night.night_id, decision, run_id,
                 len(done), len(plan.batches))
    else:
        log.info("%s: %s run %s, %d of %d batches already done", night.night_id, decision, run_id,
                 len(set(done) & set(plan.batches)), len(plan.batches))
    moved = [e for e in entries if e.action == "renamed"]
    if moved:  # where the previous reduction went, said where the user looks (the catalog has it too)
        log.info("%s: previous outputs moved aside (%s): %s", night.night_id, moved[0].reason or decision,
                 ", ".join(f"{Path(e.src).name} -> {Path(e.dst).name}" for e in moved))
    return RunHandle(db_url=db_url, night_path=str(night_path), night_id=night.night_id, camera_night_id=cn_id,
                     run_id=run_id, fingerprint_key=fp_key, decision=decision,
                     moves=[(e.src, e.dst) for e in entries], done=done, warnings=warnings)


# --------------------------------------------------------------------------- the end of a run


def describe_products(night_path: str | Path, products: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Product descriptions (kind, path, sha256, size, nstars) of a combined night, read from disk."""
    import h5py

    out = []
    for kind in ("fLC", "sLC"):
        path = products.get(kind)
        if not path or not Path(path).is_file():
            continue
        sha = products.get(f"sha256_{kind}") or file_sha256(path)
        with h5py.File(path, "r") as f:
            nstars = int(len(f["header_table"]["ascc"])) if "header_table" in f else None
        st = Path(path).stat()
        out.append({"kind": kind, "path": str(path), "sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "nstars": nstars})
    night = Path(night_path)
    for kind, path in (("solution", night / "astrometry" / "camera_solution.json"),
                       ("diagnostics", night / "work" / "diagnostics.hdf5")):
        if path.is_file():
            nstars = None
            if kind == "diagnostics":  # the diagnostic stars it holds
                with h5py.File(path, "r") as f:
                    nstars = len(f["fast"]) if "fast" in f else None
            st = path.stat()
            out.append({"kind": kind, "path": str(path), "sha256": file_sha256(path), "size": st.st_size,
                        "mtime_ns": st.st_mtime_ns, "nstars": nstars})
    return out


def finish_succeeded(cat: Catalog, handle: RunHandle, products: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Record the products and the run's success in one transaction (the done marker, written last)."""
    faults.checkpoint("after_slc")
    files = describe_products(handle.night_path, products)
    cat.finish_run(handle.run_id, "succeeded", products=files)
    return files


def check_batch_files(paths: list[str]) -> None:
    """Raise :class:`IncompleteNight` (not an ``OSError``: never retried) if a batch file is missing."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise IncompleteNight(f"{len(missing)} batch file(s) missing from the current outputs, e.g. "
                              f"{', '.join(missing[:3])}")
