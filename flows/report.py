"""What a person reads in the Prefect UI about a night: tables and markdown artifacts with the quick-look figures.

The text is built by plain functions (tested without a server); ``publish_*``
hand it to Prefect.  Figures are embedded as ``data:image/png;base64`` URIs,
which the Prefect UI renders in markdown artifacts; each is a palette PNG of
10-40 kB (:mod:`mascara.quicklook`), so an artifact stays around 100 kB and
the UI fast over a season of nights.  Paths are plain text: browsers do not
open ``file://`` links from an http page.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Figures embedded in a camera-night's quick-look artifact, with their captions.
CAPTIONS = {
    "lightcurves": "Diagnostic stars: flux / median per frame (dots) and per binned image (circles)",
    "sky": "Sky level and transparency (measured / expected flux of bright stars) per frame",
    "astrometry": "Astrometric residual and pointing drift per batch",
    "frames": "Frames accepted and rejected per batch, by reason",
    "thumbnail": "Binned image of one batch with catalogue positions",
}
#: Column headers that say what the star counts are.
STARS_FLC = "fLC stars (per frame, V<={vmag_fast})"
STARS_SLC = "sLC stars (binned, V<={vmag_slow})"


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lower-case letters, digits and dashes) from name parts."""
    return "-".join(p.lower().replace("_", "-").replace("+", "-") for p in parts if p)


def human_size(nbytes: int | None) -> str:
    """``1.2 MB``, ``34 kB``, ``512 B``; ``-`` for unknown (a directory)."""
    if nbytes is None:
        return "-"
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.2f} GB"
    if nbytes >= 1e6:
        return f"{nbytes / 1e6:.1f} MB"
    if nbytes >= 1e3:
        return f"{nbytes / 1e3:.0f} kB"
    return f"{nbytes} B"


def png_markdown(path: str | Path, caption: str) -> str:
    """A markdown image of a PNG file, embedded as a base64 data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{caption}](data:image/png;base64,{data})"


def _md_cell(v: Any) -> str:
    return "-" if v is None else str(v).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of dicts (columns of the first row)."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_md_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def camera_night_row(night_id: str, state: str, summary: Mapping[str, Any] | None, files: Sequence[Mapping] = (),
                     quality: Mapping[str, Any] | None = None, settings: Mapping[str, Any] | None = None,
                     message: str = "") -> dict[str, Any]:
    """One row of a night's table: a camera-night's state, frames, quality, star counts and fLC size."""
    s = summary or {}
    q = quality or {}
    st = settings or {"vmag_fast": 8.4, "vmag_slow": 10.0}
    flc = next((f for f in files if f.get("kind") == "fLC"), None)
    def pair(a: Any, b: Any) -> str | None:
        return None if a is None else f"{a} / {b if b is not None else '-'}"

    low = len(q.get("batches_low_transparency", [])) if q else None
    return {
        "camera-night": night_id,
        "state": state,
        # why a night did not succeed comes first after its state: a wide table must not hide it
        "note": message[:160] if state != "succeeded" else "",
        "frames ok / rejected": pair(s.get("frames"), s.get("rejected")),
        "batches (low transparency)": None if s.get("batches") is None else f"{s['batches']} ({low or 0})",
        "transparency": q.get("transparency_median"),
        "astrometry rms (px)": s.get("astro_rms_median_px"),
        STARS_FLC.format(**st): s.get("stars_fLC"),
        STARS_SLC.format(**st): s.get("stars_sLC"),
        "fLC size": human_size(flc["size"]) if flc else None,
    }


def outputs_markdown(night_id: str, night_path: str, files: Sequence[Mapping], moves: Sequence = (),
                     settings: Mapping[str, Any] | None = None) -> str:
    """The output files of a camera-night: kind, path (text), size, stars, what the star count means."""
    st = settings or {"vmag_fast": 8.4, "vmag_slow": 10.0}
    meaning = {"fLC": f"stars with per-frame photometry (V <= {st['vmag_fast']})",
               "sLC": f"stars measured on the binned images (V <= {st['vmag_slow']})",
               "diagnostics": "light curves of the diagnostic stars, updated per batch",
               "solution": "the night's camera model"}
    rows = [{"kind": f["kind"], "path": f"`{f['path']}`", "size": human_size(f.get("size")),
             "stars": f.get("nstars") if f.get("nstars") is not None else "-",
             "what": meaning.get(f["kind"], "")} for f in files]
    night = Path(night_path)
    lines = [f"# {night_id}: output files", "", markdown_table(rows), "",
             f"Quick-look figures: `{night / 'quicklook'}/`; astrometry: `{night / 'astrometry'}/`; "
             f"batch files and the split store: `{night / 'work'}/`."]
    if moves:
        lines += ["", "Earlier outputs moved aside before this run:", ""]
        lines += [f"- `{src}` -> `{dst}`" if dst else f"- `{src}` erased" for src, dst in moves]
    return "\n".join(lines)


def quicklook_markdown(night_id: str, figures: Mapping[str, str | Path], night_path: str) -> str:
    """The quick-look figures of a camera-night, embedded, with captions and where the PNGs are."""
    lines = [f"# {night_id} at a glance", "",
             f"PNG files in `{Path(night_path) / 'quicklook'}/`, redrawn while the night is reduced (at most "
             "every few minutes) and at its end; `mascara quicklook` redraws them from `work/`.", ""]
    for name, caption in CAPTIONS.items():
        if name in figures and Path(figures[name]).is_file():
            lines += [f"**{caption}**", "", png_markdown(figures[name], caption), ""]
    return "\n".join(lines)


def night_markdown(night: str, site: str, rows: Sequence[Mapping[str, Any]], figure: str | Path | None) -> str:
    """A night across cameras: the summary figure and the table of camera-nights."""
    lines = [f"# Night {night} at {site}: all cameras", ""]
    if figure is not None and Path(figure).is_file():
        lines += [png_markdown(figure, f"{night} {site}: transparency, sky and astrometry per camera"), "",
                  f"Figure: `{figure}`", ""]
    lines += [markdown_table(rows), "",
              "fLC: light curves from every frame of the stars down to the per-frame limit; sLC: one point per "
              "50-frame batch, measured on the binned image, for stars down to the fainter binned limit. "
              "Transparency 1 is a clear sky; batches below 0.7 are marked low."]
    return "\n".join(lines)


def no_data_markdown(entries: Sequence[tuple[str, str]], limit: int = 30) -> str:
    """Camera-nights without frames: ``[(camera-night, why)]``; the first ``limit`` of them listed."""
    lines = ["# No data", "", "These camera-nights have no frames to reduce (not a failure: e.g. the dome "
             "stayed closed); each is recorded in the catalog as `empty` where the camera is known.", ""]
    lines += [f"- **{cn}**: {why}" for cn, why in entries[:limit]]
    if len(entries) > limit:
        lines.append(f"- ... and {len(entries) - limit} more (`mascara status` lists them)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- publishing (Prefect)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, markdown=markdown, description=description)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(key=key, table=rows, description=description)
