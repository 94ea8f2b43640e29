"""Named fault points, for the tests of a reduction's life (never active in production).

The code calls :func:`checkpoint` at the moments where a crash or a failing
system call matters (see ``docs/lifecycle.md`` for the list).  Nothing happens
unless a fault is armed, either in-process with :func:`arm` (the model-based
test) or through the environment for subprocesses and Prefect workers::

    MASCARA_FAULT="<point>:<action>[:<count>]"[,...]

``action`` is ``kill`` (SIGKILL this process, as a power cut or ``kill -9``
would), ``oserror`` (raise :class:`InjectedOSError`, a failing filesystem
call), ``raise`` (raise :class:`Killed`, which no handler of the reduction
catches: an in-process stand-in for ``kill``), ``hang`` (sleep until the
process is stopped from outside, e.g. by a cancelled Prefect flow run) or
``stop`` (SIGSTOP to itself: the whole process, heartbeat thread included,
freezes like a suspended machine until someone sends SIGCONT), ``sigint``,
``sigterm`` or ``sighup`` (send that signal to this process, as an operator's
Ctrl-C, ``kill`` or a closed terminal would, and go on).  ``count`` limits
how many times the fault fires (default 1).

``MASCARA_FLOW_FAULT="<night_id>:<batch>:<n>[:<kind>]"`` makes the first ``n``
attempts of a Prefect batch task raise a transient error (``kind``:
``OSError``, the default, or ``OperationalError``): see :func:`maybe_fail_batch`.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "MASCARA_FAULT"
BATCH_ENV = "MASCARA_FLOW_FAULT"

#: Every checkpoint the code calls, in the order of a reduction's life.
POINTS = (
    "after_register",      # run row and lease committed, nothing decided
    "after_intent",        # moves aside journaled, none done
    "mid_move",            # one directory renamed (or moved to the bin), its row not yet confirmed
    "after_move",          # every move confirmed, batches not yet registered
    "after_begin",         # the run is 'reducing', its batches registered; the driver has no handle yet
    "removing_bins",       # an erased directory in its bin, about to be removed (erase confirmed first only
                           # in the library driver, which removes bins after the opening's signal hold)
    "after_batch_file",    # a batch file written, its catalog row not yet updated
    "combine_before_flc",  # the combine has read the batches, no night file written
    "combine_after_flc",   # the fLC is in place, the sLC is not
    "after_slc",           # both night files written, products and the run's end not recorded
    "drawing_quicklook",   # the night files written, its quick-look figures about to be drawn while the run
                           # still holds the night; products and the run's end not recorded
)

#: Checkpoints only the Prefect flow passes (the library driver, which the model-based test drives, does not).
FLOW_POINTS = (
    "after_flow_lock",     # the flow's process holds the night directory's lock; its start task has not yet
                           # registered the run (nothing recorded)
)

#: Checkpoints of the process that splits batches by star beside the reduction (the library driver's and,
#: on its thread pool, the Prefect flow's); armed there through the environment.
SPLITTER_POINTS = (
    "splitting",           # a batch file handed to the splitter process, not yet split
)

ACTIONS = ("kill", "oserror", "raise", "hang", "stop", "sigint", "sigterm", "sighup")


class Killed(BaseException):
    """An in-process crash: derived from BaseException so no ``except Exception`` cleans up after it."""


class InjectedOSError(OSError):
    """A filesystem call failing on purpose."""


class InjectedFault(OSError):
    """A transient I/O error injected into a batch task on purpose."""


_lock = threading.RLock()  # checkpoint -> _load_env -> arm take it again
_armed: dict[str, list] = {}  # point -> [action, remaining]
_env_seen: str | None = None


def arm(point: str, action: str = "raise", count: int = 1) -> None:
    """Make the next ``count`` passes through ``point`` fail with ``action`` (in this process)."""
    known = POINTS + FLOW_POINTS + SPLITTER_POINTS
    if point not in known:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(known)}")
    if action not in ACTIONS:
        raise ValueError(f"unknown fault action {action!r}; known: {', '.join(ACTIONS)}")
    with _lock:
        _armed[point] = [action, int(count)]


def disarm() -> None:
    """Forget every armed fault (the environment is read again on the next checkpoint)."""
    global _env_seen
    with _lock:
        _armed.clear()
        _env_seen = None


def _load_env() -> None:
    global _env_seen
    spec = os.environ.get(ENV, "")
    if spec == _env_seen:
        return
    _env_seen = spec
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        arm(parts[0], parts[1] if len(parts) > 1 else "kill", int(parts[2]) if len(parts) > 2 else 1)


def checkpoint(point: str) -> None:
    """Fire the fault armed at ``point``, if any; otherwise do nothing (a dictionary lookup)."""
    with _lock:
        _load_env()
        entry = _armed.get(point)
        if entry is None or entry[1] <= 0:
            return
        entry[1] -= 1
        action = entry[0]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "oserror":
        raise InjectedOSError(f"injected failure of a filesystem call at {point}")
    if action == "hang":
        while True:
            time.sleep(1.0)
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if action.startswith("sig"):
        os.kill(os.getpid(), getattr(signal, action.upper()))
        return
    raise Killed(f"injected crash at {point}")


def maybe_fail_batch(night_id: str, batch: int, attempt: int) -> None:
    """Raise the error of ``MASCARA_FLOW_FAULT`` if a spec names this batch and ``attempt`` (1-based)."""
    spec = os.environ.get(BATCH_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        nid, b, n = parts[0], int(parts[1]), int(parts[2])
        kind = parts[3] if len(parts) > 3 else "OSError"
        if nid == night_id and b == int(batch) and attempt <= n:
            msg = f"injected transient failure of {night_id} batch {batch}, attempt {attempt}"
            if kind == "OperationalError":
                from sqlalchemy.exc import OperationalError

                raise OperationalError(msg, None, ConnectionError(msg))
            raise InjectedFault(msg)
