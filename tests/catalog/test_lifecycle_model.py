"""Model-based test of a camera-night reduction's life (issue 9, docs/lifecycle.md).

hypothesis drives sequences of reductions of a small simulated night in two
data directories sharing one catalog: plain re-runs, ``-o``, changed settings,
``--keep-old 2``, a crash at any named fault point (in-process: an exception no
handler catches, so nothing cleans up, as after ``kill -9``), a failing
filesystem call followed by a Prefect-style retry of the same run, an
operator's signal (SIGTERM, SIGINT, SIGHUP under ``mascprocess``' handling:
the run must end recorded as interrupted, its lease released). After every
step the invariants of ``lifecycle_checks`` hold and ``raw/`` is untouched;
every run that is not interrupted must succeed and give the night files of an
uninterrupted reduction; at the end a plain run of each directory succeeds.

The runs use the library driver in this process (the same lifecycle code as
the Prefect flow). ``MASCARA_LIFECYCLE_EXAMPLES`` raises the number of
examples; ``-m lifecycle_long`` runs a longer exploration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from sqlalchemy import create_engine, text

from lifecycle_checks import check_invariants, check_night_dir, same_night_files, tree_digest, tree_stat
from mascara import faults

NIGHT = "20260301"
NIGHT_ID = "20260301LPE"
# fewer stars than the defaults keep a run at about 2 s; the lifecycle does not care about photometry
SETTINGS = {"default": {"vmag_fast": 7.5, "vmag_slow": 8.0}, "changed": {"vmag_fast": 7.0, "vmag_slow": 8.0}}
FAULTS = [None] + [(p, "raise") for p in faults.POINTS] + [(p, "oserror") for p in ("after_intent", "mid_move")]
#: An operator's signal at a few points (every point in turn: test_a_signal_at_every_named_point...).
SIGNALS = [("after_begin", "sigterm"), ("mid_move", "sigint"), ("after_batch_file", "sighup")]
#: What a step draws: the crashes weigh three times as much, so that every point still crashes in a short run.
DRAWS = FAULTS * 3 + SIGNALS
#: Faults that fired during the test, as (point, action) -> count: the test checks that every point was reached.
FIRED: dict[tuple[str, str], int] = {}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A small night of 60 frames in two batches (simulated once per module)."""
    from mascara.simulate import SimConfig, simulate_night

    datadir = tmp_path_factory.mktemp("lifecycle-pristine")
    simulate_night(datadir, NIGHT, SimConfig(site="LP", camera="E", size="small", nframes=60, seed=3))
    return datadir / NIGHT_ID


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited: runs recorded with it are taken over at once."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def references(pristine, tmp_path_factory, dead_pid) -> dict[str, Path]:
    """Uninterrupted reductions of the night, one per settings variant."""
    from flows import _runs
    from mascara.settings import Settings
    from mascara.rawio import parse_night_dir

    out = {}
    for name, overrides in SETTINGS.items():
        datadir = tmp_path_factory.mktemp(f"lifecycle-ref-{name}")
        shutil.copytree(pristine, datadir / NIGHT_ID)
        url = f"sqlite:///{datadir / 'catalog.sqlite'}"
        _runs.drive_camera_night(url, parse_night_dir(datadir / NIGHT_ID), Settings.from_dict(overrides),
                                 pid=dead_pid, split_in_background=False)
        out[name] = datadir / NIGHT_ID
    return out


def _examples(default: int) -> int:
    return int(os.environ.get("MASCARA_LIFECYCLE_EXAMPLES", default))


