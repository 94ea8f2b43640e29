"""Live reduction: which raw files have fully arrived, which batches are ready, when the night ends.

Plain functions and one small stateful watcher on files; no database, no
Prefect. The orchestrators (``flows/_runs.drive_live_camera_night``, the
``reduce-night/live`` flow) poll these and hand ready batches to
:func:`mascara.reduce.reduce_batch`, exactly as an offline reduction does.

When a frame counts as complete (issue 14). Acquisition software writes a
frame in one of three ways, and all three are tolerated:

1. **written under a temporary name and renamed** (``x.fits.part``,
   ``.x.fits``, ``x.fits.tmp``): such names are not frame names, so the file
   is invisible until the rename, which is atomic;
2. **written in place and closed**: a plain ``.fits`` file is complete when
   its size reaches what its own header declares (the header blocks up to
   ``END`` plus ``|BITPIX|/8 * NAXIS1 * NAXIS2`` bytes of data; FITS pads to
   2880-byte blocks, a writer that does not pad is accepted too) *and* its
   size has not changed for ``settle`` seconds;
3. **compressed in place** (``.fits.gz``): the size must not have changed
   for ``settle`` seconds (a gzip stream does not say its length up front).

``calib_*`` files follow the same rules. A file that never completes is
reduced by nobody until it does; at the end of the night the offline intake
rules apply to whatever is there (a truncated file is rejected and
recorded, as offline).

When a batch is ready: its last slot's frame (``lstseq % batch_size ==
batch_size - 1``) or any later frame has arrived complete, or no new frame
has arrived for ``grace`` seconds (frames can be missing), or the night is
over. Frames arrive in time order, so a ready batch has all the frames it
will ever have.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from pathlib import Path

from mascara.rawio import FRAME_RE, primary_header_layout

__all__ = ["RawWatch", "dawn_jd", "fits_declared_size", "ready_batches"]


def fits_declared_size(path: Path | str) -> int | None:
    """Bytes a plain FITS file with one image HDU needs: header blocks plus data, or None.

    None when the header is not complete yet (no ``END`` card in what is on
    disk), or is not a FITS header at all (:func:`mascara.rawio.primary_header_layout`).
    The data part is not rounded up to a whole block (writers that do not pad are accepted).
    """
    layout = primary_header_layout(path)
    return None if layout is None else layout[0] + layout[1]


@dataclasses.dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # clock time at which this size was first seen


class RawWatch:
    """Tracks the files of a ``raw/`` directory between polls and tells which have fully arrived.

    Parameters
    ----------
    raw : path
        The night's ``raw/`` directory.
    settle : float
        Seconds a file's size and modification time must stay unchanged.
    clock : callable
        Monotonic clock (seconds), replaceable in tests.
    """

    def __init__(self, raw: Path | str, settle: float = 1.0, clock=time.monotonic):
        self.raw = Path(raw)
        self.settle = float(settle)
        self.clock = clock
        self._seen: dict[str, _Seen] = {}
        self._complete: set[str] = set()
        #: (size, st_mtime_ns) of each complete file when it counted as complete
        self.stamps: dict[str, tuple[int, int]] = {}
        self.last_arrival: float = clock()  # clock time a new complete frame was last found

    @staticmethod
    def relevant(name: str) -> bool:
        """Frame and calibration names; temporary names (a later rename) are not."""
        return bool(FRAME_RE.match(name)) or (name.startswith("calib_") and (name.endswith(".fits")
                                                                              or name.endswith(".fits.gz")))

    def poll(self) -> set[str]:
        """Look at ``raw/`` once; returns the names of every file complete so far.

        A complete file whose size or modification time changes (written
        again: a frame replaced after it arrived) is no longer complete: it
        settles and completes again like a new one, with its new stamp
        (:attr:`stamps`), so that what was reduced from it can be redone.
        """
        now = self.clock()
        try:
            entries = list(os.scandir(self.raw))
        except FileNotFoundError:
            return set(self._complete)
        new_frames = False
        for e in entries:
            name = e.name
            if not self.relevant(name):
                continue
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            if name in self._complete:
                if self.stamps.get(name) == (st.st_size, st.st_mtime_ns):
                    continue
                self._complete.discard(name)  # written again since it was complete
                self.stamps.pop(name, None)
            seen = self._seen.get(name)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self._seen[name] = _Seen(st.st_size, st.st_mtime_ns, now)
                continue
            if now - seen.since < self.settle:
                continue
            if name.endswith(".fits"):
                need = fits_declared_size(e.path)
                if need is None or st.st_size < need:
                    continue
            self._complete.add(name)
            self.stamps[name] = (st.st_size, st.st_mtime_ns)
            self._seen.pop(name, None)
            new_frames |= bool(FRAME_RE.match(name))
        if new_frames:
            self.last_arrival = now
        return set(self._complete)

    def incomplete(self) -> set[str]:
        """Names of the relevant files seen in ``raw/`` that have not (yet) counted as complete."""
        return set(self._seen) - self._complete

    def idle_for(self) -> float:
        """Seconds since a new complete frame was last found."""
        return self.clock() - self.last_arrival


def ready_batches(lstseqs: Iterable[int], batch_size: int, *, idle: bool = False,
                  night_over: bool = False) -> set[int]:
    """Batches whose frames have all arrived, from the lstseqs of the complete frames.

    A batch is ready when a frame of its last slot or of any later slot is
    there; every batch is ready when the camera has been ``idle`` longer
    than the grace period or the night is over.
    """
    seqs = sorted(set(int(s) for s in lstseqs))
    if not seqs:
        return set()
    batches = {s // batch_size for s in seqs}
    if idle or night_over:
        return batches
    last = seqs[-1]
    return {b for b in batches if last >= (b + 1) * batch_size - 1}


def dawn_jd(night: str, site: str, sun_alt: float = -12.0) -> float:
    """JD (UTC) at which the night's observing ends: the start of its last slot plus one slot."""
    from mascara.timeindex import EXPTIME, jd_start_of, night_lstseqs

    seqs = night_lstseqs(night, site, sun_alt)
    if len(seqs) == 0:
        raise ValueError(f"the Sun does not set below {sun_alt} deg at {site} in the night of {night}")
    return float(jd_start_of(int(seqs[-1]))) + EXPTIME / 86400.0  # a slot lasts 6.4 sidereal s
