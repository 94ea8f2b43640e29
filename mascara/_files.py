"""Files under a final name are complete: the package's one way to write them.

The package's data and figure writers write to a hidden temporary name in the
same directory (``.<name>.<pid>-<thread>.tmp``), make it durable and rename
it (the simulator keeps the cameras' own ``.part`` convention). When the
write fails the temporary file is removed and the final name is untouched.
A write that failed because the device is full says so, naming the file that
was not written and the room left, whichever library wrote it: h5py words it
``Can't close file (... error message = 'No space left on device' ...)``,
numpy's ``tofile`` ``14307 requested and 1641 written``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO

#: How libraries word a full device or quota in the errors they raise.
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
#: numpy's error for a short write (``ndarray.tofile``, ``np.save`` to a file).
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


class DiskFull(OSError):
    """A file could not be written because its device (or the user's quota) is full."""


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable (not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(exc: BaseException, directory: str | os.PathLike[str]) -> str | None:
    """What a failed write says of a full device, or None when it failed for another reason."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return os.strerror(exc.errno)
    text = str(exc)
    for said in _FULL_TEXTS:
        if said in text:
            return said
    if _SHORT_WRITE.search(text) and 0 <= _free_bytes(directory) < 1 << 20:
        return "short write on a full device"
    return None


def _free_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes free for this user on the device of ``directory``; -1 if it cannot be told (never "full")."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return -1


def save_npy(f: BinaryIO, array: Any, **kwargs: Any) -> None:
    """``np.save`` into an open binary file, checking that every byte reached the file.

    numpy writes the data through the file descriptor and loses a failed
    tail silently (a full device under an array of a few kB wrote 1,000 of
    1,008 bytes and raised nothing): the file's size must equal the position.
    """
    import numpy as np

    np.save(f, array, **kwargs)
    f.flush()
    size = os.fstat(f.fileno()).st_size
    if size != f.tell():
        raise OSError(f"{f.tell()} requested and {size} written")


def not_written(path: str | os.PathLike[str], exc: BaseException) -> DiskFull | None:
    """The :class:`DiskFull` to raise instead of ``exc`` (from it) when the device was full, else None."""
    directory = os.path.dirname(os.path.abspath(path))
    why = disk_full(exc, directory)
    if why is None:
        return None
    free = _free_bytes(directory)
    room = f"{free / 1e6:.1f} MB free there" if free >= 0 else "free space unknown"
    return DiskFull(errno.ENOSPC, f"{os.fspath(path)} not written: {why} ({room})")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = True) -> Iterator[str]:
    """Yield a temporary path next to ``path``; once the block is done, rename it to ``path``.

    ``durable``: fsync the file before and its directory after the rename
    (data files; quick-look figures and previews need not be). On any
    exception the temporary file is removed, ``path`` is untouched, and a
    full device is raised as :class:`DiskFull` naming ``path``.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    # per process and thread: two threads of a process may write the same file (quick-look redraws)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}-{threading.get_native_id()}.tmp")
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        # judged before the temporary file goes: its removal frees the room whose lack failed the write
        full = not_written(path, exc) if isinstance(exc, Exception) else None
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if full is not None:
            raise full from exc
        raise
    if durable:
        fsync_dir(directory)
