"""Small real disks for the tests of a full device: tmpfs mounts (root only; the tests skip elsewhere)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def mount_tmpfs(where: Path, size: int | str) -> Path:
    """Mount a tmpfs of ``size`` (bytes, or mount's own notation: ``256k``) on the new directory ``where``."""
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    return where


def resize(where: Path, size: int | str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Write a file as large as the device takes (unbuffered: nothing is left to fail at close); returns it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    assert os.statvfs(disk).f_bavail == 0
    return filler
