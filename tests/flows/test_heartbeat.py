"""The flow-run heartbeat that replaces Prefect's (flows/_heartbeat.py): same contract, a prompt end."""

from __future__ import annotations

import contextvars
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from flows import _heartbeat

ROOT = Path(__file__).resolve().parents[2]


class _State:
    def __init__(self, final: bool) -> None:
        self.final = final

    def is_final(self) -> bool:
        return self.final


class _Run:
    def __init__(self, final: bool = False) -> None:
        self.state = _State(final)


class _Logger:
    def __init__(self) -> None:
        self.debug_calls: list[str] = []

    def debug(self, msg: str, *args: object, **kwargs: object) -> None:
        self.debug_calls.append(msg % args if args else msg)


class FakeEngine:
    """The parts of Prefect's flow run engine the heartbeat context uses."""

    def __init__(self, seconds: int | None, final: bool = False, fail: bool = False,
                 seen: contextvars.ContextVar | None = None) -> None:
        self.heartbeat_seconds = seconds
        self.flow_run = _Run(final)
        self.logger = _Logger()
        self.beats: list[tuple[object, object, object]] = []
        self.threads: list[threading.Thread] = []
        self.fail = fail
        self.seen = seen

    def _build_heartbeat_event_template(self) -> tuple[dict, list]:
        return {"prefect.resource.id": "prefect.flow-run.x"}, []

    def _emit_flow_run_heartbeat(self, resource: dict, related: list) -> None:
        self.threads.append(threading.current_thread())
        if self.fail:
            raise RuntimeError("server gone")
        self.beats.append((resource["prefect.resource.id"], related, self.seen.get() if self.seen else None))


def _beat_thread(engine: FakeEngine, timeout: float = 10.0) -> threading.Thread:
    t0 = time.monotonic()
    while not engine.threads and not engine.logger.debug_calls:
        assert time.monotonic() - t0 < timeout, "no heartbeat was attempted"
        time.sleep(0.01)
    return engine.threads[0]


def test_the_installed_prefect_is_the_one_whose_heartbeat_is_replaced():
    """A Prefect upgrade fails here: look at flows/_heartbeat.py again (Prefect may have fixed its wait)."""
    import flows.reduce_night  # noqa: F401 - installs it
    from prefect import flow_engine

    assert _heartbeat.prefect_source_sha256() == _heartbeat.REPLACED_SOURCE_SHA256
    assert flow_engine._send_heartbeats is _heartbeat.send_heartbeats
    assert _heartbeat.install() is True  # idempotent
    assert flow_engine._send_heartbeats.__wrapped_prefect__ is not _heartbeat.send_heartbeats


def test_off_when_prefect_turns_heartbeats_off():
    engine = FakeEngine(None)
    with _heartbeat.send_heartbeats(engine):
        time.sleep(0.05)
    assert engine.beats == [] and engine.threads == []


def test_beats_at_once_in_the_callers_context_then_stops_when_the_block_ends(monkeypatch):
    """The thread ends when the block does, not at the end of a sleep: with the join cut to half a second
    (Prefect's own thread sleeps in one-second steps after its first beat, so it would still be alive)."""
    join = threading.Thread.join
    monkeypatch.setattr(threading.Thread, "join", lambda self, timeout=None: join(self, min(timeout or 0.5, 0.5)))
    seen = contextvars.ContextVar("seen", default="not the caller's")
    seen.set("the caller's")
    engine = FakeEngine(1, seen=seen)  # raised to Prefect's 30 s minimum: one beat in a short block
    with _heartbeat.send_heartbeats(engine):
        thread = _beat_thread(engine)
        assert thread.is_alive() and thread.daemon
    assert not thread.is_alive()  # ended by the stop flag, not after its interval
    assert engine.beats == [("prefect.flow-run.x", [], "the caller's")]


def test_no_beat_for_a_flow_run_in_a_final_state():
    engine = FakeEngine(30, final=True)
    with _heartbeat.send_heartbeats(engine):
        time.sleep(0.1)
    assert engine.beats == [] and engine.threads == []


def test_a_failed_beat_is_logged_at_debug_and_the_flow_goes_on():
    engine = FakeEngine(30, fail=True)
    with _heartbeat.send_heartbeats(engine):
        _beat_thread(engine)
        t0 = time.monotonic()
        while not engine.logger.debug_calls and time.monotonic() - t0 < 10:
            time.sleep(0.01)
    assert engine.logger.debug_calls == ["flow run heartbeat not sent"]


def test_join_on_exit_false_leaves_the_thread_to_stop_by_itself():
    engine = FakeEngine(30)
    with _heartbeat.send_heartbeats(engine, join_on_exit=False):
        thread = _beat_thread(engine)
    thread.join(timeout=5)
    assert not thread.is_alive()


@pytest.mark.prefect
def test_a_flow_run_sends_its_heartbeat_to_the_server_through_the_replacement(prefect_server, tmp_path):
    """A real flow run against the session's server, heartbeats every 30 s: the server receives the first
    heartbeat of that flow run, sent by the replacement (the flow module installs it)."""
    api, env = prefect_server
    script = tmp_path / "beat.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import flows.reduce_night  # installs the heartbeat\n"
        "from prefect import flow, flow_engine\n"
        "from prefect.runtime import flow_run\n"
        "from flows import _heartbeat\n"
        "@flow\n"
        "def beat():\n"
        "    return str(flow_run.id)\n"
        "print(json.dumps({'id': beat(), 'ours': flow_engine._send_heartbeats is _heartbeat.send_heartbeats}))\n")
    out = subprocess.run([sys.executable, str(script)], env={**env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ours"] is True
    flt = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                      "resource": {"id": [f"prefect.flow-run.{result['id']}"]},
                      "occurred": {"since": "2020-01-01T00:00:00Z"}}}
    t0 = time.monotonic()
    while True:  # the server writes events a moment after it receives them
        events = httpx.post(f"{api}/events/filter", json=flt, timeout=10).raise_for_status().json()["events"]
        if events or time.monotonic() - t0 > 30:
            break
        time.sleep(0.5)
    assert len(events) == 1, events
