"""The night directory's lock (mascara.nightlock): real flocks held by real processes.

The registry of locks is per process, and tests elsewhere in the same process (runs "killed" in-process
by a fault) may hold locks of their own nights: these tests look at their own night directory only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mascara import nightlock
from mascara.catalog.lifecycle import output_generations

HOLDER = """
import sys, time
from mascara import nightlock
nightlock.acquire(sys.argv[1], sys.argv[2], sys.argv[3])
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def night(tmp_path: Path) -> Path:
    d = tmp_path / "20260301LPE"
    (d / "raw").mkdir(parents=True)
    return d


@pytest.fixture
def other_process(night: Path):  # type: ignore[no-untyped-def]
    """A process that holds the night's lock for run ``run-a`` of catalog ``sqlite:///a.sqlite``."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(night), "run-a", "sqlite:///a.sqlite"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    yield p
    if p.poll() is None:
        p.kill()
        p.wait()


def test_a_run_of_another_catalog_is_refused_and_told_who_holds_the_night(night, other_process):
    with pytest.raises(nightlock.NightLocked) as err:
        nightlock.acquire(night, "run-b", "sqlite:///b.sqlite")
    msg = str(err.value)
    assert str(night) in msg and "run run-a of catalog sqlite:///a.sqlite" in msg
    assert f"pid {other_process.pid}" in msg
    assert err.value.holder["run_id"] == "run-a"
    assert str(night.absolute()) not in nightlock.held_here()


def test_the_lock_goes_with_the_process_that_held_it(night, other_process):
    other_process.send_signal(signal.SIGKILL)  # a power cut or kill -9: no clean-up ran
    other_process.wait()
    assert nightlock.acquire(night, "run-b", "sqlite:///b.sqlite") is True
    try:
        holder = json.loads((night / nightlock.LOCK_NAME).read_text())
        assert holder["run_id"] == "run-b" and holder["pid"] == os.getpid()
        assert nightlock.held_here().get(str(night.absolute())) == "run-b"
    finally:
        assert nightlock.release("run-b") is True
    assert (night / nightlock.LOCK_NAME).read_text() == ""  # nobody holds it: it names nobody
    assert nightlock.release("run-b") is False


def test_a_run_of_the_same_catalog_goes_on_when_its_lease_allowed_it(night, other_process):
    """The catalog's lease arbitrates between runs of one catalog (a takeover from a stalled run): the
    new run goes on without the lock, which the stalled process still holds, and takes it (the
    heartbeat retries) once that process has let go, so that another catalog is refused again."""
    assert nightlock.acquire(night, "run-b", "sqlite:///a.sqlite") is False
    assert str(night.absolute()) not in nightlock.held_here()
    assert str(night.absolute()) not in nightlock.retry_pending()  # still held by the stalled process
    other_process.kill()
    other_process.wait()
    try:
        assert str(night.absolute()) in nightlock.retry_pending()
        assert nightlock.held_here().get(str(night.absolute())) == "run-b"
        assert json.loads((night / nightlock.LOCK_NAME).read_text())["run_id"] == "run-b"
        p = subprocess.run([sys.executable, "-c", HOLDER, str(night), "run-c", "sqlite:///c.sqlite"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "NightLocked" in p.stderr and "run run-b" in p.stderr
    finally:
        assert nightlock.release("run-b") is True
    assert str(night.absolute()) not in nightlock.retry_pending()


def test_a_caller_that_cannot_tell_a_stalled_run_from_a_starting_one_is_asked(night, other_process):
    """A flow takes the lock before its lease: ``take_over`` decides, from the holder, whether a run of the
    same catalog may go on without the lock. Told no, the holder is refused and named; told yes, the run
    goes on without it, as with no question asked. Another catalog's run is refused without a question."""
    asked: list[dict] = []

    def no(holder: dict) -> bool:
        asked.append(holder)
        return False

    with pytest.raises(nightlock.NightLocked) as err:
        nightlock.acquire(night, "run-b", "sqlite:///a.sqlite", take_over=no)
    assert [h["run_id"] for h in asked] == ["run-a"] and asked[0]["pid"] == other_process.pid
    assert "run run-a of catalog sqlite:///a.sqlite" in str(err.value) and "that is starting" in str(err.value)
    assert err.value.holder["run_id"] == "run-a" and str(night.absolute()) not in nightlock.retry_pending()
    assert nightlock.acquire(night, "run-b", "sqlite:///a.sqlite", take_over=lambda holder: True) is False
    with pytest.raises(nightlock.NightLocked, match="one reduction at a time per night directory"):
        nightlock.acquire(night, "run-c", "sqlite:///c.sqlite", take_over=no)
    assert len(asked) == 1
    nightlock.release("run-b")


