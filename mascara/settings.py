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