def _machine(pristine: Path, references: dict[str, Path], dead_pid: int, root: Path, make_db):  # type: ignore[no-untyped-def]
    from flows import _runs, _signals
    from mascara.catalog import LeaseHeld
    from mascara.rawio import parse_night_dir
    from mascara.settings import Settings

    raw_digest = tree_digest(pristine / "raw")

    class LifecycleMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.root = root / uuid.uuid4().hex[:8]
            self.dirs: dict[str, Path] = {}
            self.raw_stat: dict[str, dict] = {}
            self.db_url, self.drop_db = make_db(self.root)
            self.finished: set[str] = set()
            self.log: list[str] = []

        def night(self, where: str) -> Path:
            if where not in self.dirs:
                d = self.root / where / NIGHT_ID
                shutil.copytree(pristine, d)
                self.dirs[where] = d
                self.raw_stat[where] = tree_stat(d / "raw")
            return self.dirs[where]

        def _drive(self, where: str, variant: str, overwrite: bool, keep_old: int, flow_run_id: str | None):
            return _runs.drive_camera_night(self.db_url, parse_night_dir(self.night(where)),
                                            Settings.from_dict(SETTINGS[variant]), overwrite=overwrite,
                                            keep_old=keep_old, pid=dead_pid, split_in_background=False,
                                            flow_run_id=flow_run_id)

        def _succeeded(self, where: str, variant: str, handle) -> None:  # type: ignore[no-untyped-def]
            self.finished.add(handle.run_id)
            problems = same_night_files(self.night(where), references[variant])
            assert not problems, f"{where}: night files differ from the uninterrupted reduction: {problems}"
            check_night_dir(self.night(where))
            assert not _runs.catalog(self.db_url).pending_actions(handle.camera_night_id)

        @rule(where=st.sampled_from(["a", "a", "a", "b"]), variant=st.sampled_from(sorted(SETTINGS)),
              overwrite=st.sampled_from([False, False, False, True]),
              keep_old=st.sampled_from([1, 1, 2]), fault=st.sampled_from(DRAWS))
        def reduce(self, where, variant, overwrite, keep_old, fault) -> None:  # type: ignore[no-untyped-def]
            self.log.append(f"reduce {where} {variant} -o={overwrite} keep={keep_old} fault={fault}")
            faults.disarm()
            if fault is not None:
                faults.arm(fault[0], fault[1])
            flow_run_id = f"flow-{uuid.uuid4()}"
            try:
                with _signals.handled():  # as under mascprocess: signals become Interrupted
                    handle, _ = self._drive(where, variant, overwrite, keep_old, flow_run_id)
                event("run ended: succeeded" + (f" (fault {fault[0]} never reached)" if fault else ""))
            except _signals.Interrupted as exc:
                event(f"run ended: {exc} at {fault[0]}")
                FIRED[fault] = FIRED.get(fault, 0) + 1
                # recorded as interrupted, its lease released: the next run need not wait
                from mascara.catalog.catalog import make_id

                cat = _runs.catalog(self.db_url)
                run = cat.run_info(make_id("run", cat.find_camera_night(self.night(where)), flow_run_id))
                assert (run.status, run.error, run.live) == ("failed", f"interrupted ({exc})", False), run
                return
            except faults.Killed:
                event(f"run ended: crashed at {fault[0]}")
                FIRED[fault] = FIRED.get(fault, 0) + 1
                return  # a crash: nothing recorded its end
            except faults.InjectedOSError:
                event(f"run ended: {fault[0]} failed once, retried")
                FIRED[fault] = FIRED.get(fault, 0) + 1
                # Prefect retries the failed task with the same flow run, hence the same run id
                faults.disarm()
                handle, _ = self._drive(where, variant, overwrite, keep_old, flow_run_id)
            finally:
                faults.disarm()
            self._succeeded(where, variant, handle)

        @invariant()
        def catalog_tells_the_truth(self) -> None:
            check_invariants(_runs.catalog(self.db_url), self.finished)

        @invariant()
        def raw_is_untouched(self) -> None:
            for where, d in self.dirs.items():
                assert tree_stat(d / "raw") == self.raw_stat[where], f"{where}: raw/ changed"

        def teardown(self) -> None:
            try:
                for where in list(self.dirs):
                    try:  # the next plain run always succeeds, with no manual repair
                        handle, _ = self._drive(where, "default", False, 1, None)
                    except LeaseHeld as exc:  # pragma: no cover - would be a wedged night
                        raise AssertionError(f"{where}: wedged: {exc}\n" + "\n".join(self.log)) from exc
                    self._succeeded(where, "default", handle)
                    assert tree_digest(self.dirs[where] / "raw") == raw_digest
                check_invariants(_runs.catalog(self.db_url), self.finished)
            finally:
                _runs.catalog(self.db_url).close()
                _runs.catalog.cache_clear()
                self.drop_db()
                shutil.rmtree(self.root, ignore_errors=True)

    return LifecycleMachine


