"""Light-curve files (SPEC §8): batch files, the split by star, the night files.

Data flow::

    reduction ──► batch file (one per lstseq // 50, frame-major, atomic)
                     │  StarSplitter.add  (beside the reduction)
                     ▼
                  workdir/split/<batch>-<sha>.{fast,slow,stars}.npy
                  (rows grouped by star bucket) + workdir/splitter.json
                     │  combine_night  (once, at the end of the night)
                     ▼
                  fLC_<night>.hdf5, sLC_<night>.hdf5  (atomic, checksummed)

Why buckets: appending every batch into 25,000 per-star HDF5 datasets is the
slow path (PERF-NOTES). Instead each batch is rewritten once, its rows sorted
by (bucket, star, lstseq) with ``key = blake2b-64(ascc)`` and ``bucket = key %
nbuckets``, and the bucket offsets are recorded in the splitter registry. At
the end of the night bucket ``k`` of every batch is a contiguous slice of its
``.npy`` file, so the combine reads each bucket of all batches (1/nbuckets of
the night, tens of MB), merges the per-batch sorted runs and writes those
stars' datasets: memory stays bounded and every byte is read once.

Every file under a final name is complete: writers use a temporary name in the
same directory, flush, fsync and ``os.replace``. The splitter registry is the
"done" marker of a split batch, so re-adding a batch after a crash is a no-op
(same sha256) or a clean replacement (different sha256).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mascara import _collector, faults
from mascara._files import atomic_path, save_npy
from mascara.lcformat import (
    ASCC_DTYPE,
    FAST_DTYPE,
    CALIBRATION_ATTRS,
    GLOBAL_ATTRS,
    HEADER_DTYPE,
    HEADER_TABLE_FIELDS,
    SLOW_DTYPE,
    STAR_DTYPE,
    with_ascc,
)
from mascara.stars import id_integers

log = logging.getLogger(__name__)

__all__ = [
    "BATCH_FAST_DTYPE",
    "BATCH_SLOW_DTYPE",
    "BatchConflictError",
    "BatchPieces",
    "SLOW_GLOBAL_ATTRS",
    "STAR_DTYPE",
    "StarSplitter",
    "batch_index",
    "combine_night",
    "file_sha256",
    "global_attrs_for_slow",
    "night_file_names",
    "read_batch_file",
    "read_header_table",
    "read_star",
    "run_splitter_process",
    "write_batch_file",
]

#: Version of the batch-file and splitter layouts written by this module.
FORMAT_VERSION = 1

#: Frames per batch (SPEC §2: a batch is ``lstseq // 50``).
BATCH_SIZE = 50

#: Rows of a batch file's ``fast`` table (one per star per frame).
BATCH_FAST_DTYPE = with_ascc(FAST_DTYPE)
#: Rows of a batch file's ``slow`` table (one per star, binned image).
BATCH_SLOW_DTYPE = with_ascc(SLOW_DTYPE)

#: ``global`` attributes of sLC files: the fLC list with the two extra binned
#: apertures after APER1 (NAPER = 4, apertures 2.5, 3.5, 4.5, 5.5 px by default).
SLOW_GLOBAL_ATTRS = GLOBAL_ATTRS[: GLOBAL_ATTRS.index("APER1") + 1] + ("APER2", "APER3") + GLOBAL_ATTRS[
    GLOBAL_ATTRS.index("APER1") + 1 :
]

#: Root attribute of fLC/sLC files holding the digest of the combine inputs.
INPUT_DIGEST_ATTR = "mascara_input_digest"

_KINDS = ("fast", "slow")
_ROW_DTYPES = {"fast": BATCH_FAST_DTYPE, "slow": BATCH_SLOW_DTYPE}
# Rows of the splitter's pieces: the batch rows with the star key in front.
_PIECE_DTYPES = {k: np.dtype([("key", "<u8")] + [(n, d.fields[n][0]) for n in d.names]) for k, d in _ROW_DTYPES.items()}
_CHUNK = 1 << 22


class BatchConflictError(ValueError):
    """Two different batch files claim the same batch index."""


# --------------------------------------------------------------------------- #
# small helpers


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of the bytes of ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, sort_keys=True, indent=1)
            f.write("\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _coerce(arr: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Copy structured ``arr`` into ``dtype``, matching fields by name (all required, no extras)."""
    arr = np.asarray(arr)
    names = arr.dtype.names or ()
    if set(names) != set(dtype.names):
        missing = sorted(set(dtype.names) - set(names))
        extra = sorted(set(names) - set(dtype.names))
        raise ValueError(f"{what}: fields differ from the layout (missing {missing}, unexpected {extra})")
    if arr.dtype == dtype:  # equal layout; the view drops dtype metadata h5py may attach
        return np.ascontiguousarray(arr).reshape(-1).view(dtype)
    out = np.empty(arr.size, dtype=dtype)
    for n in dtype.names:
        out[n] = arr[n].reshape(-1)
    return out


def _ascc_sort_key(ascc: np.ndarray) -> np.ndarray:
    """Order of star ids: numeric when every id is a decimal number, else bytewise."""
    stripped = np.char.strip(ascc)
    if ascc.size and np.all(np.char.isdigit(stripped)):
        return np.argsort(stripped.astype(np.int64), kind="stable")
    return np.argsort(ascc, kind="stable")


def _star_key(ascc: np.ndarray) -> np.ndarray:
    """64-bit hash of each star id (uint64), the same in every batch and process.

    Grouping rows by an integer is far cheaper than sorting 12-byte strings; the
    combine checks that no two ids of a bucket share a key (and falls back to a
    string sort if they ever do).
    """
    ascc = np.ascontiguousarray(ascc, dtype=ASCC_DTYPE)
    as_int = id_integers(ascc)
    if as_int is not None:
        # ids of at most 8 bytes (all of the ASCC): find the distinct ones as integers, 4x faster
        # than comparing strings; each id is then the bytes of its integer, without the trailing NULs
        heads, inverse = np.unique(as_int, return_inverse=True)
        uniq = heads.view("S8").tolist()
    else:
        found, inverse = np.unique(ascc, return_inverse=True)
        uniq = found.tolist()
    per_star = np.fromiter((_id_key(a) for a in uniq), dtype=np.uint64, count=len(uniq))
    return per_star[inverse.reshape(-1)]


