"""One camera-night from raw frames to fLC/sLC files: the stages wired together.

The unit of work is a 50-frame batch (``lstseq // 50``).  An orchestrator (the
Prefect flow, or :func:`reduce_camera_night` here) calls, per camera-night:

1. :func:`plan_camera_night` - find the frames, group them in batches;
2. :func:`prepare_camera_night` - master calibration and the night's camera
   solution (found from the data, or reused from an earlier night), stored in
   the night's work directory so batches in other processes load it cheaply;
3. :func:`reduce_batch` for every batch, in any order, skipping finished ones;
   each writes one batch file atomically and returns a :class:`BatchOutcome`;
4. :func:`combine_camera_night` - the night-end fLC/sLC files.

Output directories of a night (everything beside ``raw/``)::

    work/         master calibration, night context, batch files, the split store and
                  diagnostics.hdf5 (light curves of a few bright stars, updated per batch)
    lightcurves/  fLC_<night_id>.hdf5, sLC_<night_id>.hdf5
    astrometry/   the night's camera solution and the per-batch solutions

Why batches fall back on the *night* solution and not on the previous batch:
batches run in any order and in parallel, and an interrupted night must give
the same result as an uninterrupted one, so a batch may depend on the night's
solution but never on another batch.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mascara import __version__
from mascara import lcformat as lcf
from mascara._files import atomic_path, save_npy
from mascara.astrometry import AstrometryFailed, correct_batch, initial_solution
from mascara.binning import reuse_stacker, tile_grid
from mascara.camera import CameraModel, nominal_camera
from mascara.diagnostics import diagnostic_stars, keep_binned_preview
from mascara.lightcurves import StarSplitter, combine_night, run_splitter_process, write_batch_file
from mascara.photometry import SkyNoiseModel, measure_apertures
from mascara.pixelphase import NTERMS, PixelPhaseModel, add_phase_terms
from mascara.rawio import (
    FRAME_RE,
    NEAR_FRAME_RE,
    BadFrame,
    FrameBuffers,
    FrameFile,
    MasterCalibration,
    NightDir,
    Rejection,
    calibrate,
    group_batches,
    master_calibration,
    night_frame_shape,
    parse_night_dir,
    raw_inventory_hash,
    read_calibrated,
    read_frame,
    regular_size,
    scan_raw,
)
from mascara.selection import CAMERAS, is_output_entry
from mascara.settings import Settings
from mascara.sky import ApparentPlaces, angular_distance, moon_altaz, radec_of_altaz
from mascara.stars import StarCatalogue, default_catalogue, load_catalogue
from mascara.timeindex import EXPTIME, get_site

log = logging.getLogger(__name__)

SOLUTION_FILE = "astrometry/camera_solution.json"


# --------------------------------------------------------------------------- planning


@dataclasses.dataclass
class CameraNightPlan:
    """What there is to reduce in one camera-night.

    ``frames`` are the candidates of the intake, one per lstseq (they are read
    and checked by the batch that uses them); ``rejected`` the files refused by
    name or as duplicates before any reading; ``calib_files`` the ``calib_*``
    files by kind; ``other`` everything else in ``raw/`` (ignored).
    """

    night: NightDir
    settings: Settings
    frames: list[FrameFile]
    batches: dict[int, list[FrameFile]]
    calib: list[Path]
    rejected: list[Rejection] = dataclasses.field(default_factory=list)
    calib_files: dict[str, list[Path]] = dataclasses.field(default_factory=dict)
    other: list[str] = dataclasses.field(default_factory=list)
    live: bool = False  # a night still being observed: its raw inventory is not final
    misnamed: str = ""  # what the frames say of a directory named more than a day from their night

    @property
    def workdir(self) -> Path:
        return self.night.path / "work"

    @property
    def outdir(self) -> Path:
        return self.night.path / "lightcurves"

    def batch_path(self, batch: int) -> Path:
        return self.workdir / "batches" / f"batch_{batch:07d}.h5"

    def fingerprint(self, catalogue: StarCatalogue | None = None) -> dict[str, str]:
        """What identifies this reduction: code, settings, star catalogue and raw inventory."""
        cat = catalogue if catalogue is not None else load_stars(self.settings)
        return {
            "code_version": __version__,
            "settings_hash": self.settings.fingerprint(),
            "catalogue_hash": cat.fingerprint(),
            # a live reduction cannot name the inventory it will end with: it registers a batch
            # only once complete, and the catalog refuses a batch whose frames change later
            "raw_inventory_hash": LIVE_INVENTORY if self.live
            else raw_inventory_hash(self.frames, self.calib, self.rejected),
        }

    # -- gap accounting: lstseq slots expected, present, missing --------------------------
    def lstseq_span(self) -> tuple[int, int] | None:
        """First and last lstseq with a frame file, or None for a night without frames."""
        return (self.frames[0].lstseq, self.frames[-1].lstseq) if self.frames else None

    def expected_slots(self, batch: int) -> int:
        """Slots of a batch from its start (or the night's first lstseq) to its end (or the night's last)."""
        span = self.lstseq_span()
        if span is None:
            return 0
        size = self.settings.batch_size
        lo, hi = max(batch * size, span[0]), min(batch * size + size - 1, span[1])
        return max(0, hi - lo + 1)

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Inclusive lstseq ranges without any frame file between the night's first and last frame.

        A slot whose file of this camera is there but refused (one that never
        arrived whole in a live night, one named nearly like a frame) is rejected, not missing.
        """
        seqs = [f.lstseq for f in self.frames]
        if seqs and self.rejected:
            own = {r.lstseq for r in self.rejected if r.lstseq is not None and seqs[0] < r.lstseq < seqs[-1]
                   and (m := NEAR_FRAME_RE.match(r.filename))  # every frame name matches it too
                   and (m["site"].upper(), m["camera"].upper()) == (self.night.site, self.night.camera)}
            seqs = sorted(set(seqs) | own)
        return [(a + 1, b - 1) for a, b in zip(seqs, seqs[1:]) if b - a > 1]

    def batch_rows(self) -> list[tuple[int, int, int, int]]:
        """``(batch, lstseq_min, lstseq_max, frames)`` of every batch, as the catalog registers them."""
        return [(b, min(f.lstseq for f in fr), max(f.lstseq for f in fr), len(fr)) for b, fr in self.batches.items()]

    def intake_summary(self) -> dict:
        """Night-level counts for the catalog: frames present, slots expected, missing ranges, emptiness."""
        span = self.lstseq_span()
        ranges = self.missing_ranges()
        return {
            "frames_present": len(self.frames),
            "lstseq_first": span[0] if span else None,
            "lstseq_last": span[1] if span else None,
            "slots_expected": span[1] - span[0] + 1 if span else 0,
            "frames_missing": sum(b - a + 1 for a, b in ranges),
            "missing_ranges": [list(r) for r in ranges],
            "empty_reason": self.empty_reason(),
        }

    def raw_filenames(self) -> set[str] | None:
        """Names of every file the planning saw in ``raw/`` (frames, refused ones, calibration, others).

        None for a live night, whose plan holds only the batches ready so far (and for the
        plans restricted to some batches, which are all live).
        """
        if self.live:
            return None
        names = {f.path.name for f in self.frames} | {r.filename for r in self.rejected} | set(self.other)
        names |= {p.name for p in self.calib} | {p.name for ps in self.calib_files.values() for p in ps}
        return names

    def empty_reason(self) -> str | None:
        """Why the night has nothing to reduce (no file named like a frame), or None."""
        if self.frames:
            return None
        ncal = sum(len(v) for v in self.calib_files.values())
        what = [f"{ncal} calib_ file(s)"] if ncal else []
        if self.rejected:
            what.append(f"{len(self.rejected)} rejected file(s) named like frames")
        if self.other:
            what.append(f"{len(self.other)} other file(s), e.g. {self.other[0]}")
        site_cam = f"{self.night.site}{self.night.camera}"
        return (f"no science frames in {self.night.raw} (no <lstseq>{site_cam}.fits[.gz] files"
                + (f"; found {', '.join(what)})" if what else "; the directory is empty)")
                + (f": {self.misnamed}" if self.misnamed else ""))


#: ``raw_inventory_hash`` of a live reduction's fingerprint.
LIVE_INVENTORY = "live"


