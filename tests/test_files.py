"""Writes on a device that fills up (mascara._files): a real tmpfs of a few hundred kB, mounted for the test.

An outside trial filled the disk under a reduction: nothing was lost, but the
errors named hidden temporary files in h5py's or numpy's words ("14307
requested and 1641 written"), and some writers left their temporary files.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from diskkit import fill, mount_tmpfs, unmount
from mascara._files import DiskFull, atomic_path


@pytest.fixture
def disk_of(tmp_path):  # type: ignore[no-untyped-def]
    """Mounts a tmpfs of a given size (root only: skipped where mounting is not allowed)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mounted.append(mount_tmpfs(tmp_path / f"disk{len(mounted)}", size))
        return mounted[-1]

    yield mount
    for where in mounted:
        unmount(where)


@pytest.fixture
def small_disk(disk_of):  # type: ignore[no-untyped-def]
    """A 256 kB tmpfs."""
    return disk_of("256k")


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_an_hdf5_file_that_does_not_fit_names_the_file_and_the_full_device(small_disk):
    path = small_disk / "batch_1301755.h5"
    with pytest.raises(DiskFull) as err:
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f["data"] = np.arange(200_000, dtype=np.float64)  # 1.6 MB
    text = str(err.value)
    assert str(path) in text and "No space left on device" in text and "MB free there" in text, text
    assert ".tmp" not in text  # the file the user knows, not the hidden temporary one
    assert _leftovers(small_disk) == []  # neither a final nor a temporary file


def test_a_numpy_short_write_on_a_full_device_is_named_as_such(small_disk):
    path = small_disk / "01301755-ab.fast.npy"
    with pytest.raises(DiskFull, match=r"01301755-ab\.fast\.npy not written"):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.arange(200_000, dtype=np.float64).tofile(f)
    assert _leftovers(small_disk) == []


def test_other_errors_pass_unchanged_and_a_file_that_fits_is_written(small_disk):
    path = small_disk / "a.json"
    with pytest.raises(ValueError, match="not a disk problem"):
        with atomic_path(path) as tmp:
            Path(tmp).write_text("{}")
            raise ValueError("not a disk problem")
    assert _leftovers(small_disk) == []
    with atomic_path(path, durable=False) as tmp:
        Path(tmp).write_text("{}")
    assert path.read_text() == "{}" and _leftovers(small_disk) == ["a.json"]


def test_the_night_lock_holds_on_a_full_disk_though_its_holder_cannot_be_written(small_disk):
    """The trial's run failed with a bare ENOSPC while writing who holds ``.mascara.lock`` and stayed
    ``running`` in its catalog: the holder is information, the lock is the flock, which still holds."""
    from mascara import nightlock

    night = small_disk / "20260301LPE"
    night.mkdir()
    fill(small_disk)
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    assert nightlock.acquire(night, run_id, "sqlite:///a.sqlite") is True
    try:
        other = subprocess.run([sys.executable, "-c", (
            "import sys; from mascara import nightlock\n"
            "try:\n    nightlock.acquire(sys.argv[1], 'other', 'sqlite:///b.sqlite', wait=0)\n"
            "except nightlock.NightLocked as e:\n    print('refused:', e); sys.exit(3)\n"), str(night)],
            capture_output=True, text=True, timeout=60)
        assert other.returncode == 3, other.stdout + other.stderr
    finally:
        nightlock.release(run_id)


def test_status_shows_an_error_past_its_line_breaks():
    from mascara.catalog.commands import _why

    row = {"state": "failed", "phase": "reducing",
           "error": "OSError: [Errno 28] Can't close file (file write failed: time = Sun Dec  6 07:08:26 2026\n"
                    ", filename = 'batch_1301756.h5', error message = 'No space left on device')"}
    why = _why(row)
    assert why.startswith("while reducing: OSError") and "No space left on device" in why and "\n" not in why


def test_a_small_array_whose_tail_numpy_failed_to_write_is_never_renamed_into_place(small_disk):
    """numpy writes an array through the file descriptor and loses a failed tail silently: a 2.5 kB
    array on a full device became a file of the wrong size under its final name (np.save raised nothing)."""
    from mascara._files import save_npy

    fill(small_disk)
    path = small_disk / "binned_1301755.npy"
    with pytest.raises(DiskFull, match="binned_1301755.npy not written"):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            save_npy(f, np.arange(300, dtype=np.float64))
    assert _leftovers(small_disk) == ["filler"]


def test_a_large_short_write_is_judged_before_its_temporary_file_frees_the_room(disk_of):
    """The room a failed write took is free again once its temporary file is removed: judged after that,
    a numpy short write of more than 1 MB was not called a full device."""
    from mascara._files import save_npy

    disk = disk_of("4m")
    path = disk / "master_dark.npy"
    with pytest.raises(DiskFull, match=r"master_dark.npy not written: short write on a full device \(0.0 MB"):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            save_npy(f, np.zeros(1_000_000, dtype=np.float64))  # 8 MB
    assert _leftovers(disk) == []
