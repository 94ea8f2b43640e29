"""One reduction at a time in a night directory, whichever catalog records it.

The catalog's lease keeps two runs *of one catalog* off a camera-night. Two
catalogs pointed at one data directory (``--db`` differing between two
shells, a PostgreSQL catalog beside the default SQLite file) know nothing of
each other, and their runs would move, erase and write the same outputs. A
run therefore also holds an exclusive ``flock`` on ``<night>/.mascara.lock``
from the moment it is registered until its end is recorded.

- The kernel drops the lock when the holding process dies, however it dies:
  a killed run never leaves a night locked.
- The file stays (removing a lock file races with a process about to lock
  it); while locked it names the holder (run, catalog, host, pid, since), and
  it is emptied on release. It is hidden, so it is not an output: it is
  never moved aside.
- Between runs of *one* catalog the lease decides, as before: a run that took
  over the lease of a run stalled past it (a stopped process keeps its lock)
  goes on without the lock, and within one process a second run of the same
  catalog (a retry, a resume after an in-process failure) takes the lock
  over. A run of another catalog is refused.
- On NFS, Linux maps ``flock`` to NFS byte-range locks, so the lock holds
  across hosts that share the data directory.

No database and no Prefect here: the catalog layer calls :func:`acquire`
when a run is registered and :func:`release` when its end is recorded.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

#: The lock file's name inside a night directory (hidden: not an output).
LOCK_NAME = ".mascara.lock"

log = logging.getLogger(__name__)


class NightLocked(RuntimeError):
    """Another run, of any catalog, holds the night directory's lock."""

    def __init__(self, message: str, *, path: str, holder: dict) -> None:
        super().__init__(message)
        self.path, self.holder = path, holder


@dataclass
class _Held:
    fd: int
    catalog: str
    run_id: str


_held: dict[str, _Held] = {}
_mutex = threading.Lock()


def lock_path(night_path: str | Path) -> Path:
    return Path(night_path).absolute() / LOCK_NAME


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _write_holder(fd: int, holder: dict) -> None:
    data = (json.dumps(holder, sort_keys=True) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def describe(holder: dict) -> str:
    """``run R of catalog C (pid P on host H, since T)``, from what the lock file says."""
    if not holder:
        return "a process that did not say which run it is"
    return (f"run {holder.get('run_id', '?')} of catalog {holder.get('catalog', '?')} "
            f"(pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')})")


def acquire(night_path: str | Path, run_id: str, catalog: str) -> bool:
    """Lock ``night_path`` for ``run_id`` of ``catalog`` (a URL with no password), or raise.

    Returns True when the lock is held (or was already held by this process
    for the same catalog), False when another process of the *same* catalog
    holds it: the catalog's lease arbitrates between runs of one catalog, and
    has let this one take over from a stalled run whose process still lives.

    Raises
    ------
    NightLocked
        another process holds the lock, or this process holds it for a run
        of another catalog.
    FileNotFoundError
        the night directory does not exist.
    """
    path = lock_path(night_path)
    key = str(path)
    holder = {"run_id": run_id, "catalog": catalog, "host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    with _mutex:
        held = _held.get(key)
        if held is not None:
            if held.catalog != catalog:
                raise NightLocked(f"{path.parent} is being reduced by {describe(_read_holder(held.fd))}; one "
                                  "reduction at a time per night directory, whichever catalog records it",
                                  path=str(path.parent), holder=_read_holder(held.fd))
            held.run_id = run_id
            _write_holder(held.fd, holder)
            return True
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_holder(fd)
            os.close(fd)
            if other.get("catalog") == catalog:
                # a run of this catalog holds it: the lease has let this run go on, i.e. it took over from a
                # run that stalled past its lease (a stopped process keeps its lock); that run is fenced off
                # the catalog at its next write, and this one goes on without the lock
                log.warning("%s: the lock is still held by %s, whose lease this run took over; going on without "
                            "the lock", path.parent, describe(other))
                return False
            raise NightLocked(f"{path.parent} is being reduced by {describe(other)}; one reduction at a time "
                              "per night directory, whichever catalog records it",
                              path=str(path.parent), holder=other) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            _write_holder(fd, holder)
        except BaseException:
            os.close(fd)  # closing drops the lock
            raise
        _held[key] = _Held(fd, catalog, run_id)
        return True


def release(run_id: str) -> bool:
    """Drop the lock ``run_id`` holds in this process, if any (returns whether it held one)."""
    with _mutex:
        keys = [k for k, h in _held.items() if h.run_id == run_id]
        for k in keys:
            h = _held.pop(k)
            try:
                os.ftruncate(h.fd, 0)
            except OSError:
                pass
            os.close(h.fd)  # drops the flock
        return bool(keys)


def held_here() -> dict[str, str]:
    """``{night directory: run id}`` of the locks this process holds."""
    with _mutex:
        return {str(Path(k).parent): h.run_id for k, h in _held.items()}