def live_inventory(plan: CameraNightPlan) -> str | None:
    """The raw inventory an offline plan of ``raw/`` names now, when a live reduction (``plan``, its final
    plan) reduced exactly those files; None otherwise.

    The same frames (names and sizes) and calibration files as the live plan, every frame written before
    its batch file and every calibration file before the night's context (``work/context.json``, where
    the master was made): frames or darks that came after the live run's last look at ``raw/``, or a file
    replaced since, leave the night to be reduced again offline.
    """
    offline = plan_camera_night(plan.night, plan.settings)

    def frames(p: CameraNightPlan) -> set[tuple[str, int | None]]:
        return {(f.path.name, f.size) for f in p.frames}

    def calib(p: CameraNightPlan) -> set[tuple[str, int | None]]:
        return {(q.name, regular_size(q)) for qs in p.calib_files.values() for q in qs}

    if frames(offline) != frames(plan) or calib(offline) != calib(plan):
        return None
    try:
        made = (offline.workdir / "context.json").stat().st_mtime_ns
        if any(q.stat().st_mtime_ns > made for qs in offline.calib_files.values() for q in qs):
            return None
        for b, fs in offline.batches.items():
            written = offline.batch_path(b).stat().st_mtime_ns
            if any(f.path.stat().st_mtime_ns > written for f in fs):
                return None
    except OSError:
        return None
    return offline.fingerprint()["raw_inventory_hash"]


def plan_camera_night(night_dir: Path | str | NightDir, settings: Settings | None = None, *,
                      only: Collection[str] | None = None, live: bool = False) -> CameraNightPlan:
    """Find the frames of a camera-night and group them in batches (partial and gappy ones allowed).

    ``only`` restricts the plan to these ``raw/`` file names, and ``live``
    marks a plan of a night still being observed (:mod:`mascara.live`): its
    fingerprint names no raw inventory, which grows while it runs.
    """
    settings = settings or Settings()
    night = night_dir if isinstance(night_dir, NightDir) else parse_night_dir(night_dir)
    if night is None:
        raise ValueError(f"{night_dir}: not a night directory (<YYYYMMDD><SITE><CAM>)")
    if not night.raw.is_dir():
        raise FileNotFoundError(f"{night.path}: no raw/ subdirectory")
    scan = scan_raw(night, only=only)
    calib = [p for files in scan.calib.values() for p in files]
    return CameraNightPlan(
        night=night, settings=settings, frames=scan.frames,
        batches=group_batches(scan.frames, settings.batch_size), calib=calib,
        rejected=scan.rejected, calib_files=scan.calib, other=scan.other, live=live, misnamed=scan.misnamed,
    )


_CATALOGUES: dict[tuple, StarCatalogue] = {}


def load_stars(settings: Settings) -> StarCatalogue:
    """The star catalogue of the settings, cut at the slow-photometry limit; cached per process.

    The cache key is the file (path, size and modification time: a catalogue
    replaced on disk is read again) and the magnitude limit, so a process that
    reduces nights under different settings (a Prefect worker, a season's
    backfill, the test suite) never measures one night with another's stars.
    """
    path = settings.catalogue
    limit = max(settings.vmag_slow, settings.vmag_fast)
    stamp = None
    if path is not None:
        st = Path(path).stat()
        stamp = (str(Path(path).absolute()), st.st_size, st.st_mtime_ns)
    key = (stamp, float(limit))
    if key not in _CATALOGUES:
        cat = default_catalogue() if path is None else load_catalogue(path)
        _CATALOGUES[key] = cat.brighter_than(limit)
    return _CATALOGUES[key]


# --------------------------------------------------------------------------- night context


@dataclasses.dataclass
class NightContext:
    """Everything a batch needs that is computed once per camera-night."""

    night_path: str
    site: str
    camera: str
    night: str
    model: dict  # the night's camera solution (CameraModel.to_dict)
    solution_info: dict
    raw_shape: tuple[int, int] | None
    master_kind: str
    master_path: str | None
    master_level: float  # median of the master over the science area (ADU)
    aversion: str
    ccdtemp: float
    rejected_calib: list[tuple[str, str]]
    settings_hash: str = ""
    solution_start: str = "nominal"  # where the search for the camera solution started
    calibration_files: list[str] = dataclasses.field(default_factory=list)  # names combined into the master
    calibration_unused: list[str] = dataclasses.field(default_factory=list)  # good but not needed (biases)
    calibration_note: str = ""  # one line: what was used and why

    def calibration_state(self) -> dict:
        """Which master was used (``dark``, ``bias`` or ``none``), from which files, why; rejected files."""
        return calibration_state(self.master_kind, self.calibration_files, self.calibration_unused,
                                 self.rejected_calib, self.calibration_note)

    def camera_model(self) -> CameraModel:
        return CameraModel.from_dict(self.model)

    def master(self) -> MasterCalibration:
        level = None if self.master_path is None else _master_level(Path(self.master_path))
        return MasterCalibration(level=level, kind=self.master_kind, files=[], rejected=[])


#: Master levels read from ``work/``, by file identity (a master written again is a new file): every batch
#: asked for its camera-night's master, and each call read its 44 MB again (a fresh array: page faults and
#: a copy, twice per two batches at once). Read-only, shared by the batches; enough for every camera of a
#: station reduced in one process (a live night, a flow over all cameras), about 44 MB each.
_MASTERS: collections.OrderedDict = collections.OrderedDict()
_MASTERS_LOCK = threading.Lock()
_MASTERS_KEEP = len(CAMERAS) + 1


def _master_level(path: Path) -> np.ndarray:
    with open(path, "rb") as f:  # the identity of the file read, not of one that replaced it meanwhile
        st = os.fstat(f.fileno())
        key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with _MASTERS_LOCK:
            level = _MASTERS.get(key)
            if level is not None:
                _MASTERS.move_to_end(key)
                return level
        level = np.load(f)
    level.flags.writeable = False
    with _MASTERS_LOCK:
        _MASTERS[key] = level
        while len(_MASTERS) > _MASTERS_KEEP:
            _MASTERS.popitem(last=False)
    return level


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _previous_solution(night: NightDir) -> tuple[str, CameraModel] | None:
    """(night id, model) of the most recent stored camera solution of the same camera from an earlier night."""
    datadir = night.path.parent
    candidates = sorted(datadir.glob(f"*{night.site}{night.camera}/{SOLUTION_FILE}"))
    earlier = [p for p in candidates if p.parent.parent.name[:8] < night.night]
    if not earlier:
        return None
    return earlier[-1].parent.parent.name, CameraModel.from_dict(json.loads(earlier[-1].read_text())["model"])


class CalibrationRequired(RuntimeError):
    """``require_calibration`` was asked for and the night has no usable master dark.

    ``state`` is the night's calibration state (:func:`calibration_state`), for the record.
    """

    def __init__(self, message: str, state: dict):
        super().__init__(message)
        self.state = state


def calibration_state(kind: str, files: list, unused: list, rejected: list, note: str) -> dict:
    """The calibration of a night as plain values: what the catalog and the night files record."""
    return {"kind": kind, "files": [Path(p).name for p in files], "unused": [Path(p).name for p in unused],
            "rejected": [[Path(p).name, r] for p, r in rejected], "note": note}


def _require(plan: CameraNightPlan, state: dict) -> None:
    if state["kind"] != "dark":
        raise CalibrationRequired(f"{plan.night.night_id}: a master dark is required (--require-calibration) "
                                  f"but {state['note']}", state)


_BLAS_LIMITED = False


def one_blas_thread() -> None:
    """Put BLAS on one thread for the rest of this process (once; called by every reducing entry point).

    A reduction's numbers must not depend on where it ran: OpenBLAS on two
    threads sums in another order than on one, and a camera solution fitted
    in a Dask worker (one thread) differed in the last bit from one fitted in
    the main process (two threads). The work is spread over batches, not
    inside BLAS calls, so nothing is lost.
    """
    global _BLAS_LIMITED
    if not _BLAS_LIMITED:
        import scipy.linalg  # noqa: F401 - loads scipy's own OpenBLAS, so that the limit covers it too
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
        _BLAS_LIMITED = True


class NoCameraSolution(AstrometryFailed):
    """No frame of the night gave a camera solution; ``refused`` holds the frames the intake refused on the way,
    ``(lstseq, filename, size, reason)``, for the caller to record (no batch runs to record them)."""

    def __init__(self, message: str, refused: list[tuple[int, str, int, str]] | None = None):
        super().__init__(message)
        self.refused = list(refused or [])

    def __reduce__(self):  # the refused frames survive a trip through pickle (a Dask worker's task)
        return (type(self), (str(self), self.refused))