def _sqlite_db(root: Path):  # type: ignore[no-untyped-def]
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'catalog.sqlite'}", lambda: None


def _pg_db_factory(base: str):  # type: ignore[no-untyped-def]
    def make(root: Path):  # type: ignore[no-untyped-def]
        root.mkdir(parents=True, exist_ok=True)
        schema = f"lc_{uuid.uuid4().hex[:10]}"
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))

        def drop() -> None:
            with admin.connect() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()

        return f"{base}?options=-csearch_path%3D{schema}", drop

    return make


def _run(machine, examples: int, steps: int) -> None:  # type: ignore[no-untyped-def]
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck)))


def test_lifecycle_model_sqlite(pristine, references, dead_pid, tmp_path):
    FIRED.clear()
    _run(_machine(pristine, references, dead_pid, tmp_path, _sqlite_db), _examples(10), 6)
    print("faults that fired:", sorted(FIRED.items()))
    # every named point was reached and crashed at least once (a moved or lost checkpoint fails here)
    assert {p for p, a in FIRED if a == "raise"} == set(faults.POINTS), sorted(FIRED)


@pytest.mark.postgres
def test_lifecycle_model_postgresql(pristine, references, dead_pid, tmp_path, pg_database):
    _run(_machine(pristine, references, dead_pid, tmp_path, _pg_db_factory(pg_database)), _examples(5), 6)


@pytest.mark.lifecycle_long
def test_lifecycle_model_long_exploration(pristine, references, dead_pid, tmp_path):
    """A longer exploration (not in the default run): ``pytest -m lifecycle_long``."""
    _run(_machine(pristine, references, dead_pid, tmp_path, _sqlite_db), _examples(200), 12)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_signal_at_every_named_point_is_recorded_and_the_next_run_finishes(backend, pristine, references, dead_pid,
                                                                             tmp_path, request):
    """SIGTERM at each fault point in turn, under mascprocess' signal handling, in this process: the run
    ends recorded as ``interrupted (SIGTERM)`` with its lease released (never left ``running``), the
    invariants hold, and the next plain run finishes the night as an uninterrupted reduction would."""
    from flows import _runs, _signals
    from mascara.catalog.models import Lease, ReductionRun
    from mascara.rawio import parse_night_dir
    from mascara.settings import Settings
    from sqlmodel import Session, select

    if backend == "sqlite":
        url, drop = _sqlite_db(tmp_path / "db")
    else:
        url, drop = _pg_db_factory(request.getfixturevalue("pg_database"))(tmp_path / "db")
    night = tmp_path / "data" / NIGHT_ID
    shutil.copytree(pristine, night)
    raw = tree_digest(night / "raw")
    settings_ = Settings.from_dict(SETTINGS["default"])
    finished: set[str] = set()

    def drive():  # type: ignore[no-untyped-def]
        return _runs.drive_camera_night(url, parse_night_dir(night), settings_, pid=dead_pid,
                                        split_in_background=False)

    try:
        handle, _ = drive()  # a finished reduction first: later runs have outputs to move aside
        finished.add(handle.run_id)
        for point in faults.POINTS:
            faults.disarm()
            faults.arm(point, "sigterm")
            try:
                with pytest.raises(_signals.Interrupted, match="SIGTERM"), _signals.handled():
                    drive()
            finally:
                faults.disarm()
            cat = _runs.catalog(url)
            with Session(cat.engine) as s:
                last = s.execute(select(ReductionRun).order_by(ReductionRun.started_at.desc())).scalars().first()
                leases = s.execute(select(Lease)).scalars().all()
            assert (last.status, last.error) == ("failed", "interrupted (SIGTERM)"), point
            assert not leases, point
            check_invariants(cat, finished)
            handle, _ = drive()  # at once: nothing to wait out
            finished.add(handle.run_id)
            problems = same_night_files(night, references["default"])
            assert not problems, f"after SIGTERM at {point}: {problems}"
            check_night_dir(night)
            check_invariants(cat, finished)
        assert tree_digest(night / "raw") == raw
    finally:
        _runs.catalog(url).close()
        _runs.catalog.cache_clear()
        drop()
