"""Reduction settings: one frozen value that every stage reads, hashed for provenance."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every tunable number of a reduction (SPEC §1, §4, §6, §7).

    Two reductions with equal ``Settings.fingerprint()`` are interchangeable.
    """

    batch_size: int = 50
    gain: float = 0.62  # e-/ADU
    saturation: float = 63000.0  # ADU, raw
    apertures: tuple[float, ...] = (2.5, 4.5)  # px, per frame
    binned_apertures: tuple[float, ...] = (2.5, 3.5, 4.5, 5.5)  # px, binned image
    sky_radii: tuple[float, float] = (6.0, 21.0)  # px, inner/outer annulus radius
    vmag_fast: float = 8.4  # per-frame photometry limit
    vmag_slow: float = 10.0  # binned photometry limit
    vmag_astro: tuple[float, float] = (4.0, 7.5)  # astrometric stars: lo < V <= hi
    astro_isolation_px: float = 15.0  # no other V<=9 star within this distance
    astro_min_stars: int = 25  # fewer matched stars: keep the last solution, flag batch
    astro_max_rms: float = 0.5  # px; above it the batch solution is rejected
    bin_tile: int = 32  # px, tile size of the stacker
    # Stacker resampling: 3 Keys cubic, 1 bilinear, 0 nearest pixel. Nearest-pixel tile shifts
    # leave seams where neighbouring tiles round differently and blur stars by the rounding;
    # bilinear weights widen every star by a fraction-dependent amount (2.5 % of the light of a
    # 2.5 px aperture lost on a FWHM 2 px Moffat); cubic weights keep the width (docs/binning.md).
    bin_order: int = 3
    # Binned fluxes of apertures with a per-frame twin (2.5 px) are corrected for the pixel phase
    # the binned image holds each star at, fitted per batch on the per-frame photometry
    # (mascara.pixelphase, docs/binning.md).
    bin_phase_correction: bool = True
    moon_radius: float = 10.0  # deg; stars closer to the Moon (when it is up) get flag 32
    catalogue: str | None = None  # path of a user catalogue; None = shipped default
    cversion: str = "none"  # calibration version written to files

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of all settings."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Settings":
        if not d:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        conv = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**conv)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def value_problems(d: dict[str, Any]) -> list[str]:
    """What is wrong with the values of a settings overrides dict (names are checked elsewhere), one line each.

    Checked before anything starts, so that a mistake costs a refusal and
    not a run that moved the night's outputs aside and then failed.
    """
    out: list[str] = []

    def bad(name: str, why: str) -> None:
        out.append(f"{name}={d[name]!r}: {why}")

    def numbers(name: str, n: int | None = None) -> list[float] | None:
        v = d[name]
        if not isinstance(v, (list, tuple)) or not v or not all(_number(x) for x in v) or (n and len(v) != n):
            bad(name, f"must be a list of {n or 'one or more'} numbers")
            return None
        return [float(x) for x in v]

    positive_int = {"batch_size", "astro_min_stars", "bin_tile"}
    positive = {"gain", "saturation", "astro_max_rms"}
    non_negative = {"astro_isolation_px", "moon_radius"}
    for name in d:
        v = d[name]
        if name in positive_int:
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                bad(name, "must be a whole number > 0")
        elif name in positive:
            if not (_number(v) and v > 0):
                bad(name, "must be a number > 0")
        elif name in non_negative:
            if not (_number(v) and v >= 0):
                bad(name, "must be a number >= 0")
        elif name in ("vmag_fast", "vmag_slow"):
            if not _number(v):
                bad(name, "must be a number (a V magnitude)")
        elif name in ("apertures", "binned_apertures"):
            r = numbers(name)
            if r is not None and min(r) <= 0:
                bad(name, "radii must be > 0")
        elif name == "sky_radii":
            r = numbers(name, 2)
            if r is not None and not 0 < r[0] < r[1]:
                bad(name, "must be [inner, outer] with 0 < inner < outer")
        elif name == "vmag_astro":
            r = numbers(name, 2)
            if r is not None and not r[0] < r[1]:
                bad(name, "must be [lo, hi] with lo < hi")
        elif name == "bin_order":
            if v not in (0, 1, 3) or isinstance(v, bool):
                bad(name, "must be 3 (cubic), 1 (bilinear) or 0 (nearest)")
        elif name == "bin_phase_correction":
            if not isinstance(v, bool):
                bad(name, "must be true or false")
        elif name == "catalogue":
            if v is not None and not isinstance(v, str):
                bad(name, "must be the path of a catalogue file, or null")
        elif name == "cversion":
            if not isinstance(v, str):
                bad(name, "must be a string")
    return out