def prepare_camera_night(plan: CameraNightPlan, require_calibration: bool = False) -> NightContext:
    """Master calibration and the camera solution of a night; cached in ``work/context.json``.

    The night's frame shape is the most common one among frames spread over
    the night; calibration files and frames of another shape are refused.  The
    solution is found on the first frame passing the intake (middle frames of
    a batch first): detect stars, match them with the catalogue starting from
    an earlier night's solution or the nominal pointing, fit pointing and
    distortion.

    Raises
    ------
    CalibrationRequired
        ``require_calibration`` and no master dark could be made.
    AstrometryFailed
        when no frame of the night yields a camera solution.
    """
    one_blas_thread()
    ctx_path = plan.workdir / "context.json"
    if ctx_path.exists():
        d = json.loads(ctx_path.read_text())
        if d.get("settings_hash") == plan.settings.fingerprint():
            d["raw_shape"] = tuple(d["raw_shape"]) if d["raw_shape"] else None
            d["rejected_calib"] = [tuple(x) for x in d["rejected_calib"]]
            ctx = NightContext(**d)
            if require_calibration:
                _require(plan, ctx.calibration_state())
            return ctx
    shape = night_frame_shape(plan.frames)
    master = master_calibration(plan.night, shape, plan.calib_files)
    state = calibration_state(master.kind, master.files, master.unused, master.rejected, master.note)
    if require_calibration:
        _require(plan, state)
    plan.workdir.mkdir(parents=True, exist_ok=True)
    master_path = None
    if master.level is not None:
        master_path = plan.workdir / f"master_{master.kind}.npy"
        with atomic_path(master_path) as tmp, open(tmp, "wb") as f:
            save_npy(f, master.level)

    stars = load_stars(plan.settings)
    previous = _previous_solution(plan.night)
    start = previous[1] if previous else nominal_camera(plan.night.site, plan.night.camera, "full")
    solution_start = f"solution of {previous[0]}" if previous else "nominal"
    model, info, first = None, {}, None
    failures: list[str] = []  # astrometry failures; frames refused by the intake do not count
    # frames refused on the way: recorded by their batches, which apply the same checks, or, when no
    # solution is found and no batch runs, by the caller from the exception (NoCameraSolution.refused)
    refused: list[tuple[int, str, int, str]] = []
    for batch, frames in plan.batches.items():
        for ff in _middle_first(frames, batch, plan.settings.batch_size):
            try:
                frame = read_frame(ff.path, shape)
            except BadFrame as exc:
                refused.append((ff.lstseq, ff.path.name, ff.size, exc.reason))
                continue
            first = frame
            image, _ = calibrate(frame, master)
            if start.nx != image.shape[1] or start.ny != image.shape[0]:
                start = _fit_size(start, image.shape)
            places = ApparentPlaces(stars.ra, stars.dec, get_site(plan.night.site), float(frame.header["JD"]))
            alt, az = places.altaz(float(frame.header["JD"]))
            bright = (stars.vmag <= plan.settings.vmag_fast) & (alt > 5)
            try:
                model, info = initial_solution(image, alt[bright], az[bright], stars.vmag[bright], start)
                info = {**info, "lstseq": frame.lstseq, "file": frame.path.name}
            except AstrometryFailed as exc:
                failures.append(f"{frame.path.name}: {exc}")
                model = None
            break
        if model is not None or len(failures) > 20:
            break
    if model is None:
        why = "; ".join(failures[-3:]) if failures else f"no frame passed the intake ({len(refused)} refused)"
        raise NoCameraSolution(f"{plan.night.path}: no camera solution found ({why})", refused)
    solution = {"model": model.to_dict(), "info": _jsonable(info), "start": solution_start,
                "found_by": f"mascara {__version__}"}
    _atomic_write_text(plan.night.path / SOLUTION_FILE, json.dumps(solution, indent=1))
    sci = first.science_slice
    ctx = NightContext(
        night_path=str(plan.night.path), site=plan.night.site, camera=plan.night.camera, night=plan.night.night,
        model=model.to_dict(), solution_info=_jsonable(info), raw_shape=tuple(first.data.shape),
        master_kind=master.kind, master_path=str(master_path) if master_path else None,
        master_level=float(np.median(master.level[sci])) if master.level is not None else 0.0,
        aversion=str(first.header.get("AVERSION", "unknown")), ccdtemp=float(first.header["CCDTEMP"]),
        rejected_calib=[(str(p), r) for p, r in master.rejected],
        settings_hash=plan.settings.fingerprint(), solution_start=solution_start,
        calibration_files=state["files"], calibration_unused=state["unused"], calibration_note=master.note,
    )
    _atomic_write_text(ctx_path, json.dumps(dataclasses.asdict(ctx)))
    return ctx


def _fit_size(model: CameraModel, shape: tuple[int, int]) -> CameraModel:
    """A solution of the full CCD moved to a cropped (small) science area of the same optics."""
    m = model.copy()
    ny, nx = shape
    m.x0 += (nx - model.nx) / 2.0
    m.y0 += (ny - model.ny) / 2.0
    m.nx, m.ny = nx, ny
    return m


def _middle_first(frames: list[FrameFile], batch: int, size: int) -> list[FrameFile]:
    mid = batch * size + (size - 1) / 2.0
    return sorted(frames, key=lambda f: (abs(f.lstseq - mid), f.lstseq))


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# --------------------------------------------------------------------------- one batch


