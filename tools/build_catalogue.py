"""Rebuild mascara/data/hip2_v10.npz, the shipped default star catalogue.

Usage: python tools/build_catalogue.py [out.npz]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mascara.stars import DEFAULT_FILE, build_default_catalogue

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "mascara" / "data" / DEFAULT_FILE
    t0 = time.perf_counter()
    cat = build_default_catalogue(out)
    print(f"{len(cat)} stars, {int(cat.blend.sum())} blended -> {out} "
          f"({out.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - t0:.1f} s)")
    print("fingerprint", cat.fingerprint())
