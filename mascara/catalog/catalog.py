"""The reduction catalog: what was reduced, when, how, with what, and what failed.

Every public method of :class:`Catalog` is one short transaction, retried when
the connection drops. Registrations are idempotent: ids are uuid5 of natural
keys and rows are inserted only when missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, delete, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlmodel import Session

from mascara import nightlock
from mascara.catalog import _engine
from mascara.catalog.models import (
    CALIBRATION_KINDS,
    FRAME_STATUSES,
    MOVE_ACTIONS,
    PRODUCT_KINDS,
    RUN_DECISIONS,
    RUN_PHASES,
    Batch,
    Camera,
    CameraNight,
    DirectoryMove,
    Frame,
    Lease,
    NightIntake,
    PackageVersion,
    Product,
    ReductionRun,
    Site,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds without a heartbeat after which a run's lease may be taken over.
DEFAULT_LEASE_SECONDS = 900.0
#: Attempts of one transaction when the connection fails.
RETRIES = 5
#: Keys of a run's fingerprint.
FINGERPRINT_FIELDS = ("code_version", "settings_hash", "catalogue_hash", "raw_inventory_hash")
FINAL_RUN_STATUSES = ("succeeded", "failed", "skipped")
#: Gap accounting of a batch (columns of ``batch``), in lstseq slots.
BATCH_FRAME_COUNTS = ("slots_expected", "frames_present", "frames_accepted", "frames_rejected", "frames_missing")

_NAMESPACE = uuid.UUID("6f1c2d0e-6a0b-5a55-9c1e-6d6173636172")  # fixed: ids must never change
_RETRYABLE = (OperationalError, InterfaceError, DisconnectionError)


#: Start of the error of a run that another run ended because its lease was taken over (a stalled or gone
#: process): the run did not record its own end.
ABANDONED = "abandoned:"


class CatalogError(Exception):
    """A catalog operation that cannot be done as asked."""


class CatalogLocked(OperationalError):
    """A SQLite catalog another process kept locked for the whole busy timeout; not retried."""

    def __init__(self, message: str) -> None:
        super().__init__(message, None, Exception(message))

    def __str__(self) -> str:
        return str(self.args[0])


class LeaseHeld(CatalogError):
    """Another live run holds the camera-night's lease."""

    def __init__(self, message: str, *, run_id: str, host: str, since: datetime, expires_at: datetime):
        super().__init__(message)
        self.run_id, self.host, self.since, self.expires_at = run_id, host, since, expires_at

    def __reduce__(self):  # type: ignore[no-untyped-def]  # to and from Dask workers: keyword-only fields
        return (_lease_held, (str(self), self.run_id, self.host, self.since, self.expires_at))


def _lease_held(message: str, run_id: str, host: str, since: datetime, expires_at: datetime) -> LeaseHeld:
    return LeaseHeld(message, run_id=run_id, host=host, since=since, expires_at=expires_at)


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


class LeaseLost(CatalogError):
    """This run's lease was released or taken over; it must stop writing."""


class CatalogConflict(CatalogError):
    """A row registered again with different values."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """A reduction run as the orchestrator needs it to decide resume or move aside.

    ``live`` is True when the run holds an unexpired lease.
    """

    run_id: str
    camera_night_id: str
    status: str
    fingerprint: dict[str, str]
    fingerprint_key: str
    host: str
    flow_run_id: str | None
    started_at: datetime
    heartbeat_at: datetime
    finished_at: datetime | None
    error: str | None
    live: bool
    phase: str = "registered"
    decision: str | None = None
    resumed_run_id: str | None = None
    final_raw_inventory_hash: str | None = None  # a live run's raw inventory when it ended

    def same_reduction_as(self, fp_key: str) -> bool:
        """Whether this run reduced what a plan of fingerprint key ``fp_key`` would: the same key, or, for a
        live run that ended, the same key with the raw inventory it ended with. A live run records that
        inventory as its combine starts: killed or failed after it, it did not end, and reduced nothing."""
        if fp_key == self.fingerprint_key:
            return True
        if not self.final_raw_inventory_hash or self.status != "succeeded":
            return False
        return fingerprint_key({**self.fingerprint, "raw_inventory_hash": self.final_raw_inventory_hash}) == fp_key


@dataclasses.dataclass(frozen=True)
class JournalEntry:
    """A filesystem action of the journal (a ``directory_move`` row)."""

    id: str
    camera_night_id: str
    run_id: str | None
    seq: int
    src: str
    dst: str | None
    action: str  # renamed | erased
    state: str  # intended | done
    reason: str | None


def night_dir_names(night_dir: str | Path) -> list[str]:
    """The names under which the catalog knows a night directory: its real path first, then the absolute path
    as given when a symbolic link makes them differ (rows registered before paths were resolved hold that)."""
    given = Path(night_dir).absolute()
    real = given.resolve()
    return [str(real)] if real == given else [str(real), str(given)]


def _camera_night_of(s: Session, names: list[str]) -> str | None:
    """The id of the camera-night registered under one of ``names``, preferring the first name.

    Failing that, a row registered under another path of the same directory (through a symbolic
    link, before paths were resolved): rows of the same directory name whose path resolves to it.
    """
    rows = dict(s.execute(select(CameraNight.night_dir, CameraNight.id).where(CameraNight.night_dir.in_(names))).all())
    found = next((rows[n] for n in names if n in rows), None)
    if found is not None:
        return found
    real = Path(names[0])
    alike = s.execute(select(CameraNight.night_dir, CameraNight.id)
                      .where(CameraNight.night_dir.like(f"%{real.name}"))).all()
    return next((cid for path, cid in alike if Path(path).name == real.name and Path(path).resolve() == real), None)


def make_id(kind: str, *parts: object) -> str:
    """Deterministic id (uuid5) of a row of ``kind`` with natural key ``parts``."""
    return str(uuid.uuid5(_NAMESPACE, "/".join([kind, *map(str, parts)])))


def fingerprint_key(fingerprint: Mapping[str, str] | str) -> str:
    """sha256 over the four fingerprint fields (a string is returned unchanged)."""
    if isinstance(fingerprint, str):
        return fingerprint
    missing = [k for k in FINGERPRINT_FIELDS if k not in fingerprint]
    if missing:
        raise ValueError(f"fingerprint lacks {missing}")
    blob = json.dumps({k: str(fingerprint[k]) for k in FINGERPRINT_FIELDS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: Any) -> Any:
    """Datetimes from views: SQLite gives UTC text, PostgreSQL aware datetimes."""
    if isinstance(value, str) and re.match(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d", value):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def _nights(night: str | Iterable[str] | None) -> list[str] | None:
    if night is None:
        return None
    if isinstance(night, str) and ".." in night:  # a range, as mascprocess takes it
        from mascara.selection import parse_nights

        return parse_nights(night)
    items = night.split("+") if isinstance(night, str) else list(night)
    return [str(n) for n in items]


def flow_run_run_id(camera_night_id: str, flow_run_id: str) -> str:
    """The id of the run a flow run opens on a camera-night (deterministic: its retries continue that run)."""
    return make_id("run", camera_night_id, flow_run_id)


def _pending_batch(run_id: str) -> dict[str, Any]:
    """A batch row's values once it is to be reduced again by ``run_id``: nothing of its last reduction."""
    return dict(status="pending", path=None, sha256=None, error=None, timings=None, started_at=None,
                finished_at=None, run_id=run_id, astro_rms=None, astro_nstars=None, flagged=None,
                **{k: None for k in BATCH_FRAME_COUNTS if k != "frames_present"})