@dataclasses.dataclass
class BatchOutcome:
    """What a batch produced; everything the catalog records about it."""

    batch: int
    path: str | None
    sha256: str | None
    nframes: int
    lstseq_min: int
    lstseq_max: int
    rejected: list[tuple[int, str, str]]  # (lstseq, file name, reason)
    accepted: list[tuple[int, str, int]]  # (lstseq, file name, size)
    astro_rms: float | None
    astro_nstars: int
    flagged: bool  # astrometry fell back on the night solution
    message: str
    nstars_fast: int
    nstars_slow: int
    timings: dict[str, float]
    model: dict | None
    # gap accounting, in lstseq slots (a duplicate file is not a second frame)
    slots_expected: int = 0  # batch start (or the night's first frame) to batch end (or its last frame)
    frames_present: int = 0  # slots with a frame file
    frames_missing: int = 0  # slots_expected - frames_present

    @property
    def frames_rejected(self) -> int:
        """Slots whose frame file was refused by the intake (duplicates not counted)."""
        return self.frames_present - len(self.accepted)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Stopwatch:
    """CPU seconds per stage of this thread (batches may run side by side in threads)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str):
        sw = self

        class _Ctx:
            def __enter__(self):
                self.t = time.thread_time()

            def __exit__(self, *exc):
                sw.cpu[stage] += time.thread_time() - self.t

        return _Ctx()


def _star_table(stars: StarCatalogue, idx: np.ndarray) -> np.ndarray:
    t = np.zeros(len(idx), dtype=lcf.STAR_DTYPE)
    t["ascc"] = stars.ascc[idx].astype(lcf.ASCC_DTYPE)
    for k in ("ra", "dec", "vmag", "bmag", "spectype", "blend", "blendvalue"):
        t[k] = getattr(stars, k)[idx]
    return t


_ISOLATED: dict[tuple, np.ndarray] = {}


def isolated_stars(settings: Settings, scale: float) -> np.ndarray:
    """Per catalogue star: no other catalogue star within ``settings.astro_isolation_px`` on the sky.

    Computed once per process and catalogue (a k-d tree over ~10^5 unit vectors).
    """
    from scipy.spatial import cKDTree

    key = (settings.catalogue, settings.vmag_slow, settings.vmag_fast, settings.astro_isolation_px, scale)
    if key not in _ISOLATED:
        stars = load_stars(settings)
        ra, dec = np.radians(stars.ra), np.radians(stars.dec)
        xyz = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
        pairs = cKDTree(xyz).query_pairs(settings.astro_isolation_px / scale, output_type="ndarray")
        crowded = np.zeros(len(stars), bool)
        crowded[pairs.ravel()] = True
        _ISOLATED[key] = ~crowded
    return _ISOLATED[key]


class _Workspace:
    """The large buffers of one batch being reduced: two sets of frame buffers (the reference frame, the
    others) and a stacker, reused by the next batch that checks the workspace out (:func:`_batch_workspace`).

    Fresh ones per batch (about 300 MB of full frames) cost page faults and system time for nothing.
    Workspaces were once kept per thread; a Prefect flow's pool has a thread more than it reduces
    batches at once, and each of its threads then kept a set (RSS 1.37 -> 1.6 GB on the benchmark
    night); checked out from a pool there are as many as batches ever ran at once.
    """

    def __init__(self) -> None:
        self.frame_buffers = (FrameBuffers(), FrameBuffers())
        self.stacker = None


_FREE_WORKSPACES: list[_Workspace] = []
_WORKSPACES_LOCK = threading.Lock()


@contextlib.contextmanager
def _batch_workspace() -> Iterator[_Workspace]:
    """A free workspace (a new one when none is free), given back when the batch is done, however it ends."""
    with _WORKSPACES_LOCK:
        ws = _FREE_WORKSPACES.pop() if _FREE_WORKSPACES else _Workspace()
    try:
        yield ws
    finally:
        with _WORKSPACES_LOCK:
            _FREE_WORKSPACES.append(ws)


def reduce_batch(plan: CameraNightPlan, ctx: NightContext, batch: int) -> BatchOutcome:
    """Reduce one batch: calibrate, astrometry, photometry per frame, binning, binned photometry.

    Writes the batch file atomically and returns its outcome.  Every frame goes
    through the intake (:func:`mascara.rawio.read_frame` with the night's
    shape) before any use; refused frames, and the duplicates the planning
    refused, are in ``outcome.rejected`` with their reasons and never reach the
    photometry or the stacker.  A batch with no good frame writes an empty
    batch file (it is finished, there is nothing in it).
    """
    with _batch_workspace() as ws:
        return _reduce_batch(plan, ctx, batch, ws)


def _reduce_batch(plan: CameraNightPlan, ctx: NightContext, batch: int, ws: _Workspace) -> BatchOutcome:
    one_blas_thread()
    s = plan.settings
    frames = plan.batches[batch]
    sw = _Stopwatch()
    master = ctx.master()
    night_model = ctx.camera_model()
    site = get_site(ctx.site)
    stars = load_stars(s)

    # duplicates refused by the planning belong to this batch's record too
    rejected: list[tuple[int, str, str]] = [(r.lstseq, r.filename, r.reason) for r in plan.rejected
                                            if r.lstseq is not None and r.lstseq // s.batch_size == batch]
    accepted: list[tuple[int, str, int]] = []

    # -- the middle frame first: astrometry of the batch --------------------------------
    order = _middle_first(frames, batch, s.batch_size)
    ref = None
    # read + calibrate is one pass into buffers reused from frame to frame (the reference frame keeps its own),
    # and from batch to batch (the workspace)
    ref_buffers, buffers = ws.frame_buffers
    for ff in order:
        try:
            with sw("read"):
                ref, ref_image, ref_raw = read_calibrated(ff.path, master, ctx.raw_shape, ref_buffers)
            break
        except BadFrame as exc:
            rejected.append((ff.lstseq, ff.path.name, exc.reason))
    if ref is None:
        return _finish(plan, batch, frames, rejected, accepted, None, None, None, night_model, sw,
                       "no readable frame", astro=None)
    jd_ref = float(ref.header["JD"])
    with sw("positions"):
        places0 = ApparentPlaces(stars.ra, stars.dec, site, jd_ref)
        alt, az = places0.altaz(jd_ref)
        x, y = night_model.to_pixels(alt, az)
        margin = 120.0  # stars move ~80 px per batch
        near = np.flatnonzero(np.isfinite(x) & (x > -margin) & (x < night_model.nx + margin)
                              & (y > -margin) & (y < night_model.ny + margin) & (alt > 0))
        places = ApparentPlaces(stars.ra[near], stars.dec[near], site, jd_ref)
        vmag = stars.vmag[near]
    with sw("astrometry"):
        alt, az = places.altaz(jd_ref)
        lo, hi = s.vmag_astro
        astro_idx = np.flatnonzero((vmag > lo) & (vmag <= hi) & isolated_stars(s, night_model.scale)[near])
        astro = correct_batch(night_model, ref_image, alt[astro_idx], az[astro_idx], vmag[astro_idx],
                              np.ones(len(astro_idx), bool), min_stars=s.astro_min_stars, max_rms=s.astro_max_rms)
        model = astro.model if astro.ok else night_model

    # the Moon moves 0.05 deg in a batch: one mask per batch is enough
    near_moon = moon_mask(alt, az, site, jd_ref, s.moon_radius)
    fast_sel = np.flatnonzero(vmag <= s.vmag_fast)
    slow_sel = np.flatnonzero(vmag <= s.vmag_slow)
    nx, ny = model.nx, model.ny
    # one to_pixels per frame for the stars of both selections (the fast ones are the slow ones' bright end
    # when vmag_fast <= vmag_slow), sliced into each; the binned stars' positions only for the phase terms
    framed = np.union1d(fast_sel, slow_sel) if s.bin_phase_correction else fast_sel
    fast_at = np.searchsorted(framed, fast_sel)
    slow_at = np.searchsorted(framed, slow_sel)
    # per batch, not per frame: the ids' string conversion and the Moon flags are the same for every frame
    fast_ascc = stars.ascc[near[fast_sel]].astype(lcf.ASCC_DTYPE)
    fast_moon = np.where(near_moon[fast_sel], lcf.FLAG_MOON, 0).astype(np.uint16)

    # tile centres of the reference frame as fixed directions on the sky, for the stacker
    with sw("binning"):
        txc, tyc = tile_grid((ny, nx), s.bin_tile)
        tile_places = _tile_places(model, txc.ravel(), tyc.ravel(), site, jd_ref)
        stacker = reuse_stacker(ws, (ny, nx), tile=s.bin_tile, order=s.bin_order)
        # the pixel phases each binned star takes through the stack (mean over frames), for the
        # pixel-phase correction of the binned fluxes (mascara.pixelphase)
        phase_sum = np.zeros((len(slow_sel), NTERMS))
        phase_n = np.zeros(len(slow_sel))

    pieces = []
    piece_stars = []  # catalogue index of each fast row, piece by piece
    ccdtemps = []
    jds: list[float] = []
    lsts: list[float] = []
    for ff in sorted(frames, key=lambda f: f.lstseq):
        if ff.lstseq == ref.lstseq:
            frame, image, raw = ref, ref_image, ref_raw
        else:
            try:
                with sw("read"):
                    frame, image, raw = read_calibrated(ff.path, master, ctx.raw_shape, buffers)
            except BadFrame as exc:
                if not any(r[1] == ff.path.name for r in rejected):  # refused once already as reference
                    rejected.append((ff.lstseq, ff.path.name, exc.reason))
                continue
        accepted.append((ff.lstseq, ff.path.name, ff.size))
        h = frame.header
        jd = float(h["JD"])
        ccdtemps.append(float(h["CCDTEMP"]))
        jds.append(jd)
        lsts.append(float(h["LST"]))
        with sw("positions"):
            a, z = places.altaz(jd)
            px_all, py_all = model.to_pixels(a[framed], z[framed])
            fx, fy = px_all[fast_at], py_all[fast_at]
            on = np.flatnonzero(np.isfinite(fx) & (fx >= 0) & (fx <= nx - 1) & (fy >= 0) & (fy <= ny - 1))
        with sw("photometry"):
            ph = measure_apertures(image, fx[on], fy[on], s.apertures, s.sky_radii, s.gain, raw=raw,
                                   saturation=s.saturation, raw_row_max=frame.row_max)
            rows = lcf.fast_table(len(on))
            rows["ascc"] = fast_ascc[on]
            for k in ("flag", "flux0", "eflux0", "flux1", "eflux1", "sky", "esky", "peak"):
                rows[k] = ph[k]
            rows["flag"] |= fast_moon[on]
            rows["x"], rows["y"] = fx[on], fy[on]
            rows["alt"], rows["az"] = a[fast_sel[on]], z[fast_sel[on]]
            rows["ccdtemp"], rows["exptime"] = float(h["CCDTEMP"]), float(h["EXPTIME"])
            rows["jdmid"], rows["lst"] = jd, float(h["LST"])
            rows["lstidx"], rows["lstseq"] = int(h["LSTIDX"]), int(h["LSTSEQ"])
            pieces.append(rows)
            piece_stars.append(near[fast_sel[on]])
        with sw("binning"):  # only frames that passed the intake reach the stacker
            ta, tz = tile_places.altaz(jd)
            px, py = model.to_pixels(ta, tz)
            stacker.add(image, (px - txc.ravel()).reshape(txc.shape), (py - tyc.ravel()).reshape(tyc.shape))
            if s.bin_phase_correction:
                add_phase_terms(px_all[slow_at], py_all[slow_at], phase_sum, phase_n)
    fast = np.concatenate(pieces) if pieces else lcf.fast_table(0)
    fast_star = np.concatenate(piece_stars) if piece_stars else np.zeros(0, np.intp)
    slow_star = np.zeros(0, np.intp)

    # -- the binned image: astrometry again, then the slow photometry --------------------
    slow = np.zeros(0, dtype=lcf.with_ascc(lcf.SLOW_DTYPE))
    binned_astro = None
    phase_models: dict[str, dict] = {}
    if accepted:
        with sw("binning"):
            nf = len(accepted)
            if stacker.nframes != nf:
                raise AssertionError(f"stacker holds {stacker.nframes} frames, the batch accepted {nf}")
            # in the stacker's buffers; NaN where too few frames cover the pixel
            binned, count = stacker.finish(min_count=max(1, int(0.8 * nf)))
            keep_binned_preview(plan, batch, binned)  # the quick-look thumbnail (mascara.diagnostics)
        with sw("binned_astrometry"):
            binned_fill = stacker.filled()  # 0 where NaN, in a buffer of the stacker's
            binned_astro = correct_batch(model, binned_fill, alt[astro_idx], az[astro_idx], vmag[astro_idx],
                                         np.ones(len(astro_idx), bool), min_stars=s.astro_min_stars,
                                         max_rms=s.astro_max_rms)
            bmodel = binned_astro.model if binned_astro.ok else model
            sx, sy = bmodel.to_pixels(alt[slow_sel], az[slow_sel])
            on = np.flatnonzero(np.isfinite(sx) & (sx >= 0) & (sx <= nx - 1) & (sy >= 0) & (sy <= ny - 1))
        with sw("binned_photometry"):
            # the stack's pixel scatter is no measure of its noise (see SkyNoiseModel): errors from
            # the noise of the frames averaged, fitted to their per-frame sky and esky
            noise = None
            if len(fast):
                good = fast["flag"] == 0
                try:
                    noise = SkyNoiseModel(fast["sky"][good], fast["esky"][good], nf)
                except ValueError:
                    noise = None
            ph = measure_apertures(binned, sx[on], sy[on], s.binned_apertures, s.sky_radii, s.gain * nf,
                                   saturation=s.saturation - ctx.master_level, sky_noise=noise)
            if s.bin_phase_correction and len(fast):
                with np.errstate(invalid="ignore", divide="ignore"):
                    mean_terms = phase_sum[on] / phase_n[on, None]
                phase_models = correct_pixel_phase(ph, fast, sx[on], sy[on], mean_terms, s, (ny, nx),
                                                   star=fast_star)
            slow_star = near[slow_sel[on]]
            slow = np.zeros(len(on), dtype=lcf.with_ascc(lcf.SLOW_DTYPE))
            slow["ascc"] = stars.ascc[slow_star].astype(lcf.ASCC_DTYPE)
            for k in ph.dtype.names:
                if k in slow.dtype.names:
                    slow[k] = ph[k]
            slow["flag"] |= np.where(near_moon[slow_sel[on]], lcf.FLAG_MOON, 0).astype(np.uint16)
            slow["x"], slow["y"] = sx[on], sy[on]
            slow["alt"], slow["az"] = alt[slow_sel[on]], az[slow_sel[on]]
            slow["ccdtemp"] = float(np.mean(ccdtemps))
            slow["exptime"] = float(ref.header["EXPTIME"])
            # the time of the frames averaged (a partial batch's mean is not its registration frame);
            # positions stay those of the registration frame, lstseq/lstidx name that frame
            slow["jdmid"] = float(np.mean(jds))
            slow["lst"] = mean_lst(np.asarray(lsts))
            slow["lstidx"], slow["lstseq"] = int(ref.header["LSTIDX"]), ref.lstseq

    # the stars measured, in the order of their ids (from catalogue indices: no pass over the
    # catalogue's or the rows' id strings)
    used = np.unique(np.concatenate([fast_star, slow_star]))
    _, first = np.unique(stars.ascc[used].astype(lcf.ASCC_DTYPE), return_index=True)
    star_rows = _star_table(stars, used[first])
    return _finish(plan, batch, frames, rejected, accepted, fast, slow, star_rows, model, sw,
                   astro.message, astro=astro, binned_astro=binned_astro, phase_models=phase_models)


def correct_pixel_phase(ph: np.ndarray, fast: np.ndarray, x_ref: np.ndarray, y_ref: np.ndarray,
                        mean_terms: np.ndarray, s: Settings, shape: tuple[int, int],
                        star: np.ndarray | None = None) -> dict[str, dict]:
    """Undo the pixel phase of the binned image in the binned fluxes, in place (docs/binning.md).

    Every per-frame aperture smaller than the largest one is fitted
    (:class:`~mascara.pixelphase.PixelPhaseModel`) on the batch's unflagged
    per-frame photometry, its flux over the largest aperture's; the binned
    aperture of the same radius, if any, then has ``flux`` and ``eflux``
    multiplied by the star's correction. Binned apertures without a
    per-frame twin are left as measured. Returns the fitted models by binned
    field name, for the batch record. ``star`` identifies the star of each
    row of ``fast`` (default its ``ascc``; integers are numbered faster than
    id strings).
    """
    ref = int(np.argmax(s.apertures))
    good = fast["flag"] == 0
    star = (fast["ascc"] if star is None else np.asarray(star))[good]
    f_ref, e_ref = fast[f"flux{ref}"][good], fast[f"eflux{ref}"][good]
    models: dict[str, dict] = {}
    for k, radius in enumerate(s.apertures):
        if k == ref or radius not in s.binned_apertures:
            continue
        f, e = fast[f"flux{k}"][good], fast[f"eflux{k}"][good]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = f / f_ref
            eratio = ratio * np.sqrt((e / f) ** 2 + (e_ref / f_ref) ** 2)
        model = PixelPhaseModel.fit(star, fast["x"][good], fast["y"][good], ratio, eratio, shape)
        factor = model.correction(x_ref, y_ref, mean_terms)
        j = s.binned_apertures.index(radius)
        ph[f"flux{j}"] *= factor
        ph[f"eflux{j}"] *= factor
        models[f"flux{j}"] = model.to_dict()
    return models


def mean_lst(lst: np.ndarray) -> float:
    """Mean of local sidereal times in hours, across the 24 h wrap (a batch spans 5 minutes)."""
    lst = np.asarray(lst, dtype=np.float64)
    unwrapped = lst[0] + (lst - lst[0] + 12.0) % 24.0 - 12.0
    return float(np.mean(unwrapped) % 24.0)


def _tile_places(model: CameraModel, x: np.ndarray, y: np.ndarray, site, jd: float) -> ApparentPlaces:
    """Fixed sky directions behind the reference frame's tile centres, to follow them over the batch."""
    alt, az = model.to_altaz(x, y)
    ok = np.isfinite(alt)
    ra, dec = radec_of_altaz(np.where(ok, alt, 45.0), np.where(ok, az, 0.0), site, jd)
    return ApparentPlaces(np.where(ok, ra, np.nan), np.where(ok, dec, np.nan), site, jd)


