"""MASCARA reduction pipeline: raw all-sky frames to per-star light curves."""

from __future__ import annotations

__version__ = "0.1.0"
