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
- On NFS with working locks, Linux maps ``flock`` to NFS byte-range locks,
  so the lock holds across hosts that share the data directory; where locks
  cannot be had, a run goes on without one (a safety net, never a new reason
  to fail).

No database and no Prefect here: the lifecycle calls :func:`acquire` when a
run is registered and the catalog :func:`release` when its end is recorded;
a Prefect flow holds the lock in its own process (its tasks may run on Dask
workers) and drops it with :func:`release_dir`. ``docs/lifecycle.md`` has the
rules.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

#: The lock file's name inside a night directory (hidden: not an output).
LOCK_NAME = ".mascara.lock"
#: Seconds a lock held by another process is tried again before the run is refused.
LOCK_WAIT = 0.5

log = logging.getLogger(__name__)


class NightLocked(RuntimeError):
    """Another run, of any catalog, holds the night directory's lock."""

    def __init__(self, message: str, path: str = "", holder: dict | None = None) -> None:
        super().__init__(message)
        self.path, self.holder = path, holder or {}

    def __reduce__(self):  # type: ignore[no-untyped-def]  # pickled to and from Dask workers
        return (type(self), (str(self), self.path, self.holder))


@dataclass
class _Held:
    fd: int
    catalog: str
    run_id: str
    writable: bool = True


_held: dict[str, _Held] = {}
#: Locks runs went on without (a takeover from a stalled run of their catalog): ``{lock file: (run id, catalog)}``,
#: taken by :func:`retry_pending` once the stalled process lets go.
_pending: dict[str, tuple[str, str]] = {}
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


def _write_holder(fd: int, holder: dict, path: Path | str = "the lock file") -> None:
    """Say who holds the lock in its file; a file that cannot take it (a full disk) keeps the lock all the same.

    The holder is what a refused run is told; it is not the lock (``flock``
    is), so failing to write it is never a reason for a reduction to fail.
    """
    data = (json.dumps(holder, sort_keys=True) + "\n").encode()
    try:  # written over the old holder, then cut to length: a write that fails leaves the old one readable
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    except OSError as exc:
        log.warning("%s: the lock is held, but who holds it could not be written (%s)", path, exc.strerror or exc)


#: How the lock file writes the time its holder took the lock.
SINCE_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


