"""Interruptions of a command-line reduction: SIGINT, SIGTERM and SIGHUP, raised where they can be recorded.

``mascprocess`` turns the three signals into :class:`Interrupted` (a
``KeyboardInterrupt``) while it runs (:func:`handled`).  Opening a run is a
sequence of catalog transactions (lease, decision, moves aside, batches
registered) that ends with the run ``reducing``; the driver can only record an
interruption once it holds the run's id.  A signal that lands in between would
leave the run ``running`` until its lease expired, so the opening is
*held* (:class:`Hold`): a signal received meanwhile is kept and raised by
:meth:`Hold.release`, which the driver calls first thing inside the ``try``
that records interruptions.

Only the main thread receives Python signal handlers; elsewhere, and when
:func:`handled` is not in force (a Prefect worker, a test calling the driver
directly), a :class:`Hold` holds nothing.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

#: The signals a command-line reduction handles like Ctrl-C.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A handled signal; ``str()`` is its name (``SIGTERM``), as :func:`flows._runs.interruption` reports it."""


_state = threading.local()  # only the main thread's is ever read by the handler
_installed = False


def _holding() -> Hold | None:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


def _on_signal(signum: int, _frame: Any) -> None:
    holder = _holding()
    if holder is not None:
        holder.signals.append(signum)
        return
    raise Interrupted(signal.Signals(signum).name)


@contextmanager
def handled() -> Iterator[None]:
    """Raise :class:`Interrupted` on SIGINT, SIGTERM and SIGHUP inside the block; restore the handlers after.

    Outside the main thread (where handlers cannot be set) this does nothing.
    """
    global _installed
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in SIGNALS}
    _installed, was = True, _installed
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _installed = was


class Hold:
    """Keep the signals :func:`handled` raises from the moment this is made until :meth:`release`.

    Used as ``with Hold() as hold: <open the run>`` then, inside the ``try``
    that records interruptions, ``hold.release()``: leaving the ``with``
    normally does *not* stop the hold, so no signal falls between the two.
    If the block raises while a signal is held, the hold ends and the
    interruption is raised instead, chained to the error: the user asked to
    stop, and an error such as ``LeaseHeld`` would otherwise let
    ``mascprocess`` go on with the next night.

    Outside the main thread or without :func:`handled` in force it holds nothing.
    """

    def __init__(self) -> None:
        self.signals: list[int] = []
        self._active = _installed and threading.current_thread() is threading.main_thread()
        if self._active:
            _state.__dict__.setdefault("stack", []).append(self)

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, etype: Any, exc: BaseException | None, _tb: Any) -> None:
        if exc is None:
            return
        first = self._stop()
        if first is not None and not isinstance(exc, KeyboardInterrupt):
            raise Interrupted(signal.Signals(first).name) from exc

    def _stop(self) -> int | None:
        if self._active:
            self._active = False
            stack = getattr(_state, "stack", [])
            if self in stack:
                stack.remove(self)
        first = self.signals[0] if self.signals else None
        self.signals.clear()
        return first

    def release(self) -> None:
        """End the hold; raise :class:`Interrupted` for the first signal received during it, if any."""
        first = self._stop()
        if first is not None:
            raise Interrupted(signal.Signals(first).name)


@contextmanager
def shielded() -> Iterator[None]:
    """Hold signals while an interruption already under way is recorded, and drop them after.

    An operator's second Ctrl-C must not cut short the catalog write that
    records the first one; the process is stopping anyway.
    """
    hold = Hold()
    try:
        yield
    finally:
        hold._stop()
