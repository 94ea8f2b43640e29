"""Shared fixtures: simulated nights are made once per test session and reused read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from mascara.simulate import SimConfig, simulate_night


@pytest.fixture(scope="session")
def small_night(tmp_path_factory) -> dict:
    """A small simulated camera-night of 12 frames (one batch) with one broken frame of each kind."""
    datadir = tmp_path_factory.mktemp("data")
    cfg = SimConfig(site="LP", camera="E", size="small", nframes=12, seed=5, bad_frames=3)
    res = simulate_night(datadir, "20260301", cfg)
    res["datadir"] = datadir
    res["night_dir"] = Path(res["night_dir"])
    return res
