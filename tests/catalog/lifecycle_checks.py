"""Invariants of a reduction's life (LIFECYCLE.md), checked against the catalog and the disk.

Shared by the model-based test and the regression tests of issue 9.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
from sqlalchemy import select
from sqlmodel import Session

from mascara.catalog import Catalog
from mascara.catalog.lifecycle import BIN_PREFIX
from mascara.catalog.models import DirectoryMove, Lease, Product, ReductionRun


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def tree_stat(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``root``: a cheap check that nothing was touched."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def night_file_content(path: Path) -> dict:
    """The SPEC §8 content of a night file: global attrs and every dataset's bytes."""
    out: dict = {}
    with h5py.File(path, "r") as f:
        out["global"] = {k: np.asarray(v).tolist() for k, v in f["global"].attrs.items()}

        def visit(name, obj):  # type: ignore[no-untyped-def]
            if isinstance(obj, h5py.Dataset):
                out[name] = (str(obj.dtype), np.asarray(obj[()]).tobytes())

        for group in ("data", "header", "header_table"):
            f[group].visititems(lambda n, o, g=group: visit(f"{g}/{n}", o))
    return out


def same_night_files(night_dir: Path, reference_dir: Path) -> list[str]:
    """Differences between the fLC/sLC content of two night directories (empty: identical)."""
    problems = []
    nid = Path(night_dir).name
    for kind in ("fLC", "sLC"):
        a = night_file_content(Path(night_dir) / "lightcurves" / f"{kind}_{nid}.hdf5")
        b = night_file_content(Path(reference_dir) / "lightcurves" / f"{kind}_{nid}.hdf5")
        if a.keys() != b.keys():
            problems.append(f"{kind}: different datasets")
        else:
            problems += [f"{kind}: {k} differs" for k in a if a[k] != b[k]][:5]
    return problems


def check_invariants(cat: Catalog, finished_runs: set[str]) -> None:
    """Raise AssertionError if the catalog and the disk disagree.

    1. every live product row names an existing file with its recorded sha256 (or, under a
       journaled action not yet confirmed, the file is where that action puts it);
    2. every run in ``finished_runs`` (it ended ``succeeded``) still says so, and each
       of its products is live or erased by a recorded action (a done erase, or a run);
    3. at most one lease per camera-night, held by a running run;
    4. no intended journal entry outlives a finished run of its camera-night;
    5. the latest succeeded run of a camera-night keeps its night files live (in the current
       outputs or an ``_old`` generation) unless a later run erased everything (``-o``): no run
       that never finished, nor any number of them, pushes the last finished reduction out.
    """
    with Session(cat.engine) as s:
        products = s.execute(select(Product)).scalars().all()
        moves = {m.id: m for m in s.execute(select(DirectoryMove)).scalars()}
        runs = {r.id: r for r in s.execute(select(ReductionRun)).scalars()}
        leases = s.execute(select(Lease)).scalars().all()
    intended = [m for m in moves.values() if m.state == "intended"]
    for p in products:
        if p.erased_at is None:
            assert runs[p.run_id].status == "succeeded", f"live product of unfinished run {p.run_id}"
            pending = [m for m in intended if p.path == m.src or p.path.startswith(m.src + "/")]
            if pending:
                # a crash between an action and its confirmation: the file is where the
                # journal says it is going (or still where it was); the next run confirms it
                m = pending[0]
                if m.action == "erased":
                    continue
                candidates = [Path(p.path), Path(m.dst + p.path[len(m.src):])]
            else:
                candidates = [Path(p.path)]
            found = [c for c in candidates if c.is_file()]
            assert found, f"live product row {p.kind} {p.path} (run {p.run_id}): no such file"
            assert sha256(found[0]) == p.sha256, f"live product row {p.path}: sha256 differs from the file's"
        else:
            by = p.erased_by
            assert by is not None, f"product {p.path} erased with no record of what erased it"
            assert (by in moves and moves[by].state == "done" and moves[by].action == "erased") or by in runs, \
                f"product {p.path} erased by {by}, which is neither a done erase nor a run"
    for run_id in finished_runs:
        assert runs[run_id].status == "succeeded", f"finished run {run_id} now says {runs[run_id].status}"
        kinds = {p.kind for p in products if p.run_id == run_id}
        assert {"fLC", "sLC"} <= kinds, f"finished run {run_id} lost its product rows ({kinds})"
    held = [lease.camera_night_id for lease in leases]
    assert len(held) == len(set(held)), "two leases on one camera-night"
    for lease in leases:
        assert runs[lease.run_id].status == "running", f"lease held by run {lease.run_id} ({runs[lease.run_id].status})"
    for cn in {r.camera_night_id for r in runs.values()}:
        ran = sorted((r for r in runs.values() if r.camera_night_id == cn), key=lambda r: (r.started_at, r.id))
        done = [r for r in ran if r.status == "succeeded"]
        if not done or any(r.decision == "erase" for r in ran if r.started_at > done[-1].started_at):
            continue
        kept = {p.kind for p in products if p.run_id == done[-1].id and p.erased_at is None}
        assert {"fLC", "sLC"} <= kept, \
            f"the last finished reduction (run {done[-1].id}) lost its night files to a later run ({kept})"
    for m in moves.values():
        if m.state == "intended":
            later = [r for r in runs.values() if r.camera_night_id == m.camera_night_id and r.status == "succeeded"
                     and r.started_at >= moves[m.id].intended_at]
            assert not later, f"journal entry {m.id} ({m.action} {m.src}) still intended after run {later[0].id} finished"


def check_night_dir(night_dir: Path) -> None:
    """After a finished run: no erase bin is left, the outputs are where the catalog looks for them."""
    bins = list(Path(night_dir).glob(f"{BIN_PREFIX}*"))
    assert not bins, f"erase bins left in {night_dir}: {bins}"
