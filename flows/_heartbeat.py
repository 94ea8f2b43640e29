"""Prefect's flow-run heartbeat, ended at once when the flow run ends.

Prefect 3.8.8 sends a flow run's heartbeat events (``flows.heartbeat_frequency``,
180 s by default; the server's zombie-flow automations use them) from a thread
that sleeps in one-second steps and looks at its stop flag between them. The
engine joins that thread when the flow run ends, so every flow run ended up to
a second later than its work: 0.91-0.96 s for a two-second flow run in three
runs against a running server (a tiny flow with one task; ``join`` timed), and
on average half a second for a long one. On the 564-frame benchmark night that
is about 1 % of the reduction's wall time, a fifth of the Prefect share that
issue 12 asks to bring under 5 %.

:func:`install` puts in Prefect's place a heartbeat context with the same
contract (nothing when heartbeats are off; the interval at least Prefect's
minimum; the first beat at once, then one per interval until the flow run is in
a final state or ends; a failed beat logged at DEBUG; the caller's context
variables, hence its Prefect settings, in the thread; the join bounded) whose
thread waits on its stop flag instead of sleeping. It does so only when
Prefect's function is the one this was written against (the sha256 of its
source); any other Prefect keeps its own, and :func:`install` says so
(``tests/flows/test_heartbeat.py`` fails then, so that a Prefect upgrade looks
at this again).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

#: sha256 of the source of ``prefect.flow_engine._send_heartbeats`` in Prefect 3.8.8, the one replaced.
REPLACED_SOURCE_SHA256 = "83e152cb73a04e977ca181188e99b3d583c894892b5456043b2eb51e45dbe996"


def prefect_source_sha256() -> str | None:
    """sha256 of the installed Prefect's ``flow_engine._send_heartbeats`` source (None if it has none)."""
    from prefect import flow_engine

    original = getattr(flow_engine._send_heartbeats, "__wrapped_prefect__", flow_engine._send_heartbeats)
    try:
        return hashlib.sha256(inspect.getsource(original).encode()).hexdigest()
    except (OSError, TypeError):
        return None


def install() -> bool:
    """Use :func:`send_heartbeats` for Prefect's flow runs in this process; whether it is in use (idempotent)."""
    from prefect import flow_engine

    if getattr(flow_engine._send_heartbeats, "__wrapped_prefect__", None) is not None:
        return True
    found = prefect_source_sha256()
    if found != REPLACED_SOURCE_SHA256:
        log.debug("Prefect's flow-run heartbeat is not the one mascara replaces (source sha256 %s); kept", found)
        return False
    send_heartbeats.__wrapped_prefect__ = flow_engine._send_heartbeats  # type: ignore[attr-defined]
    flow_engine._send_heartbeats = send_heartbeats
    return True


@contextlib.contextmanager
def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    """Heartbeat events of ``engine``'s flow run while the block runs (Prefect's contract, a prompt end)."""
    from prefect.flow_engine import MINIMUM_HEARTBEAT_INTERVAL

    every = engine.heartbeat_seconds
    if every is None:
        yield
        return
    every = max(every, MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def beat() -> None:
        while True:
            run = engine.flow_run
            if run is not None and run.state is not None and run.state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:  # noqa: BLE001 - a lost heartbeat must not fail the flow run
                engine.logger.debug("flow run heartbeat not sent", exc_info=True)
            if stop.wait(every):
                return

    context = contextvars.copy_context()  # the flow's settings (its API URL) in the thread as well
    thread = threading.Thread(target=context.run, args=(beat,), name="flow-run-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=2)