def test_a_run_that_ends_before_the_stalled_process_lets_go_does_not_take_the_lock_later(night, other_process):
    assert nightlock.acquire(night, "run-b", "sqlite:///a.sqlite") is False
    nightlock.release("run-b")  # its end recorded
    other_process.kill()
    other_process.wait()
    assert str(night.absolute()) not in nightlock.retry_pending()
    assert str(night.absolute()) not in nightlock.held_here()


def test_within_one_process_a_run_of_the_same_catalog_takes_the_lock_over(night):
    assert nightlock.acquire(night, "run-1", "sqlite:///a.sqlite")
    try:
        with pytest.raises(nightlock.NightLocked, match="run run-1 of catalog sqlite:///a.sqlite"):
            nightlock.acquire(night, "run-x", "sqlite:///b.sqlite")
        assert nightlock.acquire(night, "run-2", "sqlite:///a.sqlite")  # a retry or a resume, after the lease
        assert nightlock.release("run-1") is False  # the first run's end no longer drops it
        # still held: another process is refused
        p = subprocess.run([sys.executable, "-c", HOLDER, str(night), "run-c", "sqlite:///c.sqlite"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "NightLocked" in p.stderr and "run run-2" in p.stderr
    finally:
        nightlock.release("run-2")
    assert str(night.absolute()) not in nightlock.held_here()


def test_the_lock_file_is_not_an_output(night):
    from mascara.rawio import parse_night_dir
    from mascara.reduce import existing_outputs

    nightlock.acquire(night, "run-1", "sqlite:///a.sqlite")
    try:
        (night / "work").mkdir()
        assert output_generations(night) == {"work": {0: night / "work"}}
        assert existing_outputs(parse_night_dir(night)) == [night / "work"]
    finally:
        nightlock.release("run-1")


def test_a_missing_night_directory_is_an_error_not_a_lock(tmp_path):
    with pytest.raises(FileNotFoundError):
        nightlock.acquire(tmp_path / "nowhere", "run-1", "sqlite:///a.sqlite")
    assert str(tmp_path / "nowhere") not in nightlock.held_here()


def test_threads_of_one_process_do_not_take_one_night_twice(night):
    """Two runs of different catalogs started in threads of one process: exactly one gets the night."""
    import threading

    results: dict[str, object] = {}

    def take(run: str, cat: str) -> None:
        try:
            results[run] = nightlock.acquire(night, run, cat)
        except nightlock.NightLocked as exc:
            results[run] = exc

    ts = [threading.Thread(target=take, args=(f"run-{i}", f"sqlite:///{i}.sqlite")) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    winners = [r for r, v in results.items() if v is True]
    assert len(winners) == 1 and all(isinstance(v, nightlock.NightLocked) for r, v in results.items()
                                     if r not in winners)
    nightlock.release(winners[0])
    t0 = time.monotonic()
    assert nightlock.acquire(night, "run-z", "sqlite:///z.sqlite") and time.monotonic() - t0 < 5
    nightlock.release("run-z")


@pytest.mark.skipif(os.geteuid() != 0 or not __import__("shutil").which("setpriv")
                    or not Path("/usr/bin/python3").exists(),
                    reason="needs root to run a process as another account")
def test_another_account_locks_a_lock_file_it_cannot_write():
    """A shared, group-writable data directory: the lock file the first account created (0644 under a 022
    umask) is locked by another account through a read-only descriptor, not a PermissionError for ever."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        night = root / "20260301LPE"
        (night / "raw").mkdir(parents=True)
        for p in (root, night):
            p.chmod(0o777)
        nightlock.acquire(night, "run-1", "sqlite:///a.sqlite")
        nightlock.release("run-1")
        (night / nightlock.LOCK_NAME).chmod(0o644)
        # the other account may not reach this checkout or its virtualenv (CI clones into a private
        # directory): it runs the module (standard library only) from a copy, with the system's Python
        shutil.copy(nightlock.__file__, root / "nightlock.py")
        (root / "nightlock.py").chmod(0o644)
        as_other = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3"]
        if subprocess.run([*as_other, "-c", "pass"], capture_output=True).returncode != 0:
            pytest.skip("no Python the other account can run")
        holder = HOLDER.replace("from mascara import nightlock", f"import sys; sys.path.insert(0, {str(root)!r}); "
                                "import nightlock")
        other = subprocess.Popen([*as_other, "-c", holder, str(night), "run-2", "sqlite:///b.sqlite"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert other.stdout is not None and other.stdout.readline().strip() == "locked", other.stderr.read()
            with pytest.raises(nightlock.NightLocked, match="did not say which run"):  # held, holder not written
                nightlock.acquire(night, "run-3", "sqlite:///c.sqlite")
        finally:
            other.kill()
            other.wait()
    finally:
        shutil.rmtree(root)
