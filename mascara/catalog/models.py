"""Tables of the reduction catalog (SQLModel).

Timestamps are timezone-aware UTC datetimes (PostgreSQL ``timestamptz``;
SQLite stores UTC text). Ids are 36-character UUID strings; rows that can
be registered twice (camera-nights, batches, frames, products, moves) get a
uuid5 of their natural key, so a re-registration after a crash finds the same
row. Status words are a fixed vocabulary enforced by CHECK constraints.

Changing a model needs a new Alembic revision in ``migrations/versions``; the
test ``tests/catalog/test_migrations.py`` fails until the two agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, UniqueConstraint
from sqlmodel import Field, SQLModel

#: Status of runs and batches.
STATUSES: tuple[str, ...] = ("pending", "running", "succeeded", "failed", "skipped")
#: Status of raw frames.
FRAME_STATUSES: tuple[str, ...] = ("ok", "rejected", "gone")
#: Kinds of products.
PRODUCT_KINDS: tuple[str, ...] = ("fLC", "sLC", "binned", "diagnostics", "solution")
#: What happened to an old output directory.
MOVE_ACTIONS: tuple[str, ...] = ("renamed", "erased")
#: A journaled filesystem action: committed before acting, confirmed after.
MOVE_STATES: tuple[str, ...] = ("intended", "done")
#: Where a run is in its life (docs/lifecycle.md); kept when the run fails, to say where it stopped.
RUN_PHASES: tuple[str, ...] = ("registered", "moving", "reducing", "combining", "finished")
#: What a run decided to do with the outputs it found.
RUN_DECISIONS: tuple[str, ...] = ("new", "resume", "move", "erase")
#: Master calibration a night was reduced with.
CALIBRATION_KINDS: tuple[str, ...] = ("dark", "bias", "none")


def _in(column: str, words: tuple[str, ...], name: str) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({', '.join(repr(w) for w in words)})", name=name)


class Site(SQLModel, table=True):
    """A station, e.g. ``LP`` (La Palma) or ``LS`` (La Silla)."""

    __tablename__ = "site"
    code: str = Field(primary_key=True, max_length=8)


class Camera(SQLModel, table=True):
    """A camera of a station: ``id`` is site + letter, e.g. ``LPE``."""

    __tablename__ = "camera"
    id: str = Field(primary_key=True, max_length=16)
    site: str = Field(foreign_key="site.code", index=True, max_length=8)
    letter: str = Field(max_length=8)


class CameraNight(SQLModel, table=True):
    """One camera's night of raw frames, ``<datadir>/<night><site><cam>/``.

    Its identity is the night directory (absolute path): the same night and
    camera in two data directories are two camera-nights, each with its own
    lease, runs and outputs.
    """

    __tablename__ = "camera_night"
    __table_args__ = (UniqueConstraint("night_dir", name="uq_camera_night_dir"),)
    id: str = Field(primary_key=True, max_length=36)
    camera_id: str = Field(foreign_key="camera.id", index=True, max_length=16)
    night: str = Field(index=True, max_length=8)  # YYYYMMDD, UTC date of the evening
    night_dir: str
    datadir: str = Field(index=True)  # the night directory's parent
    registered_at: datetime


class ReductionRun(SQLModel, table=True):
    """One attempt to reduce a camera-night, with what was reduced and how.

    The fingerprint (code version, settings, star catalogue, raw inventory)
    decides whether a later run may resume this one's batches.
    """

    __tablename__ = "reduction_run"
    __table_args__ = (
        _in("status", STATUSES, "ck_run_status"),
        _in("phase", RUN_PHASES, "ck_run_phase"),
        _in("decision", RUN_DECISIONS, "ck_run_decision"),
    )
    id: str = Field(primary_key=True, max_length=36)
    camera_night_id: str = Field(foreign_key="camera_night.id", index=True, max_length=36)
    status: str = Field(index=True, max_length=16)
    host: str
    pid: int | None = None
    flow_run_id: str | None = Field(default=None, index=True, max_length=64)
    started_at: datetime = Field(index=True)
    heartbeat_at: datetime
    finished_at: datetime | None = None
    error: str | None = None
    code_version: str = Field(max_length=64)
    settings_hash: str = Field(max_length=64)
    catalogue_hash: str = Field(max_length=64)
    raw_inventory_hash: str = Field(max_length=64)
    fingerprint_key: str = Field(index=True, max_length=64)
    settings: dict[str, Any] = Field(sa_type=JSON)
    phase: str = Field(default="registered", max_length=16)
    decision: str | None = Field(default=None, max_length=16)  # None until the run has decided
    resumed_run_id: str | None = Field(default=None, max_length=36)  # the run whose batches it continues
    # a live run (raw_inventory_hash 'live'): the inventory of raw/ when it ended, as an offline plan computes it
    final_raw_inventory_hash: str | None = Field(default=None, max_length=64)


class PackageVersion(SQLModel, table=True):
    """Provenance: the version of each package a run imported."""

    __tablename__ = "package_version"
    run_id: str = Field(foreign_key="reduction_run.id", primary_key=True, max_length=36)
    package: str = Field(primary_key=True, max_length=128)
    version: str = Field(max_length=128)


class Lease(SQLModel, table=True):
    """Who may write outputs of a camera-night right now.

    A lease whose ``expires_at`` has passed belongs to a crashed run and may be
    taken over.
    """

    __tablename__ = "lease"
    camera_night_id: str = Field(foreign_key="camera_night.id", primary_key=True, max_length=36)
    run_id: str = Field(foreign_key="reduction_run.id", index=True, max_length=36)
    host: str
    acquired_at: datetime
    heartbeat_at: datetime
    expires_at: datetime


class Batch(SQLModel, table=True):
    """A 50-frame batch (``lstseq // 50``) of a camera-night under one fingerprint.

    Runs with equal fingerprints share these rows: a resumed run continues
    where the interrupted one stopped. ``run_id`` is the run that last
    worked on the batch.
    """

    __tablename__ = "batch"
    __table_args__ = (
        UniqueConstraint("camera_night_id", "fingerprint_key", "batch_index", name="uq_batch"),
        _in("status", STATUSES, "ck_batch_status"),
    )
    id: str = Field(primary_key=True, max_length=36)
    camera_night_id: str = Field(foreign_key="camera_night.id", index=True, max_length=36)
    fingerprint_key: str = Field(max_length=64)
    run_id: str = Field(foreign_key="reduction_run.id", index=True, max_length=36)
    batch_index: int  # lstseq // 50
    lstseq_min: int
    lstseq_max: int
    # Frame counts are lstseq slots (a duplicate file is not a second frame).
    frames_present: int  # slots with a frame file when the batch was planned
    slots_expected: int | None = None  # batch start (or the night's first frame) to end (or its last frame)
    frames_accepted: int | None = None  # passed the intake: in the batch file; None until reduced
    frames_rejected: int | None = None  # refused by the intake (reasons in ``frame``)
    frames_missing: int | None = None  # slots_expected - frames_present: no file at all
    status: str = Field(index=True, max_length=16)
    tries: int = 0
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    timings: dict[str, Any] | None = Field(default=None, sa_type=JSON)  # seconds per step
    cpu_s: float | None = None  # CPU seconds of the batch: the sum of its timings
    astro_rms: float | None = None  # px
    astro_nstars: int | None = None
    flagged: bool | None = None  # astrometry kept the previous solution
    path: str | None = None  # temporary batch file
    sha256: str | None = Field(default=None, max_length=64)
    transparency: float | None = None  # median of its frames' (mascara.diagnostics.frame_quality)
    low_transparency: bool | None = None  # below mascara.diagnostics.LOW_TRANSPARENCY: clouds


class Frame(SQLModel, table=True):
    """A raw file of a camera-night and whether the reduction could use it."""

    __tablename__ = "frame"
    __table_args__ = (
        UniqueConstraint("camera_night_id", "filename", name="uq_frame"),
        _in("status", FRAME_STATUSES, "ck_frame_status"),
    )
    id: str = Field(primary_key=True, max_length=36)
    camera_night_id: str = Field(foreign_key="camera_night.id", index=True, max_length=36)
    lstseq: int | None = Field(default=None, index=True)
    filename: str
    size: int | None = Field(default=None, sa_type=BigInteger)  # bytes
    status: str = Field(max_length=16)
    reason: str | None = None
    sky: float | None = None  # median sky of the frame's stars, ADU per pixel (accepted frames)
    transparency: float | None = None  # median measured / expected flux of bright stars; 1 = clear


class Product(SQLModel, table=True):
    """A file a run wrote: light curves, binned images, diagnostics, solutions.

    ``path`` is where the file is now: moving a directory aside rewrites it.
    Rows are written with the run's end (``succeeded``), in one transaction, so
    a live row (``erased_at IS NULL``) always describes a finished reduction.
    """

    __tablename__ = "product"
    __table_args__ = (_in("kind", PRODUCT_KINDS, "ck_product_kind"),)
    id: str = Field(primary_key=True, max_length=36)
    run_id: str = Field(foreign_key="reduction_run.id", index=True, max_length=36)
    camera_night_id: str = Field(foreign_key="camera_night.id", index=True, max_length=36)
    kind: str = Field(max_length=16)
    path: str = Field(index=True)
    sha256: str = Field(max_length=64)
    size: int = Field(sa_type=BigInteger)  # bytes (an fLC of a full night is over 2 GB)
    nstars: int | None = None
    created_at: datetime
    # st_mtime_ns of the file as its run left it (None: recorded before migration 0008, judged by size)
    mtime_ns: int | None = Field(default=None, sa_type=BigInteger)
    erased_at: datetime | None = None  # the file is gone: its directory erased, or overwritten by a later run
    erased_by: str | None = Field(default=None, max_length=36)  # the directory_move (or run) that erased it


class DirectoryMove(SQLModel, table=True):
    """An output directory renamed (to ``*_old``) or erased: the journal of filesystem actions.

    A row is written with ``state = 'intended'`` before the action and set to
    ``'done'`` after it, in the transaction that rewrites the paths of the
    products and batches under ``src`` (or marks the products erased). A run
    that finds an intended row finishes that action first (``seq`` orders the
    actions of one run).
    """

    __tablename__ = "directory_move"
    __table_args__ = (
        _in("action", MOVE_ACTIONS, "ck_move_action"),
        _in("state", MOVE_STATES, "ck_move_state"),
    )
    id: str = Field(primary_key=True, max_length=36)
    camera_night_id: str = Field(foreign_key="camera_night.id", index=True, max_length=36)
    run_id: str | None = Field(default=None, foreign_key="reduction_run.id", index=True, max_length=36)
    seq: int = 0
    src: str
    dst: str | None = None  # None when erased
    action: str = Field(max_length=16)
    state: str = Field(default="done", index=True, max_length=16)
    reason: str | None = None
    intended_at: datetime
    moved_at: datetime | None = None  # when the action was confirmed


class NightIntake(SQLModel, table=True):
    """What the intake found in a camera-night's ``raw/`` at its latest run, and the calibration used.

    One row per camera-night, replaced by every run. A night without a frame
    file has ``frames_present = 0`` and an ``empty_reason`` (and no run).
    ``calibration`` is None until the master calibration was made.
    """

    __tablename__ = "night_intake"
    __table_args__ = (_in("calibration", CALIBRATION_KINDS, "ck_intake_calibration"),)
    camera_night_id: str = Field(foreign_key="camera_night.id", primary_key=True, max_length=36)
    run_id: str | None = Field(default=None, foreign_key="reduction_run.id", index=True, max_length=36)
    recorded_at: datetime
    frames_present: int  # lstseq slots with a frame file
    lstseq_first: int | None = None
    lstseq_last: int | None = None
    slots_expected: int  # lstseq_last - lstseq_first + 1
    frames_missing: int  # slots without any file
    missing_ranges: list[list[int]] = Field(default_factory=list, sa_type=JSON)  # inclusive [first, last]
    empty_reason: str | None = None
    calibration: str | None = Field(default=None, max_length=8)
    calibration_files: list[str] | None = Field(default=None, sa_type=JSON)  # combined into the master
    calibration_note: str | None = None  # what was used and why, e.g. "no calib_dark files; master bias of 5"


TABLES: tuple[type[SQLModel], ...] = (
    Site, Camera, CameraNight, ReductionRun, PackageVersion, Lease, Batch, Frame, Product, DirectoryMove,
    NightIntake,
)