def moon_mask(alt: np.ndarray, az: np.ndarray, site, jd: float, radius: float) -> np.ndarray:
    """Stars within ``radius`` degrees of the Moon while it is above the horizon."""
    malt, maz = moon_altaz(site, jd)
    if malt < -1.0:
        return np.zeros(np.shape(alt), bool)
    return angular_distance(alt, az, malt, maz) < radius


def _finish(plan, batch, frames, rejected, accepted, fast, slow, star_rows, model, sw, message, *, astro,
            binned_astro=None, phase_models=None) -> BatchOutcome:
    """Write the batch file (empty tables when ``fast`` is None) and describe the outcome."""
    s = plan.settings
    if fast is None:
        fast = lcf.fast_table(0)
        slow = np.zeros(0, dtype=lcf.with_ascc(lcf.SLOW_DTYPE))
        star_rows = _star_table(load_stars(s), np.zeros(0, np.int64))
    flagged = astro is None or not astro.ok
    outcome_model = model.to_dict() if model is not None else None
    attrs = {
        "batch": batch,
        "night_id": plan.night.night_id,
        "lstseq_min": min(f.lstseq for f in frames),
        "lstseq_max": max(f.lstseq for f in frames),
        "nframes": len(accepted),
        "slots_expected": plan.expected_slots(batch),
        "frames_present": len(frames),
        "rejected": [list(r) for r in rejected],
        "astro_ok": not flagged,
        "astro_rms": float(astro.rms) if astro is not None and astro.rms is not None else float("nan"),
        "astro_nstars": int(astro.nstars) if astro is not None else 0,
        "binned_astro_rms": float(binned_astro.rms) if binned_astro is not None and binned_astro.rms is not None else float("nan"),
        "camera_model": outcome_model,
        "pixel_phase": phase_models or {},
        "settings_hash": s.fingerprint(),
        "rversion": __version__,
    }
    with sw("write"):
        path = plan.batch_path(batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        sha = write_batch_file(path, fast, slow, star_rows, attrs)
    return BatchOutcome(
        batch=batch, path=str(path), sha256=sha, nframes=len(accepted),
        lstseq_min=attrs["lstseq_min"], lstseq_max=attrs["lstseq_max"],
        rejected=rejected, accepted=accepted,
        astro_rms=None if flagged else float(astro.rms), astro_nstars=attrs["astro_nstars"],
        flagged=flagged, message=message, nstars_fast=int(len(np.unique(fast["ascc"]))),
        nstars_slow=int(len(slow)), timings=dict(sw.cpu), model=outcome_model,
        slots_expected=attrs["slots_expected"], frames_present=len(frames),
        frames_missing=attrs["slots_expected"] - len(frames),
    )


# --------------------------------------------------------------------------- night end


def global_attrs(plan: CameraNightPlan, ctx: NightContext) -> dict:
    """The ``global`` attributes of the fLC file (SPEC §8); the sLC ones are derived by the writer."""
    s = plan.settings
    m = ctx.camera_model()
    apers = s.apertures
    attrs = {
        "STATION": ctx.site, "CAMERA": ctx.camera,
        "ALT0": m.alt0, "AZ0": m.az0, "TH0": m.th0, "X0": m.x0, "Y0": m.y0,
        "AVERSION": ctx.aversion, "RVERSION": __version__, "CVERSION": s.cversion,
        "EXPTIME": EXPTIME, "CCDTEMP": ctx.ccdtemp,
        "NAPER": len(apers), "NSTAPER": 2, "SKYRAD0": s.sky_radii[0], "SKYRAD1": s.sky_radii[1],
    }
    for i, r in enumerate(apers):
        attrs[f"APER{i}"] = r
    # the calibration actually applied: extra attributes, harmless to readers of the SPEC layout
    cal = ctx.calibration_state()
    attrs.update({
        "CALIBRATION": cal["kind"], "CALFILES": ",".join(cal["files"]), "CALNOTE": cal["note"],
        "CALREJECTED": json.dumps(cal["rejected"]),
    })
    return attrs


def combine_camera_night(plan: CameraNightPlan, ctx: NightContext, batch_paths: Iterable[str | Path]) -> dict:
    """Write ``lightcurves/fLC_<night_id>.hdf5`` and ``sLC_...`` from the batch files (idempotent)."""
    one_blas_thread()
    batch_paths = sorted(str(p) for p in batch_paths)
    # the split store of the night, if a splitter ran beside the batches (the driver's or the flow's)
    split = plan.workdir if (plan.workdir / StarSplitter.REGISTRY).exists() else None
    res = combine_night(
        batch_paths, plan.outdir, plan.night.night_id,
        global_attrs(plan, ctx), workdir=split,
        slow_apertures=plan.settings.binned_apertures,
    )
    if split is not None:  # the diagnostic stars' light curves follow the store, whoever split the batches last
        StarSplitter(split, diagnostic_stars(plan, ctx)).ensure_diagnostics()
    _write_batch_solutions(plan, batch_paths)
    return res


def _write_batch_solutions(plan: CameraNightPlan, batch_paths: list[str]) -> None:
    import h5py

    out = {}
    for p in batch_paths:
        with h5py.File(p, "r") as f:
            a = json.loads(f.attrs["attrs"])
        out[str(int(a["batch"]))] = {
            "camera_model": a.get("camera_model"),
            "astro_ok": bool(a["astro_ok"]), "astro_rms": float(a["astro_rms"]),
            "astro_nstars": int(a["astro_nstars"]),
        }
    _atomic_write_text(plan.night.path / "astrometry" / "batch_solutions.json", json.dumps(out, indent=1))


def diagnostic_ids(stars: StarCatalogue, n: int = 10) -> list[str]:
    """Ids of a few bright, unblended stars whose light curves are kept up to date during the night."""
    ok = (stars.vmag > 4.0) & (stars.vmag < 6.0) & (stars.blend == 0)
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(stars.vmag[idx])]
    return [str(a) for a in stars.ascc[idx[:: max(1, len(idx) // n)][:n]]]


# --------------------------------------------------------------------------- output directories


def existing_outputs(night: NightDir) -> list[Path]:
    """Output directories of a night: everything in the night directory except raw data and hidden entries.

    Raw data is ``raw/`` and the entries named like its generations (``raw_old``, ``raw_old2``:
    :func:`mascara.selection.is_raw_entry`); hidden entries are the lifecycle's own (the lock file, erase
    bins). Neither is ever an output.
    """
    return sorted(p for p in night.path.iterdir() if is_output_entry(p.name))


def move_outputs_aside(night: NightDir, erase: bool = False) -> list[tuple[str, str | None]]:
    """Rename every output of a night to ``<name>_old`` (replacing an older ``_old``), or erase it.

    ``raw/`` is never touched.  Returns ``(source, destination or None)`` per move.
    """
    moves: list[tuple[str, str | None]] = []
    for p in existing_outputs(night):
        if p.name.endswith("_old"):
            if erase:
                _remove(p)
                moves.append((str(p), None))
            continue
        if erase:
            _remove(p)
            moves.append((str(p), None))
        else:
            dst = p.with_name(p.name + "_old")
            if dst.exists():
                _remove(dst)
            os.replace(p, dst)
            moves.append((str(p), str(dst)))
    return moves


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


# --------------------------------------------------------------------------- sequential driver


#: Seconds :meth:`SplitterProcess.split` waits for the next outcome before it stops the process: a full
#: batch takes a fraction of a second (0.43 s at most on 6,500 stars per frame, ``docs/performance.md``), the
#: process's start a second or two.
SPLIT_SECONDS = 30.0


class SplitterProcess:
    """The split by star of one camera-night in a process of its own, as the original SaveItAll does.

    It keeps the light curves of the night's diagnostic stars
    (:func:`mascara.diagnostics.diagnostic_stars`). The library drivers hand it
    batch files with :meth:`put` and go on; the Prefect flow's split task waits
    for the outcome of its files with :meth:`split`. Either way the split's CPU
    is not spent under the reducing process's GIL, beside its batch threads.

    Parameters
    ----------
    workdir : the night's ``work/`` (the :class:`StarSplitter` store).
    diagnostic_ids : the stars whose light curves it keeps.
    report : bool
        Keep a queue of outcomes, for :meth:`split`.
    """

    def __init__(self, workdir: str | os.PathLike[str], diagnostic_ids: Iterable[str] = (),
                 report: bool = False) -> None:
        mpctx = mp.get_context("spawn")
        self.workdir = os.fspath(workdir)
        self.queue = mpctx.Queue()
        self.results = mpctx.Queue() if report else None
        self.proc = mpctx.Process(
            target=run_splitter_process,
            args=(self.queue, self.workdir, list(diagnostic_ids), self.results, os.getpid()),
            daemon=True,
        )
        self._calls = 0
        self.proc.start()

    @classmethod
    def for_night(cls, plan: CameraNightPlan, ctx: NightContext, report: bool = False) -> SplitterProcess:
        """The splitter of a prepared camera-night, keeping its diagnostic stars."""
        return cls(plan.workdir, diagnostic_stars(plan, ctx), report)

    def put(self, path: str | os.PathLike[str], sha256: str | None = None) -> None:
        """Queue one batch file (with its sha256 when known: the splitter need not hash it again)."""
        self.queue.put(os.fspath(path) if sha256 is None else (os.fspath(path), sha256))

    def split(self, items: Sequence[tuple[str, str | None]], timeout: float | None = None,
              poll: float = 1.0) -> list[tuple[str, str]]:
        """Split ``(path, sha256)`` items and wait for them: ``(path, "added" | "skipped" | "error: ...")`` each.

        Every item gets an outcome, in the order given, and the call returns:
        a splitter process that died (killed, out of memory, a split store it
        could not open) leaves the items it did not report as errors; one that
        reports nothing for ``timeout`` seconds (default :data:`SPLIT_SECONDS`;
        a stopped process, a hung file system) is killed and leaves them as
        errors too, so a hang costs one timeout, not one per item. The combine
        splits every batch the store lacks. Outcomes of an earlier call that
        stopped waiting are not taken for this call's.
        """
        from queue import Empty

        if self.results is None:
            raise ValueError("this splitter keeps no outcomes (report=False)")
        self._calls += 1
        tag = self._calls  # an outcome of an earlier call that stopped waiting (a retried task) is not this one's
        paths = [os.fspath(p) for p, _ in items]
        for path, sha in items:
            self.queue.put((path, sha, tag))
        got: dict[str, str] = {}
        left = set(paths)
        wait = SPLIT_SECONDS if timeout is None else timeout
        deadline = time.monotonic() + wait
        why = None
        while left and why is None:
            try:
                path, status, *its = self.results.get(timeout=poll)
            except Empty:
                if not self.proc.is_alive():
                    why = f"the splitter process ended (exit code {self.proc.exitcode})"
                elif time.monotonic() > deadline:
                    self._kill()
                    why = "the splitter process did not answer in time; stopped"
                continue
            if status.startswith("fatal: "):  # the process could not start splitting, and has ended
                why = f"the splitter process ended: {status[len('fatal: '):]}"
            elif its == [tag] and path in left:
                got[path] = status
                left.discard(path)
                deadline = time.monotonic() + wait  # it is working: the next one gets as long
        return [(p, got[p] if p in got else f"error: {why}") for p in paths]

    def alive(self) -> bool:
        return self.proc.is_alive()

    def stop(self, clean: bool | None = None, timeout: float | None = None) -> None:
        """End the splitter: let it finish its queue after a clean loop; stop it at once after an error.

        ``clean`` defaults to "no exception is being handled". After an error
        (a run that lost its lease, an interruption) nothing more may be
        written under the night's ``work/``: the splitter is terminated,
        which its atomic writes make safe (a batch it did not finish is
        split again by the combine, which re-adds every batch its registry
        lacks). A process still there ``timeout`` seconds after a clean end
        was asked for (default: wait), or 5 s after SIGTERM, is killed.
        """
        if clean is None:
            clean = sys.exc_info()[0] is None
        if clean and self.proc.is_alive():
            self.queue.put(None)
            self.proc.join(timeout)
        else:
            self.proc.terminate()
            self.proc.join(5.0)
        if self.proc.is_alive():
            self._kill()

    def _kill(self) -> None:
        """SIGKILL, and a bounded wait: a process in an uninterruptible disk wait (a hung NFS server) dies only
        when the call returns, and nobody may wait for it meanwhile (a daemon: it goes with this process)."""
        self.proc.kill()
        self.proc.join(10.0)
        if self.proc.is_alive():
            log.warning("the splitter process %d of %s did not end on SIGKILL (a hung file system?); "
                        "leaving it", self.proc.pid, self.workdir)


class _Done:
    """A finished result with the face of a future (the serial path of :func:`reduce_camera_night`)."""

    def __init__(self, value) -> None:
        self.value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self.value


@dataclasses.dataclass
class NightResult:
    night_id: str
    batches: list[BatchOutcome]
    products: dict
    skipped: list[int]
    seconds: float

    @property
    def rejected(self) -> list[tuple[int, str, str]]:
        return [r for b in self.batches for r in b.rejected]


def _started_batch(plan: CameraNightPlan, ctx: NightContext, batch: int,
                   on_start: Callable[[int], None] | None,
                   on_error: Callable[[int, Exception], None] | None = None) -> BatchOutcome:
    """:func:`reduce_batch`, after ``on_start(batch)``; ``on_error(batch, exc)`` if it raises (same thread)."""
    if on_start is not None:
        on_start(batch)
    try:
        return reduce_batch(plan, ctx, batch)
    except Exception as exc:
        if on_error is not None:
            on_error(batch, exc)
        raise


def reduce_camera_night(
    night_dir: Path | str,
    settings: Settings | None = None,
    *,
    skip: Iterable[int] = (),
    batches: Iterable[int] | None = None,
    on_batch: Callable[[BatchOutcome], None] | None = None,
    on_batch_start: Callable[[int], None] | None = None,
    on_batch_error: Callable[[int, Exception], None] | None = None,
    on_frame_progress: Callable[[int, int], None] | None = None,
    on_prepared: Callable[[NightContext], None] | None = None,
    split_in_background: bool = True,
    combine: bool = True,
    require_calibration: bool = False,
    workers: int | None = None,
) -> NightResult:
    """Reduce one camera-night (the library driver), ``workers`` batches at a time.

    Parameters
    ----------
    skip : batch indices already done (their batch files are reused as they are).
    batches : restrict to these batch indices (default: all).
    on_batch : called with each finished :class:`BatchOutcome` (an orchestrator records it).
    on_batch_start : called with a batch's index just before it is reduced, in the thread that
        reduces it (an orchestrator marks it running); what it raises fails that batch.
    on_batch_error : called with a batch's index and the exception its reduction raised, in its
        thread, before the exception goes on (an orchestrator records the batch failed with it).
    on_prepared : called with the night context once the calibration and the
        camera solution are known (an orchestrator records the calibration state).
    split_in_background : run the split by star in a separate process beside the
        reduction, as the original SaveItAll does.
    combine : write the night files at the end.
    require_calibration : raise :class:`CalibrationRequired` rather than reduce without a master dark.
    workers : batches reduced at once, in threads (the kernels release the GIL); default
        ``$MASCARA_WORKERS`` or the number of cores. Batches are independent and their
        outcomes are handed to ``on_batch`` in batch order, so the result equals a serial run's.
    """
    t0 = time.perf_counter()
    plan = plan_camera_night(night_dir, settings)
    ctx = prepare_camera_night(plan, require_calibration=require_calibration)
    if on_prepared:
        on_prepared(ctx)
    skip = set(skip)
    todo = [b for b in (plan.batches if batches is None else batches) if b in plan.batches]
    splitter = SplitterProcess.for_night(plan, ctx) if split_in_background else None
    outcomes: list[BatchOutcome] = []
    done_frames = 0
    total_frames = sum(len(plan.batches[b]) for b in todo)
    nworkers = max(1, int(workers if workers is not None else os.environ.get("MASCARA_WORKERS", os.cpu_count() or 1)))
    pool = ThreadPoolExecutor(max_workers=nworkers, thread_name_prefix="batch") if nworkers > 1 else None
    pending: deque = deque()  # (batch, future or None), in batch order; at most nworkers running
    try:
        for i, b in enumerate(todo):
            if b in skip and plan.batch_path(b).exists():
                pending.append((b, None))
            elif pool is None:
                pending.append((b, _Done(_started_batch(plan, ctx, b, on_batch_start, on_batch_error))))
            else:
                pending.append((b, pool.submit(_started_batch, plan, ctx, b, on_batch_start, on_batch_error)))
            # hand over finished batches in order; keep at most nworkers batches in flight
            while pending and (i == len(todo) - 1 or pending[0][1] is None or pending[0][1].done()
                               or sum(f is not None and not f.done() for _, f in pending) >= nworkers):
                b0, fut = pending.popleft()
                if fut is None:
                    if splitter is not None:
                        splitter.put(plan.batch_path(b0))
                    done_frames += len(plan.batches[b0])
                    continue
                outcome = fut.result()
                outcomes.append(outcome)
                if on_batch:  # recorded first: a run that lost its lease stops here, before the split
                    on_batch(outcome)
                if splitter is not None:
                    splitter.put(outcome.path, outcome.sha256)
                done_frames += len(plan.batches[b0])
                if on_frame_progress:
                    on_frame_progress(done_frames, total_frames)
    finally:
        if pool is not None:
            for _, fut in pending:
                if fut is not None:
                    fut.cancel()
            pool.shutdown(wait=True)
        if splitter is not None:
            splitter.stop()
    products = {}
    if combine:
        paths = [plan.batch_path(b) for b in plan.batches if plan.batch_path(b).exists()]
        products = combine_camera_night(plan, ctx, paths)
    return NightResult(night_id=plan.night.night_id, batches=outcomes, products=products,
                       skipped=sorted(skip & set(todo)), seconds=time.perf_counter() - t0)


def _restricted(plan: CameraNightPlan, batches: Iterable[int]) -> CameraNightPlan:
    """The plan with only ``batches`` (and their frames). Only live plans are restricted (see :meth:`raw_filenames`)."""
    if not plan.live:
        raise ValueError("only the plan of a live night is restricted to some batches")
    keep = {b: plan.batches[b] for b in sorted(batches)}
    frames = [f for fr in keep.values() for f in fr]
    return dataclasses.replace(plan, batches=keep, frames=frames)


class LiveNight:
    """A camera-night being observed, reduced step by step (issue 14; :mod:`mascara.live`).

    Each :meth:`step` looks at ``raw/`` once and returns the batches that
    became ready (complete, :func:`mascara.live.ready_batches`) and are not
    done; the caller reduces them with :func:`reduce_batch` (``self.plan``,
    :meth:`context`), in any order or in parallel, and calls :meth:`done` for
    each. :attr:`over` tells when the night has ended (``until_jd``, or
    ``idle_timeout`` seconds without a new frame) and nothing is left to
    reduce. The library driver (:func:`reduce_camera_night_live`) and the
    Prefect flow (``flows/live.py``) both drive it.

    Parameters
    ----------
    grace : float
        Seconds without a new frame after which the last, incomplete batch
        is reduced as it is (frames can be missing).
    now_jd : callable
        Current JD (UTC), replaceable in tests.
    """

    def __init__(self, night_dir: Path | str | NightDir, settings: Settings | None = None, *,
                 grace: float = 300.0, idle_timeout: float | None = None, until_jd: float | None = None,
                 settle: float = 1.0, now_jd: Callable[[], float] | None = None):
        from mascara.live import RawWatch

        night = night_dir if isinstance(night_dir, NightDir) else parse_night_dir(night_dir)
        if night is None:
            raise ValueError(f"{night_dir}: not a night directory (<YYYYMMDD><SITE><CAM>)")
        self.night, self.settings = night, settings or Settings()
        self.grace, self.idle_timeout, self.until_jd = grace, idle_timeout, until_jd
        self.now_jd = now_jd or (lambda: 2440587.5 + time.time() / 86400.0)
        self.watch = RawWatch(night.raw, settle=settle)
        self.never_complete: list[Rejection] = []  # frame files that had not arrived whole when it ended
        self._late: set[str] = set()  # files complete at the end that had not settled yet
        self.plan = self._plan(set())
        self.finished: set[int] = set()
        self.reduced_with: dict[int, frozenset[int]] = {}  # the frames (lstseq) each done batch had
        self.ending = False  # the night is over: every batch is ready

    def _plan(self, names: set[str]) -> CameraNightPlan:
        """The live plan of the files complete so far; empty while ``raw/`` does not exist yet (a live
        run is started before the camera has made tonight's directory)."""
        if not self.night.raw.is_dir():
            return CameraNightPlan(night=self.night, settings=self.settings, frames=[], batches={}, calib=[],
                                   live=True)
        plan = plan_camera_night(self.night, self.settings, only=names, live=True)
        if self.never_complete:
            plan = dataclasses.replace(plan, rejected=plan.rejected + self.never_complete)
        return plan

    def _end_incomplete(self) -> set[str]:
        """At the night's end, the files still not complete go through the offline intake (once).

        One that reads as a whole frame arrived in the last ``settle``
        seconds: it joins the night. Any other is refused with the offline
        reason (``truncated file (700000 of 1532160 bytes)``) plus that it
        never completed, so the night records it rather than counting its
        slot as missing. Names nearly a frame's join the plan too, to be
        refused by name; calibration files still settling join as they are
        (the calibration's intake decides on them, as offline: a night that
        ended before its darks settled was reduced without them). Returns
        the names that joined.
        """
        if not self.night.raw.is_dir():  # the camera never made tonight's directory
            return set()
        # names nearly a frame's are refused by name, as offline (the watch follows exact frame names only)
        joined = {n for n in os.listdir(self.night.raw) if NEAR_FRAME_RE.match(n) and not FRAME_RE.match(n)}
        for name in sorted(self.watch.incomplete()):
            m = FRAME_RE.match(name)
            path = self.night.raw / name
            if not path.exists():
                continue
            if m is None:  # a calibration file: it joins, and the intake of the calibration decides (offline
                joined.add(name)  # uses it; a live night that ended before it settled reduced without its dark)
                continue
            try:
                read_frame(path)
            except BadFrame as exc:
                self.never_complete.append(Rejection(int(m["lstseq"]), name, regular_size(path),
                                                     f"{exc.reason} (not complete when the live run ended)"))
                continue
            joined.add(name)
        return joined

    def step(self) -> list[int]:
        """Look at ``raw/`` once; the batches newly ready and not done, in time order.

        A done batch whose frames changed since it was reduced (frames of it
        arrived late, after ``grace`` let it go with the frames it had) is
        ready again, by the same rule: it is reduced again with every frame,
        its batch file and split pieces replaced, rather than losing the late
        frames without a word.
        """
        from mascara.live import ready_batches

        names = self.watch.poll()
        idle = self.watch.idle_for()
        was_ending = self.ending
        self.ending = self.ending or (self.until_jd is not None and self.now_jd() >= self.until_jd) or (
            self.idle_timeout is not None and idle >= self.idle_timeout)
        if self.ending and not was_ending:
            self._late = self._end_incomplete()
        self.plan = self._plan(names | self._late)
        ready = ready_batches([f.lstseq for f in self.plan.frames], self.settings.batch_size,
                              idle=idle >= self.grace, night_over=self.ending)
        for b in sorted(ready & self.finished):
            now = self._frames_of(b)
            before = self.reduced_with.get(b, now)
            if now == before:
                continue
            gained = {f[0] for f in now} - {f[0] for f in before}
            lost = {f[1] for f in before} - {f[1] for f in now}
            if lost and not self.ending:  # a file being written again: reduced once it is whole
                continue
            if gained:
                log.warning("%s: batch %d gained %d frame(s) after it was reduced; reducing it again",
                            self.night.night_id, b, len(gained))
            else:
                changed = sorted({f[1] for f in before ^ now})
                log.warning("%s: batch %d: %d frame file(s) changed after it was reduced (%s); reducing it again",
                            self.night.night_id, b, len(changed), ", ".join(changed[:3]))
            self.finished.discard(b)
        return sorted(ready - self.finished)

    def ready_plan(self, batches: Iterable[int]) -> CameraNightPlan:
        """The current plan restricted to ``batches`` (what a run registers in the catalog)."""
        return _restricted(self.plan, batches)

    def context(self, require_calibration: bool = False) -> NightContext:
        """The night's calibration and camera solution (:func:`prepare_camera_night`; cached on disk)."""
        return prepare_camera_night(self.plan, require_calibration=require_calibration)

    def done(self, batch: int) -> None:
        """``batch`` is reduced (or was, by an earlier run) with the frames the plan gives it now."""
        b = int(batch)
        self.finished.add(b)
        self.reduced_with[b] = self._frames_of(b)

    def done_before(self, batch: int) -> bool:
        """Count ``batch``, reduced by an earlier run, as done, unless a frame file of it was written after
        its batch file (replaced while no run watched): then it is reduced again. Returns whether it counts."""
        path = self.plan.batch_path(batch)
        try:
            written = path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        newer = sorted(f.path.name for f in self.plan.batches.get(batch, ())
                       if self.watch.stamps.get(f.path.name, (0, 0))[1] > written)
        if newer:
            log.warning("%s: batch %d: %d frame file(s) written after its batch file (%s); reducing it again",
                        self.night.night_id, batch, len(newer), ", ".join(newer[:3]))
            return False
        self.done(batch)
        return True

    def _frames_of(self, batch: int) -> frozenset[tuple[int, str, int, int]]:
        """``(lstseq, name, size, st_mtime_ns)`` of each frame file of ``batch`` in the plan (the file as it
        was when it counted as complete)."""
        return frozenset((f.lstseq, f.path.name, *self.watch.stamps.get(f.path.name, (f.size or 0, 0)))
                         for f in self.plan.batches.get(batch, ()))

    @property
    def over(self) -> bool:
        """The night has ended and every batch of it is done."""
        return self.ending and set(self.plan.batches) <= self.finished


class LiveStopped(Exception):
    """A live reduction asked to stop (:func:`reduce_camera_night_live`'s ``stop``) before its night was over."""


def reduce_camera_night_live(
    night_dir: Path | str,
    settings: Settings | None = None,
    *,
    grace: float = 300.0,
    idle_timeout: float | None = None,
    until_jd: float | None = None,
    poll: float = 2.0,
    settle: float = 1.0,
    on_start: Callable[[CameraNightPlan], Iterable[int]] | None = None,
    on_ready: Callable[[CameraNightPlan], None] | None = None,
    on_batch: Callable[[BatchOutcome], None] | None = None,
    on_batch_start: Callable[[int], None] | None = None,
    on_batch_error: Callable[[int, Exception], None] | None = None,
    on_prepared: Callable[[NightContext], None] | None = None,
    split_in_background: bool = True,
    require_calibration: bool = False,
    now_jd: Callable[[], float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    stop: threading.Event | None = None,
) -> tuple[NightResult, CameraNightPlan]:
    """Reduce a camera-night while its frames arrive (issue 14); returns the result and the final plan.

    Drives a :class:`LiveNight`: every ``poll`` seconds, reduces the batches
    that became ready with the same :func:`reduce_batch` as an offline
    reduction, until the night is over; the night files are left to the
    caller (:func:`combine_camera_night` with the final plan).

    Parameters
    ----------
    on_start : called once, with the plan of the batches ready at that time,
        before anything is reduced; returns the batches already done (a
        restarted run: their files are reused as they are).
    on_ready : called with the plan of newly ready batches before they are reduced.
    on_batch, on_batch_start, on_batch_error, on_prepared : as for :func:`reduce_camera_night`.
    grace, idle_timeout, until_jd, now_jd : see :class:`LiveNight`.
    stop : once set, :class:`LiveStopped` is raised before the next batch or poll
        (a batch being reduced is finished first; the splitter is stopped as
        after any error). A process that must end while its live runs go on in
        threads stops them this way: a thread left running into interpreter
        shutdown can abort the process.
    """

    def check() -> None:
        if stop is not None and stop.is_set():
            raise LiveStopped(f"{night_dir}: the live reduction was asked to stop")

    t0 = time.perf_counter()
    live = LiveNight(night_dir, settings, grace=grace, idle_timeout=idle_timeout, until_jd=until_jd,
                     settle=settle, now_jd=now_jd)
    outcomes: list[BatchOutcome] = []
    ctx = None
    splitter = None
    skipped: list[int] = []
    try:
        while True:
            check()
            new = live.step()
            check()  # before a run is opened for what the step found
            if new and ctx is None:
                if on_start is not None:
                    ready = set(new)
                    skipped = sorted(b for b in set(on_start(live.ready_plan(ready))) & ready if live.done_before(b))
                ctx = live.context(require_calibration)
                if on_prepared:
                    on_prepared(ctx)
                if split_in_background:
                    splitter = SplitterProcess.for_night(live.plan, ctx)
                    for b in skipped:  # done by an earlier run: split again (idempotent)
                        if live.plan.batch_path(b).exists():
                            splitter.put(live.plan.batch_path(b))
                new = [b for b in new if b not in live.finished]
            if new and on_ready is not None:
                on_ready(live.ready_plan(new))
            for b in new:
                check()
                outcome = _started_batch(live.plan, ctx, b, on_batch_start, on_batch_error)
                outcomes.append(outcome)
                if on_batch:  # recorded first: a run that lost its lease stops here, before the split
                    on_batch(outcome)
                live.done(b)
                if splitter is not None:
                    splitter.put(outcome.path, outcome.sha256)
            if live.over:
                break
            if not new:
                if stop is None:
                    sleep(poll)
                else:
                    stop.wait(poll)
    finally:
        if splitter is not None:
            splitter.stop()
    return (NightResult(night_id=live.night.night_id, batches=outcomes, products={}, skipped=skipped,
                        seconds=time.perf_counter() - t0), live.plan)