def _holder(run_id: str, catalog: str) -> dict:
    """What the lock file says of its holder."""
    return {"run_id": run_id, "catalog": catalog, "host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(timezone.utc).strftime(SINCE_FORMAT)}


def held_for(holder: dict) -> float | None:
    """Seconds since the holder (as the lock file says it) took the lock; None when it does not say."""
    try:
        since = datetime.strptime(str(holder.get("since")), SINCE_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return (datetime.now(timezone.utc) - since).total_seconds()


def _keep(key: str, fd: int, writable: bool, run_id: str, catalog: str) -> None:
    """Keep the lock just taken on ``fd`` for ``run_id``: its holder written (when writable), registered."""
    try:
        if writable:
            _write_holder(fd, _holder(run_id, catalog), key)
    except BaseException:
        os.close(fd)  # closing drops the lock
        raise
    _held[key] = _Held(fd, catalog, run_id, writable)


def describe(holder: dict) -> str:
    """``run R of catalog C (pid P on host H, since T)``, from what the lock file says."""
    if not holder:
        return "a process that did not say which run it is"
    return (f"run {holder.get('run_id', '?')} of catalog {holder.get('catalog', '?')} "
            f"(pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')})")


def _refusal(path: Path, holder: dict) -> NightLocked:
    return NightLocked(f"{path.parent} is being reduced by {describe(holder)}; one reduction at a time per night "
                       "directory, whichever catalog records it", path=str(path.parent), holder=holder)


def _open(path: Path) -> tuple[int, bool] | None:
    """A descriptor of the lock file and whether it is writable; None when the file cannot be opened at all.

    Created ``0o666`` less the umask, so that the accounts of a shared, group-writable data directory can
    all use it; a file another account created read-only is locked through a read-only descriptor
    (``flock`` needs no write access; the holder is then not written into it).
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666), True
    except PermissionError:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
        except OSError:
            return None


def acquire(night_path: str | Path, run_id: str, catalog: str, wait: float = LOCK_WAIT,
            take_over: Callable[[dict], bool] | None = None) -> bool:
    """Lock ``night_path`` for ``run_id`` of ``catalog`` (a URL with no password), or raise.

    Returns True when the lock is held (or was already held by this process
    for the same catalog), False when it is not and the run goes on all the
    same: another process of the *same* catalog holds it (the catalog's lease
    arbitrates between runs of one catalog, and has let this one take over
    from a stalled run whose process still lives), or locks are not available
    here (a file system without ``flock``, a lock file that cannot be opened):
    the lock is a safety net, never a new reason for a reduction to fail.
    A lock held by another process is tried again for up to ``wait`` seconds
    (a run ending releases it a moment after its lease). ``take_over``, when
    given, is asked with the holder (as the lock file says it) whether a run of
    the same catalog may go on without the lock; when it says no, that holder
    is refused like another catalog's (a caller that takes the lock before the
    lease, and so cannot tell a stalled run from one that is starting).

    Raises
    ------
    NightLocked
        another process holds the lock for a run of another catalog, or for
        a run of this one that ``take_over`` does not let this run go on
        beside; or this process holds it for a run of another catalog.
    FileNotFoundError
        the night directory does not exist.
    """
    path = lock_path(night_path)
    key = str(path)
    with _mutex:
        held = _held.get(key)
        if held is not None:
            if held.catalog != catalog:
                raise _refusal(path, _read_holder(held.fd))
            held.run_id = run_id
            if held.writable:
                _write_holder(held.fd, _holder(run_id, catalog), path)
            return True
        if not path.parent.is_dir():
            raise FileNotFoundError(f"{path.parent}: no such night directory")
        opened = _open(path)
        if opened is None:
            log.warning("%s: the lock file cannot be opened; going on without the lock", path)
            return False
        fd, writable = opened
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
        except BlockingIOError:
            other = _read_holder(fd)
            os.close(fd)
            if other.get("catalog") == catalog and take_over is not None and not take_over(other):
                raise NightLocked(f"{path.parent} is being reduced by {describe(other)}, a run of this catalog "
                                  "that is starting or holds the camera-night's lease; one reduction at a time",
                                  path=str(path.parent), holder=other) from None
            if other.get("catalog") == catalog:
                # a run of this catalog holds it: the lease has let this run go on, i.e. it took over from a
                # run that stalled past its lease (a stopped process keeps its lock); that run is fenced off
                # the catalog at its next write, and this one goes on without the lock
                log.warning("%s: the lock is still held by %s, whose lease this run took over; going on without "
                            "the lock until that process lets go", path.parent, describe(other))
                _pending[key] = (run_id, catalog)
                return False
            raise _refusal(path, other) from None
        except OSError as exc:  # ENOLCK (NFS without lockd), EINVAL, ...: no locks on this file system
            os.close(fd)
            log.warning("%s: cannot lock (%s); going on without the lock", path, exc)
            return False
        except BaseException:
            os.close(fd)
            raise
        _keep(key, fd, writable, run_id, catalog)
        return True


def _drop(key: str) -> None:
    h = _held.pop(key)
    if h.writable:
        try:
            os.ftruncate(h.fd, 0)
        except OSError:
            pass
    os.close(h.fd)  # drops the flock


def release(run_id: str) -> bool:
    """Drop the lock ``run_id`` holds in this process, if any (returns whether it held one)."""
    with _mutex:
        for k in [k for k, (r, _) in _pending.items() if r == run_id]:
            del _pending[k]
        keys = [k for k, h in _held.items() if h.run_id == run_id]
        for k in keys:
            _drop(k)
        return bool(keys)


def retry_pending() -> list[str]:
    """Take the locks that runs of this process went on without, where their holder has let go since.

    A run that took over the lease of a stalled run goes on without the lock
    the stalled process still holds; once that process ends, this takes the
    lock for the run (the drivers' heartbeat calls it), so that a run of
    another catalog is refused again. Returns the night directories locked.
    """
    taken = []
    with _mutex:
        for key, (run_id, catalog) in list(_pending.items()):
            path = Path(key)
            opened = _open(path)
            if opened is None:
                del _pending[key]
                continue
            fd, writable = opened
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except OSError:
                os.close(fd)
                del _pending[key]
                continue
            del _pending[key]
            _keep(key, fd, writable, run_id, catalog)
            taken.append(str(path.parent))
            log.info("%s: lock taken for run %s (the stalled run's process let go)", path.parent, run_id)
    return taken


def release_dir(night_path: str | Path) -> bool:
    """Drop the lock this process holds on ``night_path``, whichever run it was taken for."""
    key = str(lock_path(night_path))
    with _mutex:
        _pending.pop(key, None)
        if key not in _held:
            return False
        _drop(key)
        return True


def held_here() -> dict[str, str]:
    """``{night directory: run id}`` of the locks this process holds."""
    with _mutex:
        return {str(Path(k).parent): h.run_id for k, h in _held.items()}