@functools.lru_cache(maxsize=1 << 17)
def _id_key(star_id: bytes) -> int:
    """The 64-bit key of one star id (blake2b), remembered: consecutive batches share nearly all their stars.

    The splitter hashed about 16,700 ids per full batch (fast, slow and star
    tables), 60 ms; from the cache a batch costs a few ms.
    """
    return int.from_bytes(hashlib.blake2b(star_id, digest_size=8).digest(), "little")


def _piece_order(lstseq: np.ndarray, key: np.ndarray, bucket: np.ndarray, nbuckets: int) -> np.ndarray:
    """Row order of a piece: by (bucket, key, lstseq), ties in input order (``np.lexsort``'s order).

    With rows already in lstseq order (as batch files write them) and a power-of-two
    bucket count, one stable sort of the key with its bucket bits rotated to the
    top gives the same order at a third of the cost.
    """
    shift = int(nbuckets).bit_length() - 1
    if nbuckets == 1 << shift and shift and np.all(np.diff(lstseq.astype(np.int64)) >= 0):
        k = key.astype(np.uint64, copy=False)
        return np.argsort((k << np.uint64(64 - shift)) | (k >> np.uint64(shift)), kind="stable")
    return np.lexsort((lstseq, key, bucket))


def batch_index(fast: np.ndarray, slow: np.ndarray, attrs: Mapping[str, Any]) -> int:
    """Batch number of a batch file: ``attrs['batch']``, else ``lstseq // 50`` of its rows."""
    if "batch" in attrs:
        return int(attrs["batch"])
    for t in (fast, slow):
        if len(t):
            b = np.unique(np.asarray(t["lstseq"], dtype=np.int64) // BATCH_SIZE)
            if b.size != 1:
                raise ValueError(f"rows span several batches {b.tolist()} and attrs has no 'batch'")
            return int(b[0])
    raise ValueError("empty batch without attrs['batch']")


# --------------------------------------------------------------------------- #
# batch files


@dataclasses.dataclass
class BatchPieces:
    """The content of one batch file.

    Attributes
    ----------
    fast : ndarray of BATCH_FAST_DTYPE, shape (nframes * nstars_on_frame,)
        Per-frame photometry, frame-major (all stars of frame 0, then frame 1...).
    slow : ndarray of BATCH_SLOW_DTYPE, shape (nstars_binned,)
        Photometry of the batch's binned image, one row per star.
    stars : ndarray of STAR_DTYPE
        Catalogue data of every star in ``fast`` or ``slow``.
    attrs : dict
        JSON-able metadata (batch index, lstseq range, camera solution...).
    """

    fast: np.ndarray
    slow: np.ndarray
    stars: np.ndarray
    attrs: dict[str, Any]

    @property
    def batch(self) -> int:
        """Batch number (``lstseq // 50``)."""
        return batch_index(self.fast, self.slow, self.attrs)


def write_batch_file(
    path: str | os.PathLike[str],
    fast: np.ndarray,
    slow: np.ndarray,
    stars: np.ndarray,
    attrs: Mapping[str, Any],
) -> str:
    """Write one batch's light-curve pieces to an HDF5 file, atomically.

    Parameters
    ----------
    path : path-like
        Final file name. The file is written as ``.<name>.<pid>.tmp`` in the same
        directory, fsync'ed and renamed, so a reader never sees a partial file.
    fast : structured ndarray, fields of ``with_ascc(FAST_DTYPE)``
        One row per star per frame, frame-major.
    slow : structured ndarray, fields of ``with_ascc(SLOW_DTYPE)``
        One row per star for the batch's binned image.
    stars : structured ndarray, fields of ``STAR_DTYPE``
        Catalogue data; must contain every id of ``fast`` and ``slow``, once.
    attrs : mapping
        JSON-able values (numpy scalars and arrays are converted). ``attrs['batch']``
        is the batch number; without it the number is ``lstseq // 50`` of the rows.

    Returns
    -------
    str
        sha256 (hex) of the final file's bytes.

    Notes
    -----
    The content is deterministic: the same inputs give the same bytes (no
    timestamps are stored; h5py writes identical files for identical calls,
    checked by the tests), so the returned sha256 identifies the content.
    """
    fast = _coerce(fast, BATCH_FAST_DTYPE, "fast")
    slow = _coerce(slow, BATCH_SLOW_DTYPE, "slow")
    stars = _coerce(stars, STAR_DTYPE, "stars")
    if np.unique(stars["ascc"]).size != stars.size:
        raise ValueError("stars: duplicate ids")
    unknown = np.setdiff1d(np.union1d(fast["ascc"], slow["ascc"]), stars["ascc"])
    if unknown.size:
        raise ValueError(f"{unknown.size} star ids in fast/slow are missing from stars, e.g. {unknown[:3]}")
    attrs = dict(attrs)
    attrs.setdefault("batch", batch_index(fast, slow, attrs))
    for name, t in (("fast", fast), ("slow", slow)):
        if t.size and np.any(t["lstseq"].astype(np.int64) // BATCH_SIZE != int(attrs["batch"])):
            raise ValueError(f"{name}: rows outside batch {attrs['batch']} (lstseq // {BATCH_SIZE})")
    blob = _canonical_json(attrs)

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = "mascara-batch"
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["batch"] = int(attrs["batch"])
            f.attrs["attrs"] = blob
            f.create_dataset("fast", data=fast)
            f.create_dataset("slow", data=slow)
            f.create_dataset("stars", data=stars)
    return file_sha256(path)


def _read_batch_attrs(f: h5py.File) -> dict[str, Any]:
    if f.attrs.get("format") != "mascara-batch":
        raise ValueError(f"{f.filename}: not a mascara batch file")
    return json.loads(f.attrs["attrs"])


def read_batch_file(path: str | os.PathLike[str]) -> BatchPieces:
    """Read a batch file written by :func:`write_batch_file`."""
    with h5py.File(path, "r") as f:
        attrs = _read_batch_attrs(f)
        return BatchPieces(fast=f["fast"][()], slow=f["slow"][()], stars=f["stars"][()], attrs=attrs)


def _read_batch_number(path: str | os.PathLike[str]) -> int:
    with h5py.File(path, "r") as f:
        _read_batch_attrs(f)
        return int(f.attrs["batch"])


# --------------------------------------------------------------------------- #
# the split by star


class StarSplitter:
    """Split batch files by star into an intermediate store (the tutorial's SaveItAll).

    Parameters
    ----------
    workdir : path-like
        Directory of the store; created if missing. Holds ``splitter.json`` (the
        registry: which batches were split, with their sha256 and bucket offsets),
        ``split/`` (one ``.npy`` triple per batch, rows grouped by star bucket) and
        ``diagnostics.hdf5`` (light curves of ``diagnostic_ids``).
    diagnostic_ids : iterable of str, optional
        Star ids whose light curves are kept up to date in ``diagnostics.hdf5``
        after every batch.
    nbuckets : int
        Number of star buckets (only used when the store is created).

    Notes
    -----
    Single writer: one process adds batches to a workdir at a time. Adding is
    idempotent (a batch already registered with the same sha256 is skipped) and
    resumable: a crash leaves at most unreferenced files, removed by the next add.
    Adding a batch number again with *different* content replaces the old pieces.
    """

    REGISTRY = "splitter.json"
    DIAGNOSTICS = "diagnostics.hdf5"

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        diagnostic_ids: Iterable[str] = (),
        nbuckets: int = 128,
    ) -> None:
        self.workdir = Path(workdir)
        self.splitdir = self.workdir / "split"
        self.splitdir.mkdir(parents=True, exist_ok=True)
        self.diagnostic_ids = sorted({str(s) for s in diagnostic_ids})
        reg_path = self.workdir / self.REGISTRY
        if reg_path.exists():
            self._registry = json.loads(reg_path.read_text())
            if self._registry.get("format") != "mascara-splitter":
                raise ValueError(f"{reg_path}: not a splitter registry")
        else:
            self._registry = {"format": "mascara-splitter", "version": FORMAT_VERSION, "nbuckets": int(nbuckets), "batches": {}}
            _write_json_atomic(reg_path, self._registry)
        # the diagnostic stars' rows of each batch, by batch: (sha256, {"fast", "slow", "stars"})
        self._diag_cache: dict[int, tuple[str, dict[str, np.ndarray]]] = {}

    # -- registry ---------------------------------------------------------
    @property
    def nbuckets(self) -> int:
        return int(self._registry["nbuckets"])

    @property
    def batches(self) -> dict[int, str]:
        """Registered batch numbers and the sha256 of the batch file each came from."""
        return {int(b): e["sha256"] for b, e in self._registry["batches"].items()}

    def entry(self, batch: int) -> dict[str, Any] | None:
        """Registry entry of ``batch`` (sha256, path, piece files, bucket offsets), or None."""
        return self._registry["batches"].get(str(int(batch)))

    def _commit(self) -> None:
        _write_json_atomic(self.workdir / self.REGISTRY, self._registry)

    def _cleanup(self) -> None:
        """Remove piece files the registry does not reference (left by a crash or a replacement)."""
        keep = set()
        for e in self._registry["batches"].values():
            keep.update(e["files"].values())
        for p in self.splitdir.iterdir():
            if p.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    # -- adding -----------------------------------------------------------
    def add(self, batch_path: str | os.PathLike[str], sha256: str | None = None) -> bool:
        """Split one batch file into the store.

        Parameters
        ----------
        batch_path : path-like
            A file written by :func:`write_batch_file`.
        sha256 : str, optional
            Its sha256 if already known (skips hashing the file).

        Returns
        -------
        bool
            False if this batch was already registered with the same content
            (nothing written), True otherwise.
        """
        from mascara._gather import gather_pieces  # numba: not for readers of light curves

        sha = sha256 or file_sha256(batch_path)
        pieces = read_batch_file(batch_path)
        b = pieces.batch
        old = self.entry(b)
        if old is not None and old["sha256"] == sha and self._files_present(old):
            self.ensure_diagnostics()  # split before, but its diagnostics may not have been written then
            return False
        if old is not None and old["sha256"] != sha:
            if os.path.abspath(old["path"]) == os.path.abspath(batch_path):  # the batch reduced again
                log.info("batch %d: %s was written again; replacing its pieces", b, batch_path)
            else:
                log.warning("batch %d: replacing pieces of %s by %s", b, old["path"], batch_path)

        stem = f"{b:08d}-{sha[:16]}"
        files: dict[str, str] = {}
        offsets: dict[str, list[int]] = {}
        for kind, table in (("fast", pieces.fast), ("slow", pieces.slow)):
            table = np.ascontiguousarray(_coerce(table, _ROW_DTYPES[kind], kind))
            if table.size and np.any(table["lstseq"].astype(np.int64) // BATCH_SIZE != b):
                raise ValueError(f"{batch_path}: {kind} rows outside batch {b} (lstseq // {BATCH_SIZE})")
            key = _star_key(table["ascc"])
            bucket = key % np.uint64(self.nbuckets)
            # Sorted by (bucket, star, lstseq): a bucket is one slice, and within it each
            # star is a sorted run, so the combine only merges runs.
            order = _piece_order(table["lstseq"], key, bucket, self.nbuckets)
            piece = np.empty(table.size, _PIECE_DTYPES[kind])
            # the row after the key has the batch row's layout: one gather of whole rows as bytes
            gather_pieces(table, key, order, piece)
            files[kind] = f"{stem}.{kind}.npy"
            self._save(files[kind], piece)
            # the rows are in bucket order: each bucket's slice starts after the rows of the buckets before
            offsets[kind] = [0, *np.cumsum(np.bincount(bucket.astype(np.intp), minlength=self.nbuckets)).tolist()]
        files["stars"] = f"{stem}.stars.npy"
        self._save(files["stars"], _coerce(pieces.stars, STAR_DTYPE, "stars"))
        st = os.stat(batch_path)
        self._registry["batches"][str(b)] = {
            "sha256": sha,
            "path": os.path.abspath(batch_path),
            "stat": [st.st_size, st.st_mtime_ns],
            "files": files,
            "offsets": offsets,
            "nfast": int(pieces.fast.size),
            "nslow": int(pieces.slow.size),
        }
        self._commit()  # the batch counts as split from here on
        self._cleanup()
        if self.diagnostic_ids:
            self.write_diagnostics()
        return True

    def _save(self, name: str, arr: np.ndarray) -> None:
        with atomic_path(self.splitdir / name) as tmp:
            with open(tmp, "wb") as f:
                save_npy(f, arr, allow_pickle=False)

    def _files_present(self, e: Mapping[str, Any]) -> bool:
        return all((self.splitdir / n).exists() for n in e["files"].values())

    # -- reading ----------------------------------------------------------
    def bucket_rows(
        self, bucket: int, kind: str, batches: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of one bucket over ``batches`` (default all), grouped by star, sorted by lstseq, unique.

        Returns
        -------
        ascc : ndarray of ASCC_DTYPE, the star id of each row
        rows : ndarray of FAST_DTYPE or SLOW_DTYPE
        """
        with _PieceReader(self, kind, batches) as reader:
            return reader.bucket(bucket)

    def stars(self, batches: Sequence[int] | None = None) -> np.ndarray:
        """Catalogue rows of all stars of ``batches`` (default: all), one per id.

        Where batches disagree, the row of the lowest batch number wins.
        """
        batches = sorted(self.batches) if batches is None else sorted(batches)
        parts = [np.load(self.splitdir / self.entry(b)["files"]["stars"]) for b in batches]
        if not parts:
            return np.empty(0, STAR_DTYPE)
        allstars = np.concatenate(parts)
        _, first = np.unique(allstars["ascc"], return_index=True)  # first occurrence = lowest batch
        return allstars[np.sort(first)]

    def star_rows(self, ascc: str, kind: str = "fast", batches: Sequence[int] | None = None) -> np.ndarray:
        """All rows of one star in the store, sorted by lstseq (``FAST_DTYPE``/``SLOW_DTYPE``)."""
        sid = np.array([ascc], dtype=ASCC_DTYPE)
        bucket = int(_star_key(sid)[0] % np.uint64(self.nbuckets))
        ascc, rows = self.bucket_rows(bucket, kind, batches)
        return rows[ascc == sid[0]]

    def _diagnostic_rows(self, batch: int) -> dict[str, np.ndarray]:
        """The diagnostic stars' piece rows (``fast``, ``slow``) and catalogue rows (``stars``) of one batch.

        Read from the batch's pieces (only the buckets of those stars) once per
        batch content and kept, so that refreshing the diagnostics after every
        batch costs one batch's worth of reading, not the whole night's.
        """
        e = self.entry(batch)
        hit = self._diag_cache.get(batch)
        if hit is not None and hit[0] == e["sha256"]:
            return hit[1]
        ids = np.array(self.diagnostic_ids, dtype=ASCC_DTYPE)
        buckets = sorted({int(k) for k in _star_key(ids) % np.uint64(self.nbuckets)})
        out: dict[str, np.ndarray] = {}
        for kind in _KINDS:
            with _PieceReader(self, kind, [batch]) as reader:
                rows = np.concatenate([reader.raw(bk) for bk in buckets])
            out[kind] = rows[np.isin(rows["ascc"], ids)]
        stars = np.load(self.splitdir / e["files"]["stars"])
        out["stars"] = stars[np.isin(stars["ascc"], ids)]
        self._diag_cache[batch] = (e["sha256"], out)
        return out

    def _diagnostics_digest(self) -> str:
        """sha256 over the diagnostic star ids and the registered (batch, sha256) pairs the file is made of."""
        h = hashlib.sha256(json.dumps(self.diagnostic_ids).encode())
        for b, sha in sorted(self.batches.items()):
            h.update(f"{b}:{sha};".encode())
        return h.hexdigest()

    def ensure_diagnostics(self) -> bool:
        """Rewrite ``diagnostics.hdf5`` unless it was made from the registered batches as they are; True if rewritten.

        A batch counts as split once registered, before its diagnostics are
        written: a failure in between (a full disk) left the file a batch
        behind, and a resumed night, whose batches are all registered, never
        rewrote it. The combine and every :meth:`add` call this.
        """
        if not self.diagnostic_ids:
            return False
        path = self.workdir / self.DIAGNOSTICS
        try:
            with h5py.File(path, "r") as f:
                current = f.attrs.get("mascara_digest") == self._diagnostics_digest()
        except (OSError, KeyError):
            current = False
        if current:
            return False
        self.write_diagnostics()
        return True

    def write_diagnostics(self) -> str:
        """Rewrite ``diagnostics.hdf5`` from the store (atomic).

        Layout: ``fast/<ascc>`` and ``slow/<ascc>`` light curves sorted by lstseq,
        ``header/<ascc>`` one HEADER_DTYPE row, root attrs ``nbatches``, ``last_batch``.
        The same content as :meth:`star_rows` and :meth:`stars` give for these stars.
        """
        path = self.workdir / self.DIAGNOSTICS
        batches = sorted(self.batches)
        parts = [self._diagnostic_rows(b) for b in batches]
        for b in list(self._diag_cache):
            if str(b) not in self._registry["batches"]:
                del self._diag_cache[b]
        if parts:
            allstars = np.concatenate([p["stars"] for p in parts])
            _, first = np.unique(allstars["ascc"], return_index=True)  # first occurrence = lowest batch
            stars = allstars[np.sort(first)]
        else:
            stars = np.empty(0, STAR_DTYPE)
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for kind in _KINDS:
            rows = np.concatenate([p[kind] for p in parts]) if parts else np.empty(0, _PIECE_DTYPES[kind])
            curves[kind] = _group_runs(rows, kind)
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["nbatches"] = len(batches)
                f.attrs["last_batch"] = batches[-1] if batches else -1
                f.attrs["mascara_digest"] = self._diagnostics_digest()
                for kind in _KINDS:
                    g = f.create_group(kind)
                    ascc, plain = curves[kind]
                    for sid in self.diagnostic_ids:
                        g.create_dataset(sid, data=plain[ascc == sid.encode()])
                h = f.create_group("header")
                for sid in self.diagnostic_ids:
                    rows = f["fast"][sid][()]
                    sel = stars[stars["ascc"] == sid.encode()]
                    hdr = np.zeros(1, HEADER_DTYPE)
                    if sel.size:
                        for n in STAR_DTYPE.names[1:]:
                            hdr[n] = sel[n][0]
                    hdr["jdstart"] = rows["jdmid"][0] if rows.size else np.nan
                    hdr["nobs"] = rows.size
                    h.create_dataset(sid, data=hdr)
        return str(path)


class _PieceReader:
    """Reads bucket slices of the pieces of many batches with plain file reads.

    Plain reads rather than memory maps keep the resident memory to the bucket
    being combined (mapped pages of every batch would count as resident).
    """

    def __init__(self, splitter: StarSplitter, kind: str, batches: Sequence[int] | None) -> None:
        self.kind = kind
        self.dtype = _PIECE_DTYPES[kind]
        self.files: list[tuple[Any, int, list[int]]] = []
        for b in sorted(splitter.batches) if batches is None else sorted(batches):
            e = splitter.entry(b)
            if e is None:
                raise KeyError(f"batch {b} is not in {splitter.workdir}")
            f = open(splitter.splitdir / e["files"][kind], "rb")
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"{f.name}: unsupported .npy version {version}")
            _, _, dtype = read_header[version](f)
            if np.dtype(dtype) != self.dtype:
                raise ValueError(f"{f.name}: unexpected piece layout")
            self.files.append((f, f.tell(), e["offsets"][kind]))

    def __enter__(self) -> _PieceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for f, _, _ in self.files:
            f.close()

    def bucket(self, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``bucket`` over all batches, grouped by star, sorted by lstseq, unique.

        Returns ``(ascc, rows)`` as :func:`_group_runs`.
        """
        return _group_runs(self.raw(bucket), self.kind)

    def raw(self, bucket: int) -> np.ndarray:
        """Piece rows of ``bucket`` over all batches, concatenated in batch order (not grouped)."""
        counts = [off[bucket + 1] - off[bucket] for _, _, off in self.files]
        rows = np.empty(sum(counts), self.dtype)
        at = 0
        for (f, data_start, off), n in zip(self.files, counts):
            if n:
                f.seek(data_start + off[bucket] * self.dtype.itemsize)
                f.readinto(memoryview(rows[at : at + n].view(np.uint8)))
                at += n
        return rows


def _group_runs(rows: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Group piece rows by star, each star sorted by lstseq; of equal (star, lstseq) keep the first.

    ``rows`` is the concatenation, in batch order, of per-batch runs already
    sorted by (key, lstseq); batches cover disjoint, increasing lstseq ranges, so
    a stable sort by key alone (a merge of sorted runs) orders every star by
    lstseq. Should an assumption fail (hash collision, out-of-order rows), a
    full sort by (ascc, lstseq) takes over.

    Returns
    -------
    ascc : ndarray of ASCC_DTYPE
        Star id of each output row.
    plain : ndarray of FAST_DTYPE or SLOW_DTYPE
        The rows without key and id, contiguous.
    """
    dtype = FAST_DTYPE if kind == "fast" else SLOW_DTYPE
    if rows.size == 0:
        return np.empty(0, ASCC_DTYPE), np.empty(0, dtype)
    key = rows["key"]
    order = np.argsort(key, kind="stable")
    ascc, key_s = rows["ascc"][order], key[order]
    new_star = np.r_[True, key_s[1:] != key_s[:-1]]
    starts = np.flatnonzero(new_star)
    same_id = ascc == np.repeat(ascc[starts], np.diff(np.r_[starts, rows.size]))
    step = np.diff(rows["lstseq"][order].astype(np.int64))
    if not same_id.all() or np.any((step < 0) & ~new_star[1:]):
        order = np.lexsort((rows["lstseq"], rows["ascc"]))
        ascc = rows["ascc"][order]
        new_star = np.r_[True, ascc[1:] != ascc[:-1]]
        step = np.diff(rows["lstseq"][order].astype(np.int64))
    keep = np.r_[True, (step != 0) | new_star[1:]]
    if not keep.all():
        order, ascc = order[keep], ascc[keep]
    # One gather of the trailing bytes (the FAST/SLOW record) is far cheaper
    # than a structured gather followed by a field-by-field copy.
    skip = rows.dtype.fields[dtype.names[0]][1]
    raw = rows.view(np.uint8).reshape(rows.size, rows.dtype.itemsize)
    plain = raw[order, skip:].view(dtype).reshape(order.size)
    return ascc, plain


#: How often an idle splitter process checks that the process that started it is still there (s).
PARENT_CHECK_SECONDS = 1.0


def run_splitter_process(
    queue: Any,
    workdir: str | os.PathLike[str],
    diagnostic_ids: Iterable[str] = (),
    results: Any = None,
    parent_pid: int | None = None,
) -> None:
    """Split batch files named on ``queue`` until it yields None (a Process target).

    Parameters
    ----------
    queue : multiprocessing.Queue-like
        Yields batch-file paths, or ``(path, sha256)`` pairs when the sha256 is
        known (``None`` if not), or ``(path, sha256, tag)``; ``None`` ends the loop.
    workdir : path-like
        The :class:`StarSplitter` store.
    diagnostic_ids : iterable of str
        Stars kept in ``workdir/diagnostics.hdf5``.
    results : Queue-like, optional
        Receives ``(path, "added" | "skipped" | "error: <msg>")`` per item,
        followed by the item's tag if it had one.
    parent_pid : int, optional
        The pid of the process that started this one (``os.getpid()`` there);
        default: the parent when this function starts, which misses a parent
        killed while the new process was still starting.

    Notes
    -----
    A batch that fails to split is logged and reported, and the loop goes on:
    :func:`combine_night` re-adds every batch the registry lacks. The loop
    also ends when the process that started this one is gone (killed: no
    None will ever come; checked before each item, so that the batches a
    killed run queued are not split after it); it would otherwise wait for
    ever, holding the killed command's output pipes open. A store that
    cannot be opened ends the process, with ``("", "fatal: <why>")`` on
    ``results``.
    """
    if parent_pid is not None:  # a process of its own: Ctrl-C at the terminal is the parent's to handle
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (it stops this process; no traceback from here)

        def _terminated(signum: int, frame: Any) -> None:
            # SIGTERM (a run that failed or was interrupted stops its splitter) as an exit that unwinds the
            # write in progress: atomic_path then removes its temporary file instead of leaving it behind
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _terminated)
        _collector.adopt()  # what the spawn loaded stays out of its collections, and out of its exit's
        try:
            _split_until_none(queue, workdir, diagnostic_ids, results, parent_pid)
        finally:
            _collector.exiting()
    else:
        _split_until_none(queue, workdir, diagnostic_ids, results, os.getppid())


def _split_until_none(queue: Any, workdir: str | os.PathLike[str], diagnostic_ids: Iterable[str], results: Any,
                      parent: int) -> None:
    """The loop of :func:`run_splitter_process`, in a process whose parent is ``parent``."""
    from queue import Empty

    try:
        splitter = StarSplitter(workdir, diagnostic_ids)
    except Exception as exc:  # noqa: BLE001 - said to whoever waits for outcomes, not only to stderr
        log.exception("the splitter of %s could not open its store", workdir)
        if results is not None:
            results.put(("", f"fatal: could not open the split store {workdir}: {type(exc).__name__}: {exc}"))
        return
    idle = object()
    while True:
        try:
            item = queue.get(timeout=PARENT_CHECK_SECONDS)
        except Empty:
            item = idle
        if os.getppid() != parent:  # checked before every item too: a killed run's queue is not worked through
            log.warning("the process that started the splitter of %s is gone; stopping", workdir)
            return
        if item is idle:
            continue
        if item is None:
            return
        item, sha, *tag = item if isinstance(item, tuple) else (item, None)
        faults.checkpoint("splitting")
        status = split_outcome(splitter, item, sha)
        if results is not None:
            results.put((os.fspath(item), status, *tag))


def split_outcome(splitter: StarSplitter, batch_path: str | os.PathLike[str], sha256: str | None = None) -> str:
    """:meth:`StarSplitter.add` of one batch file as an outcome: ``"added"``, ``"skipped"`` (split before, the
    same content) or ``"error: <why>"`` (logged; the combine re-adds every batch the store lacks)."""
    try:
        return "added" if splitter.add(batch_path, sha256) else "skipped"
    except Exception as exc:  # noqa: BLE001 - keep splitting the rest of the night
        log.exception("splitting %s failed", batch_path)
        return f"error: {exc}"


# --------------------------------------------------------------------------- #
# night files


def night_file_names(night_id: str) -> tuple[str, str]:
    """File names of a camera-night's fLC and sLC files, e.g. ``fLC_20150202LPE.hdf5``."""
    return f"fLC_{night_id}.hdf5", f"sLC_{night_id}.hdf5"


def global_attrs_for_slow(global_attrs: Mapping[str, Any], slow_apertures: Sequence[float]) -> dict[str, Any]:
    """sLC ``global`` attributes: the fLC ones with NAPER/APERk of the binned apertures."""
    out: dict[str, Any] = {}
    for k in GLOBAL_ATTRS:
        if k == "NAPER":
            out[k] = len(slow_apertures)
        elif k == "APER0":
            for i, r in enumerate(slow_apertures):
                out[f"APER{i}"] = float(r)
        elif k.startswith("APER"):
            continue
        else:
            out[k] = global_attrs[k]
    out.update({k: global_attrs[k] for k in CALIBRATION_ATTRS if k in global_attrs})
    return out


def _check_global_attrs(global_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The SPEC attributes in order, then any of the optional calibration ones."""
    keys = set(global_attrs)
    extra = keys - set(GLOBAL_ATTRS) - set(CALIBRATION_ATTRS)
    if not set(GLOBAL_ATTRS) <= keys or extra:
        raise ValueError(
            f"global_attrs must have exactly {GLOBAL_ATTRS} (optionally {CALIBRATION_ATTRS}); "
            f"missing {sorted(set(GLOBAL_ATTRS) - keys)}, unexpected {sorted(extra)}"
        )
    return {k: global_attrs[k] for k in GLOBAL_ATTRS + CALIBRATION_ATTRS if k in global_attrs}


def _resolve_inputs(
    batch_paths: Iterable[str | os.PathLike[str]], splitter: StarSplitter | None
) -> dict[int, tuple[str, str]]:
    """Map batch number -> (path, sha256) of the input files, duplicates removed."""
    by_path: dict[str, str] = {}
    for p in batch_paths:
        by_path[os.path.abspath(p)] = ""
    known: dict[str, tuple[int, str, list[int] | None]] = {}
    if splitter is not None:
        known = {e["path"]: (int(b), e["sha256"], e.get("stat")) for b, e in splitter._registry["batches"].items()}
    out: dict[int, tuple[str, str]] = {}
    for p in sorted(by_path):
        if os.path.exists(p):
            st = os.stat(p)
            if p in known and known[p][2] == [st.st_size, st.st_mtime_ns]:
                b, sha = known[p][:2]  # split from this very file (same size and mtime): skip hashing
            else:
                sha, b = file_sha256(p), _read_batch_number(p)
        elif p in known:  # the temporary batch file is gone but was split
            b, sha = known[p][:2]
        else:
            raise FileNotFoundError(p)
        if b in out and out[b][1] != sha:
            raise BatchConflictError(f"batch {b}: {out[b][0]} and {p} differ")
        out.setdefault(b, (p, sha))
    return out


def _input_digest(night_id: str, fast_attrs: Mapping[str, Any], slow_attrs: Mapping[str, Any], inputs: Mapping[int, tuple[str, str]]) -> str:
    blob = _canonical_json(
        {
            "format_version": FORMAT_VERSION,
            "night": night_id,
            "fLC_global": dict(fast_attrs),
            "sLC_global": dict(slow_attrs),
            "batches": [[b, inputs[b][1]] for b in sorted(inputs)],
        }
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _existing_if_current(path: str, digest: str) -> str | None:
    """sha256 of ``path`` if it exists and was made from inputs with ``digest``, else None."""
    if not os.path.exists(path):
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get(INPUT_DIGEST_ATTR) != digest:
                return None
    except OSError:
        return None
    side = path + ".json"
    with contextlib.suppress(OSError, ValueError):
        man = json.loads(Path(side).read_text())
        # Same inputs give the same bytes, so a manifest with this digest describes this file.
        if man.get("input_digest") == digest and man.get("size") == os.path.getsize(path):
            return str(man["sha256"])
    sha = file_sha256(path)
    _write_manifest(path, digest, sha)
    return sha


def _write_manifest(path: str, digest: str, sha: str) -> None:
    _write_json_atomic(
        path + ".json",
        {"file": os.path.basename(path), "sha256": sha, "size": os.path.getsize(path), "input_digest": digest},
    )


class _DatasetWriter:
    """Creates many small contiguous datasets of one compound type quickly.

    h5py's ``create_dataset`` costs ~150-300 us per call, mostly HDF5 comparing
    and converting the 18-member compound type on every write; 100,000 datasets
    per night made that the bottleneck. Here the HDF5 type is prepared once,
    each dataset's storage is allocated at creation (contiguous, no fill) and
    its bytes are written with ``os.pwrite`` at the address HDF5 reports. This
    is valid because the file type is the numpy layout itself (same size, same
    member offsets, little-endian), checked at construction; otherwise the
    ordinary ``H5Dwrite`` path is used. No timestamps are stored.
    """

    def __init__(self, dtype: np.dtype, raw_fd: int | None) -> None:
        self.dtype = dtype
        self.tid = h5py.h5t.py_create(dtype, logical=True)
        self.dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        self.dcpl.set_obj_track_times(False)  # no timestamps: same inputs, same bytes
        self.dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        self.dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        self.raw_fd = raw_fd if self._same_layout() else None

    def _same_layout(self) -> bool:
        if sys.byteorder != "little" or self.tid.get_size() != self.dtype.itemsize:
            return False
        for i in range(self.tid.get_nmembers()):
            name = self.tid.get_member_name(i).decode()
            member = self.tid.get_member_type(i)
            if (
                name != self.dtype.names[i]
                or self.tid.get_member_offset(i) != self.dtype.fields[name][1]
                or (isinstance(member, h5py.h5t.TypeAtomicID) and member.get_order() != h5py.h5t.ORDER_LE)
                or not self.dtype.fields[name][0].isnative
            ):
                return False
        return True

    def write(self, group: h5py.Group, name: str, data: np.ndarray) -> None:
        if data.dtype != self.dtype:
            raise TypeError(f"{name}: dtype {data.dtype} is not {self.dtype}")
        space = h5py.h5s.create_simple((data.size,))
        dset = h5py.h5d.create(group.id, name.encode(), self.tid, space, dcpl=self.dcpl)
        if not data.size:
            return
        data = np.ascontiguousarray(data)
        address = dset.get_offset() if self.raw_fd is not None else None
        if address is None:
            dset.write(space, space, data, mtype=self.tid)
            return
        buf = memoryview(data.view(np.uint8))
        while buf.nbytes:
            n = os.pwrite(self.raw_fd, buf, address)
            buf, address = buf[n:], address + n


def _write_night_file(
    path: str,
    kind: str,
    splitter: StarSplitter,
    batches: Sequence[int],
    stars: np.ndarray,
    gattrs: Mapping[str, Any],
    digest: str,
) -> tuple[str, int]:
    """Write one fLC/sLC file from the splitter's buckets; return (sha256, nstars)."""
    dtype = FAST_DTYPE if kind == "fast" else SLOW_DTYPE
    cat = stars[np.argsort(stars["ascc"], kind="stable")]
    heads: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    with atomic_path(path) as tmp, contextlib.ExitStack() as stack:
        f = stack.enter_context(h5py.File(tmp, "w"))
        raw_fd = os.open(tmp, os.O_WRONLY)
        stack.callback(os.close, raw_fd)  # closed after h5py (LIFO): HDF5 never sees it
        f.attrs[INPUT_DIGEST_ATTR] = digest
        g = f.create_group("global")
        for k, v in gattrs.items():
            g.attrs[k] = v
        data = f.create_group("data")
        data_writer = _DatasetWriter(dtype, raw_fd)
        with _PieceReader(splitter, kind, batches) as reader:
            for bucket in range(splitter.nbuckets):
                rows_ascc, plain = reader.bucket(bucket)
                if plain.size == 0:
                    continue
                starts = np.flatnonzero(np.r_[True, rows_ascc[1:] != rows_ascc[:-1]])
                stops = np.r_[starts[1:], plain.size]
                bucket_ids = rows_ascc[starts]
                for sid, a, z in zip(bucket_ids.tolist(), starts.tolist(), stops.tolist()):
                    data_writer.write(data, sid.decode(), plain[a:z])
                at = np.minimum(np.searchsorted(cat["ascc"], bucket_ids), max(cat.size - 1, 0))
                if cat.size == 0 or np.any(cat["ascc"][at] != bucket_ids):
                    raise ValueError(f"stars of bucket {bucket} have rows but no catalogue entry")
                hdr = np.zeros(starts.size, HEADER_DTYPE)
                for n in STAR_DTYPE.names[1:]:
                    hdr[n] = cat[n][at]
                hdr["jdstart"] = plain["jdmid"][starts]
                hdr["nobs"] = stops - starts
                heads.append(hdr)
                ids.append(bucket_ids)
        hdr = np.concatenate(heads) if heads else np.zeros(0, HEADER_DTYPE)
        ascc = np.concatenate(ids) if ids else np.zeros(0, ASCC_DTYPE)
        order = _ascc_sort_key(ascc)
        hdr, ascc = hdr[order], ascc[order]
        hgroup = f.create_group("header")
        hwriter = _DatasetWriter(HEADER_DTYPE, raw_fd)
        for i, sid in enumerate(ascc.tolist()):
            hwriter.write(hgroup, sid.decode(), hdr[i : i + 1])
        table = f.create_group("header_table")
        for n in HEADER_TABLE_FIELDS:
            table.create_dataset(n, data=ascc if n == "ascc" else hdr[n])
    return file_sha256(path), int(ascc.size)


def combine_night(
    batch_paths: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    night_id: str,
    global_attrs: Mapping[str, Any],
    workdir: str | os.PathLike[str] | None = None,
    *,
    slow_apertures: Sequence[float] = (2.5, 3.5, 4.5, 5.5),
) -> dict[str, Any]:
    """Combine a camera-night's batch files into ``fLC_<night_id>.hdf5`` and ``sLC_<night_id>.hdf5``.

    Parameters
    ----------
    batch_paths : iterable of path-like
        The night's batch files, any order. The same batch number given twice
        is kept once if both files are identical; different content raises
        :class:`BatchConflictError`. With ``workdir``, a path that no longer
        exists but is registered in the splitter is accepted.
    out_dir : path-like
        Output directory (``<night-dir>/lightcurves``), created if missing.
    night_id : str
        ``YYYYMMDD`` + site + camera, e.g. ``'20150202LPE'``.
    global_attrs : mapping
        Exactly the keys of ``GLOBAL_ATTRS`` (values for the fLC ``global`` group).
        The sLC gets the same values except NAPER = ``len(slow_apertures)`` and
        APER0..APER{n-1} = ``slow_apertures`` (``SLOW_GLOBAL_ATTRS`` for n = 4).
    workdir : path-like, optional
        A :class:`StarSplitter` store. Batches it lacks (or holds with other
        content) are added first; batches it holds that are not in
        ``batch_paths`` are ignored. Without it a temporary store in ``out_dir``
        is used and removed afterwards.
    slow_apertures : sequence of float
        Radii (px) of the binned-image apertures, in flux0..flux3 order.

    Returns
    -------
    dict
        ``fLC``, ``sLC`` (paths), ``nstars_fast``, ``nstars_slow``,
        ``sha256_fLC``, ``sha256_sLC``, ``input_digest``, ``rewritten`` (bool).

    Notes
    -----
    Layout (SPEC §8): root groups ``data global header header_table``;
    ``data/<ascc>`` sorted by lstseq with unique lstseq; ``header/<ascc>`` one
    HEADER_DTYPE row; ``header_table/<field>`` one entry per star, ordered by
    id (numerically when every id is a number). The root group carries one
    attribute, ``mascara_input_digest`` (sha256 over night id, global attrs and
    the sorted (batch, sha256) pairs); a manifest ``<file>.json`` beside each
    file stores its sha256. If both files exist with the digest of these
    inputs, nothing is rewritten. Both files are written atomically; the
    output bytes do not depend on the order of ``batch_paths``.

    Input files are identified by their sha256; with ``workdir``, a file the
    splitter registered with the same path, size and mtime is not hashed again.
    Call it after the splitter process has finished (single writer per workdir).
    Cost at full size (5,000 frames, 25,000 stars): see bench/combine_night.py.
    """
    fast_attrs = _check_global_attrs(global_attrs)
    slow_attrs = global_attrs_for_slow(fast_attrs, slow_apertures)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fname, sname = (str(out_dir / n) for n in night_file_names(night_id))
    splitter = StarSplitter(workdir) if workdir is not None else None
    inputs = _resolve_inputs(batch_paths, splitter)
    digest = _input_digest(night_id, fast_attrs, slow_attrs, inputs)
    result: dict[str, Any] = {"fLC": fname, "sLC": sname, "input_digest": digest}

    fsha, ssha = _existing_if_current(fname, digest), _existing_if_current(sname, digest)
    if fsha is not None and ssha is not None:
        with h5py.File(fname, "r") as f, h5py.File(sname, "r") as s:
            nf, ns = f["header_table/ascc"].size, s["header_table/ascc"].size
        return result | {"nstars_fast": nf, "nstars_slow": ns, "sha256_fLC": fsha, "sha256_sLC": ssha, "rewritten": False}

    # Leftovers of a combine killed mid-way (never under the final names); single writer per night.
    for stale in glob.glob(str(out_dir / f".?LC_{night_id}.hdf5.*.tmp")):
        with contextlib.suppress(OSError):
            os.remove(stale)
    for stale in glob.glob(str(out_dir / f".combine-{night_id}-*")):
        shutil.rmtree(stale, ignore_errors=True)

    tmpdir = None
    if splitter is None:
        tmpdir = tempfile.mkdtemp(prefix=f".combine-{night_id}-", dir=out_dir)
        splitter = StarSplitter(tmpdir)
    try:
        for b, (p, sha) in sorted(inputs.items()):
            e = splitter.entry(b)
            if e is None or e["sha256"] != sha or not splitter._files_present(e):
                splitter.add(p, sha256=sha)
        batches = sorted(inputs)
        stars = splitter.stars(batches)
        faults.checkpoint("combine_before_flc")
        fsha, nf = _write_night_file(fname, "fast", splitter, batches, stars, fast_attrs, digest)
        _write_manifest(fname, digest, fsha)
        faults.checkpoint("combine_after_flc")
        ssha, ns = _write_night_file(sname, "slow", splitter, batches, stars, slow_attrs, digest)
        _write_manifest(sname, digest, ssha)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return result | {"nstars_fast": nf, "nstars_slow": ns, "sha256_fLC": fsha, "sha256_sLC": ssha, "rewritten": True}


def read_star(path: str | os.PathLike[str], ascc: str) -> tuple[np.ndarray, np.ndarray]:
    """Light curve and header of one star of an fLC/sLC file.

    Returns
    -------
    data : ndarray of FAST_DTYPE (fLC) or SLOW_DTYPE (sLC), sorted by lstseq
    header : ndarray of HEADER_DTYPE, shape (1,)
    """
    with h5py.File(path, "r") as f:
        return f["data"][str(ascc)][()], f["header"][str(ascc)][()]


def read_header_table(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The ``header_table`` group of an fLC/sLC file as a dict of 1-D arrays."""
    with h5py.File(path, "r") as f:
        return {n: f["header_table"][n][()] for n in HEADER_TABLE_FIELDS}
