"""The fault hook: inactive unless armed, armed in-process or through the environment."""

from __future__ import annotations

import pytest

from mascara import faults


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.disarm()
    yield
    faults.disarm()


def test_unarmed_points_do_nothing():
    for point in faults.POINTS:
        faults.checkpoint(point)


def test_armed_in_process_fires_count_times():
    faults.arm("mid_move", "oserror", count=2)
    for _ in range(2):
        with pytest.raises(faults.InjectedOSError, match="mid_move"):
            faults.checkpoint("mid_move")
    faults.checkpoint("mid_move")
    faults.arm("after_slc", "raise")
    with pytest.raises(faults.Killed):  # a BaseException: no `except Exception` catches it
        try:
            faults.checkpoint("after_slc")
        except Exception:  # noqa: BLE001
            pytest.fail("Killed was caught as an Exception")


def test_armed_through_the_environment(monkeypatch):
    monkeypatch.setenv(faults.ENV, "after_intent:oserror,combine_after_flc:raise:1")
    with pytest.raises(faults.InjectedOSError):
        faults.checkpoint("after_intent")
    faults.checkpoint("after_intent")  # count 1: spent
    with pytest.raises(faults.Killed):
        faults.checkpoint("combine_after_flc")


def test_unknown_points_and_actions_are_refused():
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.arm("nowhere")
    with pytest.raises(ValueError, match="unknown fault action"):
        faults.arm("mid_move", "explode")


def test_stop_freezes_the_whole_process_until_sigcont(tmp_path):
    """``stop``: the process (every thread) is stopped at the point and carries on after SIGCONT."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    done = tmp_path / "done"
    code = (f"from mascara import faults; faults.checkpoint('after_move'); "
            f"open({str(done)!r}, 'w').write('after the stop')")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, faults.ENV: "after_move:stop"})
    try:
        deadline = time.monotonic() + 60
        while Path(f"/proc/{proc.pid}/stat").read_text().split()[2] != "T":
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        assert not done.exists()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=60) == 0 and done.read_text() == "after the stop"