class Catalog:
    """Access to one catalog database; create with :func:`connect`.

    Notes
    -----
    Each method is its own transaction. SQLite writers start with ``BEGIN
    IMMEDIATE`` and wait up to 60 s for the lock, so concurrent processes queue
    instead of failing; transactions are kept to a few statements for that
    reason. A dropped connection (``OperationalError``) is retried up to
    ``RETRIES`` times; every method is safe to repeat except that a repeated
    :meth:`batch_started` may count one try too many.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        self._ro_engine = engine.execution_options(mascara_readonly=True)
        self._runs: dict[str, tuple[str, str]] = {}  # run_id -> (camera_night_id, fingerprint_key)

    # -- plumbing -------------------------------------------------------
    def close(self) -> None:
        self.engine.dispose()

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent to another process (Dask, multiprocessing): reconnect there by URL.
        return (connect, (self.engine.url.render_as_string(hide_password=False),))

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def _tx(self, fn: Callable[[Session], T], readonly: bool = False) -> T:
        engine = self._ro_engine if readonly else self.engine
        for attempt in range(RETRIES):
            began = time.monotonic()
            try:
                with Session(engine, expire_on_commit=False) as s:
                    out = fn(s)
                    s.commit()
                    return out
            except _RETRYABLE as exc:
                if attempt == RETRIES - 1:
                    raise
                if (self.dialect == "sqlite" and "locked" in str(exc)
                        and time.monotonic() - began >= 0.9 * _engine.SQLITE_BUSY_TIMEOUT):
                    # SQLite itself waited the whole busy timeout: a writer has held the lock that long (a
                    # stopped or hung process); four more waits only made a caller, and its SIGTERM, wait
                    # five minutes in all (from an outside trial)
                    raise CatalogLocked(
                        f"the catalog {_engine.shown_url(self.url)} stayed locked by another process for "
                        f"{_engine.SQLITE_BUSY_TIMEOUT:.0f} s (one stopped, e.g. with Ctrl-Z, or hung in a write; "
                        f"`fuser {self.engine.url.database}` names it)") from exc
                log.warning("catalog transaction failed (%s); retry %d of %d",
                            exc.__class__.__name__, attempt + 1, RETRIES - 1)
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    def _insert(self, s: Session, model: type, rows: Sequence[dict[str, Any]],
                update_cols: Sequence[str] = ()) -> int:
        """Insert rows; on a primary-key clash do nothing, or update ``update_cols``."""
        if not rows:
            return 0
        table = model.__table__  # type: ignore[attr-defined]
        ins = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)
        keys = [c.name for c in table.primary_key.columns]
        if update_cols:
            stmt = ins.on_conflict_do_update(index_elements=keys,
                                             set_={c: getattr(ins.excluded, c) for c in update_cols})
        else:
            stmt = ins.on_conflict_do_nothing(index_elements=keys)
        if len(rows) == 1:
            return s.execute(stmt.values(rows[0])).rowcount
        s.execute(stmt, list(rows))
        return len(rows)

    def _run_key(self, s: Session, run_id: str) -> tuple[str, str]:
        key = self._runs.get(run_id)
        if key is None:
            run = s.get(ReductionRun, run_id)
            if run is None:
                raise CatalogError(f"unknown run {run_id}")
            key = self._runs[run_id] = (run.camera_night_id, run.fingerprint_key)
        return key

    # -- camera-nights -----------------------------------------------------
    def register_camera_night(self, site: str, camera: str, night: str, night_dir: str | Path) -> str:
        """Register a camera-night; returns its id (the same id every time).

        ``camera`` is a letter (``E``) or a camera id (``LPE``); ``night`` is
        ``YYYYMMDD``. The identity of a camera-night is its directory, with
        symbolic links resolved (a data directory reached through a link is
        the same data directory; rows registered before that, under the path
        as given, are still found): the same night and camera in another
        data directory is another camera-night.
        """
        night = str(night)
        if not re.fullmatch(r"\d{8}", night):
            raise ValueError(f"night must be YYYYMMDD, not {night!r}")
        cam_id = camera if camera.startswith(site) and len(camera) > len(site) else site + camera
        names = night_dir_names(night_dir)
        night_dir = names[0]
        row = {"id": make_id("camera_night", night_dir), "camera_id": cam_id, "night": night,
               "night_dir": night_dir, "datadir": str(Path(night_dir).parent), "registered_at": _now()}

        def fn(s: Session) -> str:
            # catalogs from before revision 0003 have other ids, and rows registered before directories were
            # resolved hold the path as given: look the directory up first, under each of its names
            known = _camera_night_of(s, names)
            if known is not None:
                return known
            self._insert(s, Site, [{"code": site}])
            self._insert(s, Camera, [{"id": cam_id, "site": site, "letter": cam_id[len(site):]}])
            self._insert(s, CameraNight, [row])
            return row["id"]

        return self._tx(fn)

    def find_camera_night(self, night_dir: str | Path) -> str | None:
        """The id of the camera-night of this directory, or None if the catalog never saw it.

        Found under any name of the directory (:func:`night_dir_names`): a night reduced through
        a symbolic link to the data directory is the night reduced through the real path.
        """
        names = night_dir_names(night_dir)
        return self._tx(lambda s: _camera_night_of(s, names), readonly=True)

    # -- runs and leases ---------------------------------------------------
    def start_run(self, camera_night_id: str, fingerprint: Mapping[str, str], settings: Mapping[str, Any],
                  versions: Mapping[str, str], host: str, flow_run_id: str | None = None,
                  lease_seconds: float = DEFAULT_LEASE_SECONDS, pid: int | None = None) -> str:
        """Start a run of a camera-night and take its lease; returns the run id.

        ``fingerprint`` holds ``code_version, settings_hash, catalogue_hash,
        raw_inventory_hash``; ``settings`` (full, JSON-able) and ``versions``
        (package -> version) are stored as provenance. With a ``flow_run_id``
        the run id is deterministic, so a retried flow run continues its run.

        Raises
        ------
        LeaseHeld
            Another run heartbeated within its lease. A lease past its expiry
            is taken over and its run marked failed.
        """
        fp_key = fingerprint_key(fingerprint)
        run_id = flow_run_run_id(camera_night_id, flow_run_id) if flow_run_id else str(uuid.uuid4())
        pid = os.getpid() if pid is None else pid

        def fn(s: Session) -> str:
            now = _now()
            if s.get(CameraNight, camera_night_id) is None:
                raise CatalogError(f"unknown camera-night {camera_night_id}")
            lease = s.execute(select(Lease).where(Lease.camera_night_id == camera_night_id)
                              .with_for_update()).scalar_one_or_none()
            if lease is not None and lease.run_id != run_id:
                if _aware(lease.expires_at) > now:
                    raise self._lease_held(s, lease)
                log.warning("taking over the expired lease of run %s (host %s, last heartbeat %s)",
                            lease.run_id, lease.host, lease.heartbeat_at)
                s.execute(update(ReductionRun).where(ReductionRun.id == lease.run_id,
                                                     ReductionRun.status == "running")
                          .values(status="failed", finished_at=now,
                                  error=f"{ABANDONED} no heartbeat since {lease.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC;"
                                        f" lease taken over by run {run_id}"))
                s.execute(update(Batch).where(Batch.run_id == lease.run_id, Batch.status == "running")
                          .values(status="failed", finished_at=now, error="run abandoned"))
            run = {"id": run_id, "camera_night_id": camera_night_id, "status": "running", "host": host,
                   "pid": pid, "flow_run_id": flow_run_id, "started_at": now, "heartbeat_at": now,
                   "finished_at": None, "error": None, "fingerprint_key": fp_key, "phase": "registered",
                   "settings": json.loads(json.dumps(dict(settings), default=list)),
                   **{k: str(fingerprint[k]) for k in FINGERPRINT_FIELDS}}
            self._insert(s, ReductionRun, [run],
                         update_cols=["status", "host", "pid", "heartbeat_at", "finished_at", "error"])
            self._insert(s, PackageVersion, [{"run_id": run_id, "package": k, "version": str(v)}
                                             for k, v in sorted(versions.items())])
            lease_row = {"camera_night_id": camera_night_id, "run_id": run_id, "host": host,
                         "acquired_at": now, "heartbeat_at": now,
                         "expires_at": now + timedelta(seconds=lease_seconds)}
            if lease is None:
                if not self._insert(s, Lease, [lease_row]):
                    # another run inserted it between our read and insert
                    other = s.execute(select(Lease).where(Lease.camera_night_id == camera_night_id)
                                      ).scalar_one()
                    raise self._lease_held(s, other)
            else:
                s.execute(update(Lease).where(Lease.camera_night_id == camera_night_id).values(**lease_row))
            return run_id

        out = self._tx(fn)
        self._runs[run_id] = (camera_night_id, fp_key)
        return out

    def live_lease(self, camera_night_id: str, run_id: str | None = None) -> LeaseHeld | None:
        """The refusal :meth:`start_run` would raise for a run other than ``run_id`` now, or None (read-only).

        For a caller that must know before it takes anything else (a flow takes the night directory's
        lock before its start task opens the run): an unexpired lease of another run.
        """
        def fn(s: Session) -> LeaseHeld | None:
            lease = s.execute(select(Lease).where(Lease.camera_night_id == camera_night_id)).scalar_one_or_none()
            if lease is None or lease.run_id == run_id or _aware(lease.expires_at) <= _now():
                return None
            return self._lease_held(s, lease)

        return self._tx(fn, readonly=True)

    def _lease_held(self, s: Session, lease: Lease) -> LeaseHeld:
        cn = s.get(CameraNight, lease.camera_night_id)
        what = f"{cn.camera_id} night {cn.night}" if cn else lease.camera_night_id
        run = s.get(ReductionRun, lease.run_id)
        here = run is not None and run.pid and lease.host == socket.gethostname()
        if here and pid_running(int(run.pid)):  # an expiry time would mislead: it is not waited for here
            after = (f"process {run.pid} on this host is running it; it ends by itself, or stop it (a killed "
                     "process is taken over at once)")
        else:
            after = f"the lease expires {_aware(lease.expires_at):%Y-%m-%d %H:%M:%S} UTC if that run died"
        msg = (f"{what} is being reduced by run {lease.run_id} on host {lease.host} since "
               f"{_aware(lease.acquired_at):%Y-%m-%d %H:%M:%S} UTC (last heartbeat "
               f"{_aware(lease.heartbeat_at):%H:%M:%S} UTC; {after})")
        return LeaseHeld(msg, run_id=lease.run_id, host=lease.host,
                         since=_aware(lease.acquired_at), expires_at=_aware(lease.expires_at))

    @staticmethod
    def _fence(s: Session, run_id: str) -> None:
        """Raise :class:`LeaseLost` unless ``run_id`` holds its camera-night's lease (the row stays locked).

        Every write a run makes about its own reduction goes through this
        check in the same transaction, so a run that lost its lease (stalled
        past its expiry while another run took over) cannot record batches,
        phases, decisions or products over the new holder's.
        """
        held = s.execute(select(Lease.run_id).where(Lease.run_id == run_id).with_for_update()).scalar_one_or_none()
        if held is None:
            row = s.execute(select(ReductionRun.status, ReductionRun.error).where(ReductionRun.id == run_id)
                            ).one_or_none()
            if row is not None and row.status != "running" and not (row.error or "").startswith(ABANDONED):
                # ended by itself or by an operator's signal, not by a run that took its lease over
                again = "" if row.status == "succeeded" else ", and the next run does it again"
                raise LeaseLost(f"run {run_id} has ended ({row.status}{': ' + row.error if row.error else ''}): "
                                f"what it finished after its end is not recorded{again}")
            raise LeaseLost(f"run {run_id} no longer holds the lease of its camera-night (it stalled past its "
                            f"lease and another run took over): it must stop writing")

    def heartbeat(self, run_id: str) -> None:
        """Extend the run's lease by its original length.

        Raises
        ------
        LeaseLost
            The lease was released or taken over by another run.
        """
        def fn(s: Session) -> None:
            now = _now()
            lease = s.execute(select(Lease).where(Lease.run_id == run_id).with_for_update()
                              ).scalar_one_or_none()
            if lease is None:
                raise LeaseLost(f"run {run_id} no longer holds a lease (finished or taken over)")
            length = _aware(lease.expires_at) - _aware(lease.heartbeat_at)
            lease.heartbeat_at, lease.expires_at = now, now + length
            s.execute(update(ReductionRun).where(ReductionRun.id == run_id).values(heartbeat_at=now))

        self._tx(fn)

    def running_runs_of(self, host: str, pid: int) -> list[str]:
        """Ids of the runs still ``running`` that the process ``pid`` on ``host`` started."""
        def fn(s: Session) -> list[str]:
            return list(s.execute(select(ReductionRun.id).where(
                ReductionRun.host == host, ReductionRun.pid == pid, ReductionRun.status == "running")
                .order_by(ReductionRun.started_at)).scalars())

        return self._tx(fn, readonly=True)

    def finish_run(self, run_id: str, status: str, error: str | None = None,
                   products: Iterable[Mapping[str, Any]] = ()) -> None:
        """End a run with ``succeeded``, ``failed`` or ``skipped`` and release its lease.

        ``products`` (dicts with ``kind path sha256 size`` and optionally
        ``nstars``) are recorded in the same transaction: a live product row
        always belongs to a finished run. Another live row at the same path
        (a file this run overwrote) is marked erased by this run. Batches the
        run left ``running`` are marked failed.
        """
        if status not in FINAL_RUN_STATUSES:
            raise ValueError(f"final run status must be one of {FINAL_RUN_STATUSES}, not {status!r}")
        products = [dict(p) for p in products]
        for p in products:
            if p["kind"] not in PRODUCT_KINDS:
                raise ValueError(f"product kind must be one of {PRODUCT_KINDS}, not {p['kind']!r}")

        def fn(s: Session) -> None:
            now = _now()
            run = s.get(ReductionRun, run_id)
            if run is None:
                raise CatalogError(f"unknown run {run_id}")
            if run.finished_at is not None and run.status == status:
                return  # a retried finish: already recorded
            holds = s.execute(select(Lease.run_id).where(Lease.run_id == run_id).with_for_update()
                              ).scalar_one_or_none() is not None
            if not holds:
                if status == "succeeded":
                    self._fence(s, run_id)  # raises: a run that lost its lease records no products
                if run.finished_at is not None:
                    return  # ended by the run that took its lease over ("abandoned ..."): keep that record
            run.status, run.finished_at, run.heartbeat_at, run.error = status, now, now, error
            if status == "succeeded":
                run.phase = "finished"
            for p in products:
                path = str(p["path"])
                s.execute(update(Product).where(Product.camera_night_id == run.camera_night_id,
                                                Product.path == path, Product.run_id != run_id,
                                                Product.erased_at.is_(None))
                          .values(erased_at=now, erased_by=run_id))
                self._insert(s, Product, [{
                    "id": make_id("product", run_id, p["kind"], path), "run_id": run_id,
                    "camera_night_id": run.camera_night_id, "kind": p["kind"], "path": path,
                    "sha256": p["sha256"], "size": int(p["size"]), "nstars": p.get("nstars"),
                    "created_at": now, "mtime_ns": p.get("mtime_ns"), "erased_at": None, "erased_by": None}],
                    update_cols=["sha256", "size", "nstars", "created_at", "mtime_ns", "erased_at", "erased_by"])
            s.execute(update(Batch).where(Batch.run_id == run_id, Batch.status == "running")
                      .values(status="failed", finished_at=now, error=f"run ended ({status}) during the batch"))
            s.execute(delete(Lease).where(Lease.run_id == run_id))

        try:
            self._tx(fn)
        except LeaseLost:  # the run is over all the same; a transient error keeps the lock for the retry
            nightlock.release(run_id)
            raise
        nightlock.release(run_id)  # the night directory's lock (taken by lifecycle.open_run) goes with the lease

    @staticmethod
    def _info(s: Session, run: ReductionRun) -> RunInfo:
        lease = s.get(Lease, run.camera_night_id)
        live = lease is not None and lease.run_id == run.id and _aware(lease.expires_at) > _now()
        return RunInfo(
            run_id=run.id, camera_night_id=run.camera_night_id, status=run.status,
            fingerprint={k: getattr(run, k) for k in FINGERPRINT_FIELDS},
            fingerprint_key=run.fingerprint_key, host=run.host, flow_run_id=run.flow_run_id,
            started_at=_aware(run.started_at), heartbeat_at=_aware(run.heartbeat_at),
            finished_at=_aware(run.finished_at), error=run.error, live=live,
            phase=run.phase, decision=run.decision, resumed_run_id=run.resumed_run_id,
            final_raw_inventory_hash=run.final_raw_inventory_hash)

    def last_run(self, camera_night_id: str, decided: bool = False, exclude: str | None = None) -> RunInfo | None:
        """The latest run of a camera-night, or None if it was never reduced.

        ``decided``: only runs that got as far as deciding what to do with the
        outputs (a run killed before that did nothing on disk). ``exclude``: a
        run id to leave out (the caller's own run).
        """
        def fn(s: Session) -> RunInfo | None:
            q = select(ReductionRun).where(ReductionRun.camera_night_id == camera_night_id)
            if decided:
                q = q.where(ReductionRun.decision.is_not(None))
            if exclude is not None:
                q = q.where(ReductionRun.id != exclude)
            run = s.execute(q.order_by(ReductionRun.started_at.desc(), ReductionRun.id.desc()).limit(1)
                            ).scalar_one_or_none()
            return None if run is None else self._info(s, run)

        return self._tx(fn, readonly=True)

    def holds_lease(self, run_id: str) -> bool:
        """Whether ``run_id`` holds its camera-night's lease now (read-only; expired or not)."""
        def fn(s: Session) -> bool:
            return s.execute(select(Lease.run_id).where(Lease.run_id == run_id)).scalar_one_or_none() is not None

        return self._tx(fn, readonly=True)

    def running_runs_of_flow_run(self, flow_run_id: str) -> list[str]:
        """Ids of the runs of one flow run (one per camera-night it reduces) still recorded ``running``."""
        def fn(s: Session) -> list[str]:
            q = select(ReductionRun.id).where(ReductionRun.flow_run_id == flow_run_id,
                                              ReductionRun.status == "running")
            return sorted(s.execute(q).scalars())

        return self._tx(fn, readonly=True)

    def run_info(self, run_id: str) -> RunInfo:
        """One run by id."""
        def fn(s: Session) -> RunInfo:
            run = s.get(ReductionRun, run_id)
            if run is None:
                raise CatalogError(f"unknown run {run_id}")
            return self._info(s, run)

        return self._tx(fn, readonly=True)

    def set_final_inventory(self, run_id: str, raw_inventory_hash: str) -> None:
        """Record the raw inventory a live run reduced, as it ends (:meth:`RunInfo.same_reduction_as`)."""
        def fn(s: Session) -> None:
            if s.get(ReductionRun, run_id) is None:
                raise CatalogError(f"unknown run {run_id}")
            self._fence(s, run_id)
            s.execute(update(ReductionRun).where(ReductionRun.id == run_id).values(
                final_raw_inventory_hash=str(raw_inventory_hash)))

        self._tx(fn)

    def set_phase(self, run_id: str, phase: str) -> None:
        """Record where a run is in its life (``reducing``, ``combining``...)."""
        if phase not in RUN_PHASES:
            raise ValueError(f"phase must be one of {RUN_PHASES}, not {phase!r}")

        def fn(s: Session) -> None:
            if s.get(ReductionRun, run_id) is None:
                raise CatalogError(f"unknown run {run_id}")
            self._fence(s, run_id)
            s.execute(update(ReductionRun).where(ReductionRun.id == run_id).values(phase=phase))

        self._tx(fn)

    # -- the journal of filesystem actions -------------------------------------
    def decide(self, run_id: str, decision: str, resumed_run_id: str | None,
               actions: Sequence[tuple[str, str | None, str, str | None]]) -> list[JournalEntry]:
        """Record a run's decision and the filesystem actions it implies, before any is done.

        ``actions`` are ``(src, dst, action, reason)`` in the order they must
        run (``action``: ``renamed`` or ``erased``, ``dst`` None when erased).
        They are journaled as ``intended``; :meth:`confirm_action` marks each
        done. A run decides once: called again (a retried task), it changes
        nothing and returns the actions journaled the first time.
        """
        if decision not in RUN_DECISIONS:
            raise ValueError(f"decision must be one of {RUN_DECISIONS}, not {decision!r}")
        for src, dst, action, _ in actions:
            if action not in MOVE_ACTIONS or (action == "erased") != (dst is None):
                raise ValueError(f"bad journal action {action!r} {src} -> {dst}")

        def fn(s: Session) -> list[JournalEntry]:
            run = s.execute(select(ReductionRun).where(ReductionRun.id == run_id).with_for_update()
                            ).scalar_one_or_none()
            if run is None:
                raise CatalogError(f"unknown run {run_id}")
            self._fence(s, run_id)
            if run.decision is None:
                now = _now()
                run.decision, run.resumed_run_id = decision, resumed_run_id
                run.phase = "moving"
                for i, (src, dst, action, reason) in enumerate(actions):
                    s.add(DirectoryMove(id=str(uuid.uuid4()), camera_night_id=run.camera_night_id, run_id=run_id,
                                        seq=i, src=str(src), dst=None if dst is None else str(dst), action=action,
                                        state="intended", reason=reason, intended_at=now, moved_at=None))
                s.flush()
            rows = s.execute(select(DirectoryMove).where(DirectoryMove.run_id == run_id)
                             .order_by(DirectoryMove.seq)).scalars()
            return [_entry(m) for m in rows]

        return self._tx(fn)

    def pending_actions(self, camera_night_id: str) -> list[JournalEntry]:
        """Journaled actions of a camera-night not yet confirmed, oldest first."""
        def fn(s: Session) -> list[JournalEntry]:
            rows = s.execute(select(DirectoryMove).where(DirectoryMove.camera_night_id == camera_night_id,
                                                         DirectoryMove.state == "intended")
                             .order_by(DirectoryMove.intended_at, DirectoryMove.run_id, DirectoryMove.seq)).scalars()
            return [_entry(m) for m in rows]

        return self._tx(fn, readonly=True)

    def confirm_action(self, move_id: str, note: str | None = None) -> None:
        """Mark a journaled action done and make the catalog follow it, in one transaction.

        A rename rewrites the paths of the camera-night's products and batch
        files under ``src``; an erase marks those products erased (by this
        action) and forgets those batch files.
        """
        def fn(s: Session) -> None:
            m = s.get(DirectoryMove, move_id)
            if m is None:
                raise CatalogError(f"unknown journal entry {move_id}")
            if m.state == "done":
                return
            m.state, m.moved_at = "done", _now()
            if note:
                m.reason = f"{m.reason}; {note}" if m.reason else note
            self._follow(s, m.camera_night_id, m.src, m.dst, m.id, m.moved_at)

        self._tx(fn)

    @staticmethod
    def _follow(s: Session, camera_night_id: str, src: str, dst: str | None, move_id: str, when: datetime) -> None:
        def under(path: str | None) -> bool:
            return path is not None and (path == src or path.startswith(src + "/"))

        for prod in s.execute(select(Product).where(Product.camera_night_id == camera_night_id)).scalars():
            if under(prod.path) and prod.erased_at is None:
                if dst is None:
                    prod.erased_at, prod.erased_by = when, move_id
                else:
                    prod.path = str(dst) + prod.path[len(src):]
        for b in s.execute(select(Batch).where(Batch.camera_night_id == camera_night_id,
                                               Batch.path.is_not(None))).scalars():
            if under(b.path):
                if dst is None:
                    b.path, b.sha256 = None, None
                else:
                    b.path = str(dst) + b.path[len(src):]

    def begin_reducing(self, run_id: str, batches: Iterable[Sequence[int]], fresh: bool,
                       grown: bool = False) -> None:
        """Register the run's batches and enter the ``reducing`` phase.

        ``fresh`` (a new, moved-aside or erased reduction): batch rows left
        under the same fingerprint by earlier runs are reset to ``pending``
        first, so nothing of an earlier reduction counts as done. This
        happens once per run: a retried call after the phase began only
        registers batches again (idempotent). ``grown``: see
        :meth:`register_batches`.

        Raises
        ------
        CatalogConflict
            A known batch with a different lstseq range or frame count (unless ``grown``).
        """
        batches = [tuple(int(v) for v in b) for b in batches]

        def fn(s: Session) -> None:
            run = s.execute(select(ReductionRun).where(ReductionRun.id == run_id).with_for_update()
                            ).scalar_one_or_none()
            if run is None:
                raise CatalogError(f"unknown run {run_id}")
            self._fence(s, run_id)
            if run.phase in ("registered", "moving"):
                if fresh:
                    s.execute(update(Batch).where(Batch.camera_night_id == run.camera_night_id,
                                                  Batch.fingerprint_key == run.fingerprint_key)
                              .values(tries=0, **_pending_batch(run_id)))
                run.phase = "reducing"
            self._register_batches(s, run.camera_night_id, run.fingerprint_key, run_id, batches, grown)

        self._tx(fn)

    def run_versions(self, run_id: str) -> dict[str, str]:
        """Package versions recorded for a run."""
        def fn(s: Session) -> dict[str, str]:
            rows = s.execute(select(PackageVersion.package, PackageVersion.version)
                             .where(PackageVersion.run_id == run_id)).all()
            return dict(rows)  # type: ignore[arg-type]

        return self._tx(fn, readonly=True)

    # -- batches -------------------------------------------------------------
    def register_batches(self, run_id: str, batches: Iterable[Sequence[int]], grown: bool = False) -> None:
        """Register ``(batch_index, lstseq_min, lstseq_max, frames_present)`` rows as pending.

        Batches already known under the run's fingerprint keep their status
        (a resumed run skips the succeeded ones).

        ``grown`` (a live run): a known batch whose frames changed since it was
        registered (frames of it arrived after it was reduced) is registered
        again as ``pending`` with its new range and count, so that it is
        reduced again instead of counting as done with the frames it had.

        Raises
        ------
        CatalogConflict
            A known batch with a different lstseq range or frame count (unless ``grown``).
        """
        batches = [tuple(int(v) for v in b) for b in batches]

        def fn(s: Session) -> None:
            cn_id, fp = self._run_key(s, run_id)
            if grown:  # it may reset batches a run recorded: only the lease holder may
                self._fence(s, run_id)
            self._register_batches(s, cn_id, fp, run_id, batches, grown)

        self._tx(fn)

    def _register_batches(self, s: Session, cn_id: str, fp: str, run_id: str, batches: list[tuple[int, ...]],
                          grown: bool = False) -> None:
        known = {b.batch_index: (b.lstseq_min, b.lstseq_max, b.frames_present) for b in s.execute(
            select(Batch).where(Batch.camera_night_id == cn_id, Batch.fingerprint_key == fp)).scalars()}
        rows = []
        for idx, lo, hi, n in batches:
            if idx in known:
                if known[idx] != (lo, hi, n) and grown:
                    log.warning("batch %d: registered again with lstseq %d-%d (%d frames; was %d-%d, %d frames)",
                                idx, lo, hi, n, *known[idx])
                    s.execute(update(Batch).where(Batch.id == make_id("batch", cn_id, fp, idx)).values(
                        lstseq_min=lo, lstseq_max=hi, frames_present=n, **_pending_batch(run_id)))
                    continue
                if known[idx] != (lo, hi, n):
                    raise CatalogConflict(f"batch {idx} was registered as lstseq {known[idx][0]}-"
                                          f"{known[idx][1]} ({known[idx][2]} frames), now {lo}-{hi} ({n})")
                continue
            rows.append({"id": make_id("batch", cn_id, fp, idx), "camera_night_id": cn_id,
                         "fingerprint_key": fp, "run_id": run_id, "batch_index": idx, "lstseq_min": lo,
                         "lstseq_max": hi, "frames_present": n, "status": "pending", "tries": 0})
        self._insert(s, Batch, rows)

    def _set_batch(self, run_id: str, batch_index: int, _frames: Iterable[Sequence[Any]] = (), **values: Any) -> None:
        def fn(s: Session) -> None:
            cn_id, fp = self._run_key(s, run_id)
            self._fence(s, run_id)
            bid = make_id("batch", cn_id, fp, int(batch_index))
            vals = {k: (v(Batch) if callable(v) else v) for k, v in values.items()}
            n = s.execute(update(Batch).where(Batch.id == bid).values(run_id=run_id, **vals)).rowcount
            if not n:
                raise CatalogError(f"batch {batch_index} of run {run_id} was never registered")
            self._insert_frames(s, self._frame_rows(cn_id, _frames))

        self._tx(fn)

    def batch_started(self, run_id: str, batch_index: int) -> None:
        """Mark a batch running and count one more try."""
        self._set_batch(run_id, batch_index, status="running", tries=lambda b: b.tries + 1,
                        started_at=_now(), finished_at=None, error=None)

    def batch_succeeded(self, run_id: str, batch_index: int, path: str | Path, sha256: str,
                        timings: Mapping[str, float] | None = None, astro_rms: float | None = None,
                        astro_nstars: int | None = None, flagged: bool = False,
                        frames: Mapping[str, int] | None = None,
                        frame_rows: Iterable[Sequence[Any]] = ()) -> None:
        """Record a finished batch: its temporary file, checksum, step timings (s), astrometry.

        ``astro_rms`` is the residual RMS in pixels; ``flagged`` means the
        astrometry kept the previous solution. ``frames`` holds the gap
        accounting: ``slots_expected``, ``frames_present``, ``frames_accepted``,
        ``frames_rejected``, ``frames_missing`` (unknown keys raise).
        ``frame_rows``: the batch's raw files as :meth:`record_frames` takes
        them, recorded in the same transaction: a batch that is not recorded
        (its run ended meanwhile) counts no frame as reduced.
        """
        counts = {k: int(v) for k, v in (frames or {}).items()}
        unknown = set(counts) - set(BATCH_FRAME_COUNTS)
        if unknown:
            raise ValueError(f"unknown frame counts {sorted(unknown)}; known: {BATCH_FRAME_COUNTS}")
        self._set_batch(run_id, batch_index, frame_rows, status="succeeded", finished_at=_now(), error=None,
                        path=str(path), sha256=sha256, timings=dict(timings or {}),
                        cpu_s=float(sum(float(v) for v in (timings or {}).values())),
                        astro_rms=None if astro_rms is None else float(astro_rms),
                        astro_nstars=None if astro_nstars is None else int(astro_nstars),
                        flagged=bool(flagged), **counts)

    def record_quality(self, run_id: str, batch_index: int, frames: Iterable[Sequence[Any]],
                       transparency: float | None, low_transparency: bool) -> int:
        """Record the sky quality of a reduced batch: per frame ``(lstseq, sky, transparency)``, and the batch's.

        Frames are the accepted science frames of the camera-night, found by
        lstseq (their rows exist: :meth:`record_frames` first). Returns the
        number of frame rows updated.

        Raises
        ------
        LeaseLost
            The run no longer holds its camera-night's lease.
        """
        def num(v: Any) -> float | None:
            return None if v is None or v != v else float(v)

        def fn(s: Session) -> int:
            cn_id, fp = self._run_key(s, run_id)
            self._fence(s, run_id)
            n = 0
            for lstseq, sky, tr in frames:
                n += s.execute(update(Frame).where(
                    Frame.camera_night_id == cn_id, Frame.lstseq == int(lstseq), Frame.status == "ok"
                ).values(sky=num(sky), transparency=num(tr))).rowcount
            bid = make_id("batch", cn_id, fp, int(batch_index))
            s.execute(update(Batch).where(Batch.id == bid).values(
                transparency=num(transparency), low_transparency=bool(low_transparency)))
            return n

        return self._tx(fn)

    def batch_failed(self, run_id: str, batch_index: int, error: str) -> None:
        """Record a failed batch with its error text (a traceback is fine)."""
        self._set_batch(run_id, batch_index, status="failed", finished_at=_now(), error=str(error))

    def batch_skipped(self, run_id: str, batch_index: int, reason: str | None = None) -> None:
        """Record a batch deliberately not reduced; ``reason`` goes to ``error``."""
        self._set_batch(run_id, batch_index, status="skipped", finished_at=_now(), error=reason)

    def done_batches(self, camera_night_id: str, fingerprint: Mapping[str, str] | str
                     ) -> dict[int, tuple[str, str]]:
        """``{batch_index: (path, sha256)}`` of succeeded batches under a fingerprint.

        The caller must still check that each file exists with that checksum.
        """
        fp = fingerprint_key(fingerprint)

        def fn(s: Session) -> dict[int, tuple[str, str]]:
            rows = s.execute(select(Batch.batch_index, Batch.path, Batch.sha256).where(
                Batch.camera_night_id == camera_night_id, Batch.fingerprint_key == fp,
                Batch.status == "succeeded")).all()
            return {i: (p, h) for i, p, h in rows}

        return self._tx(fn, readonly=True)

    # -- frames, products, moves -----------------------------------------------
    def record_frames(self, camera_night_id: str, frames: Iterable[Sequence[Any]]) -> int:
        """Record raw files as ``(lstseq, filename, size, status, reason)``; returns the count.

        ``status`` is ``ok`` or ``rejected``; ``lstseq`` may be None
        (calibration frames). Recording a file again updates its row. A
        batch's frames go with the batch (:meth:`batch_succeeded`), fenced by its run's lease.
        """
        rows = self._frame_rows(camera_night_id, frames)

        def fn(s: Session) -> int:
            self._insert_frames(s, rows)
            return len(rows)

        return self._tx(fn)

    @staticmethod
    def _frame_rows(camera_night_id: str, frames: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
        rows = []
        for lstseq, filename, size, status, reason in frames:
            if status not in FRAME_STATUSES:
                raise ValueError(f"frame status must be one of {FRAME_STATUSES}, not {status!r}")
            rows.append({"id": make_id("frame", camera_night_id, filename), "camera_night_id": camera_night_id,
                         "lstseq": None if lstseq is None else int(lstseq), "filename": str(filename),
                         "size": None if size is None else int(size), "status": status, "reason": reason})
        return rows

    def _insert_frames(self, s: Session, rows: list[dict[str, Any]]) -> None:
        for i in range(0, len(rows), 2000):
            self._insert(s, Frame, rows[i:i + 2000], update_cols=["lstseq", "size", "status", "reason"])

    def mark_gone_frames(self, camera_night_id: str, present: Iterable[str]) -> list[str]:
        """Frames of the camera-night whose file is not among ``present`` (the names now in ``raw/``) become ``gone``.

        Their rows stay, with the earlier status and reason kept in the new
        reason; a file that comes back is recorded again by the reduction
        that reads it. Returns the names marked.
        """
        keep = set(present)
        when = _now().strftime("%Y-%m-%d %H:%M UTC")

        def fn(s: Session) -> list[str]:
            rows = s.execute(select(Frame.id, Frame.filename, Frame.status, Frame.reason).where(
                Frame.camera_night_id == camera_night_id, Frame.status != "gone")).all()
            gone = [(fid, name, status, reason) for fid, name, status, reason in rows if name not in keep]
            for fid, _name, status, reason in gone:
                was = status + (f": {reason}" if reason else "")
                s.execute(update(Frame).where(Frame.id == fid).values(
                    status="gone", reason=f"not in raw/ at the intake of {when} (was {was})"))
            return sorted(name for _fid, name, _status, _reason in gone)

        return self._tx(fn)

    def record_intake(self, camera_night_id: str, run_id: str | None, frames_present: int,
                      slots_expected: int, frames_missing: int, missing_ranges: Sequence[Sequence[int]] = (),
                      lstseq_first: int | None = None, lstseq_last: int | None = None,
                      empty_reason: str | None = None) -> None:
        """Record what the intake found in a camera-night's ``raw/`` (replaces the previous record).

        The calibration columns are reset; :meth:`record_calibration` fills them.
        """
        row = {"camera_night_id": camera_night_id, "run_id": run_id, "recorded_at": _now(),
               "frames_present": int(frames_present), "slots_expected": int(slots_expected),
               "frames_missing": int(frames_missing),
               "missing_ranges": [[int(a), int(b)] for a, b in missing_ranges],
               "lstseq_first": lstseq_first, "lstseq_last": lstseq_last, "empty_reason": empty_reason,
               "calibration": None, "calibration_files": None, "calibration_note": None}

        def fn(s: Session) -> None:
            self._insert(s, NightIntake, [row], update_cols=[k for k in row if k != "camera_night_id"])

        self._tx(fn)

    def record_calibration(self, camera_night_id: str, kind: str, files: Sequence[str], note: str,
                           frames: Iterable[Sequence[Any]] = ()) -> None:
        """Record the master calibration of a camera-night (``dark``, ``bias`` or ``none``) and why.

        ``frames`` are rows for :meth:`record_frames` of the calibration files
        (lstseq None): used, unused and rejected ones with their reasons.
        """
        if kind not in CALIBRATION_KINDS:
            raise ValueError(f"calibration must be one of {CALIBRATION_KINDS}, not {kind!r}")
        self.record_frames(camera_night_id, frames)

        def fn(s: Session) -> None:
            n = s.execute(update(NightIntake).where(NightIntake.camera_night_id == camera_night_id).values(
                calibration=kind, calibration_files=list(files), calibration_note=note)).rowcount
            if not n:
                raise CatalogError(f"camera-night {camera_night_id} has no intake record")

        self._tx(fn)

    def record_product(self, run_id: str, kind: str, path: str | Path, sha256: str, size: int,
                       nstars: int | None = None, mtime_ns: int | None = None) -> str:
        """Record one file written by a run; returns the product id.

        ``mtime_ns``: the file's ``st_mtime_ns`` (default: read from the file if it exists).
        The reduction records its products with :meth:`finish_run` instead, in
        the transaction that ends the run.
        """
        if mtime_ns is None and Path(path).is_file():
            mtime_ns = os.stat(path).st_mtime_ns
        if kind not in PRODUCT_KINDS:
            raise ValueError(f"product kind must be one of {PRODUCT_KINDS}, not {kind!r}")

        def fn(s: Session) -> str:
            cn_id, _ = self._run_key(s, run_id)
            pid = make_id("product", run_id, kind, path)
            self._insert(s, Product, [{"id": pid, "run_id": run_id, "camera_night_id": cn_id, "kind": kind,
                                       "path": str(path), "sha256": sha256, "size": int(size),
                                       "nstars": nstars, "created_at": _now(), "mtime_ns": mtime_ns}],
                         update_cols=["sha256", "size", "nstars", "created_at", "mtime_ns"])
            return pid

        return self._tx(fn)

    def record_move(self, camera_night_id: str, run_id: str | None, src: str | Path, dst: str | Path | None,
                    action: str, reason: str | None = None) -> str:
        """Record an action already done: ``src`` ``renamed`` to ``dst`` or ``erased`` (dst None).

        The reduction journals its own moves (:meth:`decide`, :meth:`confirm_action`);
        this records one after the fact, e.g. an output directory found
        missing. Products and batch files under ``src`` follow as in
        :meth:`confirm_action`.
        """
        if action not in MOVE_ACTIONS:
            raise ValueError(f"action must be one of {MOVE_ACTIONS}, not {action!r}")
        if (action == "erased") != (dst is None):
            raise ValueError("dst must be None exactly when the directory was erased")
        src = str(src).rstrip("/")
        now = _now()
        row = DirectoryMove(id=str(uuid.uuid4()), camera_night_id=camera_night_id, run_id=run_id, seq=0, src=src,
                            dst=None if dst is None else str(dst), action=action, state="done", reason=reason,
                            intended_at=now, moved_at=now)

        def fn(s: Session) -> str:
            s.add(row)
            s.flush()
            self._follow(s, camera_night_id, src, row.dst, row.id, now)
            return row.id

        return self._tx(fn)

    def live_products(self, camera_night_id: str | None = None) -> list[dict[str, Any]]:
        """Product rows whose file should exist (``erased_at`` is NULL)."""
        def fn(s: Session) -> list[dict[str, Any]]:
            q = select(Product).where(Product.erased_at.is_(None))
            if camera_night_id is not None:
                q = q.where(Product.camera_night_id == camera_night_id)
            return [p.model_dump() for p in s.execute(q).scalars()]

        return self._tx(fn, readonly=True)

    # -- views -----------------------------------------------------------------
    def _view(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        def fn(s: Session) -> list[dict[str, Any]]:
            result = s.execute(text(sql), params)
            return [{k: _aware(v) for k, v in row.items()} for row in result.mappings()]

        return self._tx(fn, readonly=True)

    def season(self, night: str | Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rows of the ``season`` view (monthly totals per site and camera); ``night`` selects months.

        With ``night`` (nights or a range, as for :meth:`night_status`), only
        the months those nights fall in are returned.
        """
        rows = self._view("SELECT * FROM season ORDER BY month, site, camera", {})
        nights = _nights(night)
        if nights is not None:
            months = {n[:6] for n in nights}
            rows = [r for r in rows if r["month"] in months]
        for r in rows:  # SUM gives Decimal on PostgreSQL, int/float on SQLite
            for k, v in r.items():
                if k not in ("site", "camera", "month") and v is not None:
                    r[k] = float(v) if k == "cpu_seconds" else int(v)
        return rows

    def night_status(self, night: str | Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rows of the ``night_status`` view, optionally for nights ``YYYYMMDD[+...]``."""
        where, params = _where(night, None)
        rows = self._view(f"SELECT * FROM night_status {where} ORDER BY night, camera", params)
        for r in rows:  # JSON columns of a view: SQLite gives text, PostgreSQL parsed values
            if isinstance(r.get("missing_ranges"), str):
                r["missing_ranges"] = json.loads(r["missing_ranges"])
        return rows

    def rejected_frames(self, night: str | Iterable[str] | None = None,
                        night_dir: str | Path | None = None) -> list[dict[str, Any]]:
        """Raw files refused by the intake or the reduction, with why: ``night camera night_dir filename lstseq
        reason``, by night, camera and file name; optionally for some nights or one night directory."""
        nights = _nights(night)

        def fn(s: Session) -> list[dict[str, Any]]:
            q = (select(CameraNight.night, CameraNight.camera_id.label("camera"), CameraNight.night_dir,
                        Frame.filename, Frame.lstseq, Frame.reason)
                 .join(CameraNight, CameraNight.id == Frame.camera_night_id)
                 .where(Frame.status == "rejected"))
            if nights is not None:
                q = q.where(CameraNight.night.in_(nights))
            if night_dir is not None:
                q = q.where(CameraNight.night_dir.in_(night_dir_names(night_dir)))
            q = q.order_by(CameraNight.night, CameraNight.camera_id, Frame.filename)
            return [dict(r._mapping) for r in s.execute(q)]

        return self._tx(fn, readonly=True)

    def failed_batches(self, night: str | Iterable[str] | None = None,
                       since_days: float | None = None) -> list[dict[str, Any]]:
        """Rows of the ``failed_batches`` view, optionally for some nights or the last days."""
        where, params = _where(night, since_days)
        return self._view(f"SELECT * FROM failed_batches {where} ORDER BY night, camera, batch_index", params)

    def failed_runs(self, night: str | Iterable[str] | None = None,
                    since_days: float | None = None) -> list[dict[str, Any]]:
        """Rows of the ``failed_runs`` view (every failed run and why), optionally filtered."""
        where, params = _where(night, since_days)
        return self._view(f"SELECT * FROM failed_runs {where} ORDER BY failed_at, night, camera", params)


def _where(night: str | Iterable[str] | None, since_days: float | None) -> tuple[str, dict[str, Any]]:
    clauses, params = [], {}
    nights = _nights(night)
    if nights is not None:
        clauses.append("night IN (" + ", ".join(f":n{i}" for i in range(len(nights))) + ")")
        params.update({f"n{i}": n for i, n in enumerate(nights)})
    if since_days is not None:
        clauses.append("age_days <= :days")
        params["days"] = float(since_days)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def _entry(m: DirectoryMove) -> JournalEntry:
    return JournalEntry(id=m.id, camera_night_id=m.camera_night_id, run_id=m.run_id, seq=m.seq, src=m.src,
                        dst=m.dst, action=m.action, state=m.state, reason=m.reason)


def connect(url: str | None = None, datadir: str | Path | None = None) -> Catalog:
    """Open the catalog, creating or upgrading its schema on first use.

    Parameters
    ----------
    url
        SQLAlchemy URL, e.g. ``postgresql+psycopg://user@host/db``. Default:
        ``$MASCARA_DB_URL``, else ``sqlite:///<datadir>/catalog.sqlite``.
    datadir
        Data directory holding the embedded SQLite catalog (default: cwd).
    """
    engine = _engine.make_engine(_engine.resolve_url(url, datadir))
    _engine.ensure_schema(engine)
    return Catalog(engine)
