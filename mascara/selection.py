"""Which camera-nights a command asks for: the arguments checked before anything slow starts.

``mascprocess`` and the ``reduce-night`` flow both call :func:`select_nights`
first.  It imports nothing beyond the standard library (no numpy, astropy or
Prefect) until the catalog URL is checked, last, with SQLAlchemy's parser, so a
mistake is reported in well under a second; every message names what was
looked for and what exists.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

NIGHT_DIR_RE = re.compile(r"^(?P<night>\d{8})(?P<site>[A-Z]{2})(?P<camera>[NESWC])$")
#: ``raw`` and every name that starts like it (``raw_old``, ``raw_old2``, ``raw_retransfer``, ``raw.bak``,
#: ``raw2``): an earlier or other copy of the frames kept beside ``raw/`` is raw data, never an output (an
#: outside trial's ``raw_retransfer/`` of frames was moved aside, then erased by ``-o``).
RAW_ENTRY_RE = re.compile(r"^raw(?:[_.\-\d].*)?$", re.IGNORECASE)


def is_raw_entry(name: str) -> bool:
    """Whether an entry of a night directory is raw data (``raw`` or a name starting like it): never moved
    or erased."""
    return RAW_ENTRY_RE.match(name) is not None


def is_output_entry(name: str) -> bool:
    """Whether an entry of a night directory is an output: neither raw data nor hidden (the lifecycle's own
    lock file and erase bins)."""
    return not name.startswith(".") and not is_raw_entry(name)


#: Camera letters of a station (SPEC §1).
CAMERAS = ("N", "E", "S", "W", "C")
#: Stations whose coordinates the reduction knows (mascara.timeindex.SITES).
SITES = ("LP", "LS")


class SelectionError(ValueError):
    """Arguments that select nothing, or nothing sensible; the message is one line for the user."""


class NoNightData(SelectionError):
    """Well-formed arguments naming nights for which the data directory holds no night directory.

    For a scheduled run this is an ordinary night without data (dome closed),
    not a mistake. ``expected`` lists the camera-nights that were asked for
    and are missing, as far as they are known: the requested site and camera
    letters, or else the cameras seen on other nights (empty when the data
    directory holds no night at all).
    """

    def __init__(self, message: str, nights: list[str], expected: list[str]):
        super().__init__(message)
        self.nights, self.expected = nights, expected


@dataclasses.dataclass(frozen=True)
class Selection:
    """The validated request: the night directories to reduce and what was asked but is not there."""

    datadir: Path
    nights: list[str] | None  # None: every night found
    cameras: list[str] | None
    sites: list[str] | None
    settings: dict[str, Any] | None
    night_dirs: list[Path]
    not_found: list[str]  # explicitly requested camera-nights without a directory, e.g. "20260301LPS"
    #: directories holding a raw/ that are not reduced, with why: "2026031LPE: not <YYYYMMDD><SITE><CAM>"
    ignored: list[str] = dataclasses.field(default_factory=list)
    #: night directories of the nights asked for (any night, when none was) that hold no raw/
    without_raw: list[str] = dataclasses.field(default_factory=list)


def previous_night(today: dt.date | None = None) -> str:
    """``YYYYMMDD`` of the night that started yesterday evening (UTC)."""
    today = today or dt.datetime.now(dt.UTC).date()
    return (today - dt.timedelta(days=1)).strftime("%Y%m%d")


#: Longest night range accepted (days): ten years.
MAX_RANGE_DAYS = 3660


def _real_date(n: str) -> dt.date:
    if not (len(n) == 8 and n.isdigit()):
        raise SelectionError(f"night {n!r} is not YYYYMMDD (e.g. 20260301; several: 20260301+20260302; "
                             f"a range: 20260101..20260331)")
    try:
        return dt.datetime.strptime(n, "%Y%m%d").date()
    except ValueError:
        raise SelectionError(f"night {n!r} is not a real date (YYYYMMDD)") from None


def parse_nights(nights: str | int | Iterable[str | int] | None, today: dt.date | None = None) -> list[str] | None:
    """Nights as ``YYYYMMDD`` strings of real dates, from ``"a+b"``, ``"a..b"``, an int, a list, or ``None``.

    ``None``, ``""`` and ``"yesterday"`` mean the previous night (UTC date of
    yesterday); ``"all"`` returns None (every night found). ``a..b`` is every
    night from ``a`` to ``b``, both included; items mix freely
    (``20260101..20260131+20260215``). The result is sorted, without repeats.

    Raises
    ------
    SelectionError
        an item that is not a real date written ``YYYYMMDD``, or a range
        that runs backwards or spans more than ten years.
    """
    if nights is None or (isinstance(nights, str) and nights.strip().lower() in ("", "yesterday")):
        return [previous_night(today)]
    if isinstance(nights, str) and nights.strip().lower() == "all":
        return None
    items = str(nights).split("+") if isinstance(nights, (int, str)) else [str(n) for n in nights]
    out: set[str] = set()
    for n in items:
        n = n.strip()
        if n.lower() == "yesterday":
            n = previous_night(today)
        if ".." in n:
            first, _, last = n.partition("..")
            a, b = _real_date(first.strip()), _real_date(last.strip())
            if b < a:
                raise SelectionError(f"night range {n!r} runs backwards (write the earlier night first)")
            if (b - a).days >= MAX_RANGE_DAYS:
                raise SelectionError(f"night range {n!r} spans more than {MAX_RANGE_DAYS} days")
            out.update((a + dt.timedelta(days=k)).strftime("%Y%m%d") for k in range((b - a).days + 1))
            continue
        _real_date(n)
        out.add(n)
    return sorted(out)


def parse_letters(value: str | Iterable[str] | None) -> list[str] | None:
    """Camera letters or sites from ``"E+S"``, a list, or None/""/"all" (meaning all)."""
    if value is None:
        return None
    items = value.split("+") if isinstance(value, str) else [str(v) for v in value]
    items = [v.strip() for v in items if v.strip()]
    if not items or [v.lower() for v in items] == ["all"]:
        return None
    return items


def parse_cameras(value: str | Iterable[str] | None) -> list[str] | None:
    """Camera letters (N E S W C, upper case) from ``"E+S"``, a list or None (all)."""
    letters = parse_letters(value)
    for c in letters or []:
        if c not in CAMERAS:
            hint = f"; did you mean {c.upper()}?" if c.upper() in CAMERAS else ""
            raise SelectionError(f"camera {c!r} is not one of {' '.join(CAMERAS)}{hint}")
    return letters


def parse_sites(value: str | Iterable[str] | None) -> list[str] | None:
    """Site codes (LP, LS) from ``"LP"``, ``"LP+LS"``, a list or None (all)."""
    sites = parse_letters(value)
    for s in sites or []:
        if s not in SITES:
            hint = f"; did you mean {s.upper()}?" if s.upper() in SITES else ""
            raise SelectionError(f"site {s!r} is not one of {', '.join(SITES)}{hint}")
    return sites


def load_settings_file(path: str | Path | None) -> dict[str, Any] | None:
    """The JSON object of a ``--settings`` file, checked against the settings' field names."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        where = p.resolve().parent
        near = sorted(q.name for q in where.glob("*.json")) if where.is_dir() else []
        raise SelectionError(f"settings file {p} does not exist"
                             + (f" (JSON files in {where}: {', '.join(near[:10])})" if near else ""))
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SelectionError(f"settings file {p} is not valid JSON: {exc}") from None
    return check_settings(d, str(p))


def check_settings(d: Any, where: str = "settings") -> dict[str, Any] | None:
    """``d`` if it is None or a JSON object whose keys are fields of :class:`mascara.settings.Settings`."""
    if d is None:
        return None
    if isinstance(d, str):
        try:
            d = json.loads(d) if d.strip() else None
        except json.JSONDecodeError as exc:
            raise SelectionError(f"{where} is not valid JSON: {exc}") from None
        if d is None:
            return None
    if not isinstance(d, dict):
        raise SelectionError(f"{where} must be a JSON object of settings, not {type(d).__name__}")
    import dataclasses as _dc

    from mascara.settings import Settings, value_problems  # stdlib-only module

    known = {f.name for f in _dc.fields(Settings)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise SelectionError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    problems = value_problems(d)
    cat = d.get("catalogue")
    if isinstance(cat, str) and not Path(cat).is_file():
        problems.append(f"catalogue={cat!r}: no such file")
    if problems:
        raise SelectionError(f"{where}: " + "; ".join(problems))
    return d


def _listing(found: dict[str, list[str]], limit: int = 12) -> str:
    """``20260301 (LPE LPS), 20260302 (LPE)`` of night -> camera ids, newest last, shortened."""
    nights = sorted(found)
    shown = nights[-limit:]
    text = ", ".join(f"{n} ({' '.join(sorted(found[n]))})" for n in shown)
    return (f"{len(nights) - limit} earlier nights, " if len(nights) > limit else "") + text


def check_catalog_url(db_url: str | None, datadir: str | Path) -> None:
    """Refuse a catalog URL that names no catalog (:func:`mascara.catalog._engine.check_url`) as a
    :class:`SelectionError`: ``db_url``, else ``$MASCARA_DB_URL``, else the data directory's catalog. A
    mistyped catalog is refused before anything is recorded in the wrong place."""
    from mascara.catalog._engine import check_url, resolve_url

    try:
        check_url(resolve_url(db_url, datadir))
    except ValueError as exc:
        raise SelectionError(str(exc)) from None


def select_nights(datadir: str | Path, nights: Any = None, cameras: Any = None, site: Any = None,
                  settings_file: str | Path | None = None, settings: Any = None,
                  today: dt.date | None = None, db_url: str | None = None, check_catalog: bool = True) -> Selection:
    """Validate a reduction request and find its night directories.

    Parameters
    ----------
    datadir : directory holding ``<YYYYMMDD><SITE><CAM>/raw/``.
    nights, cameras, site : as ``mascprocess --night/--camera/--site`` or the flow's parameters.
    settings_file : a ``--settings`` JSON file; ``settings`` : overrides given as a dict (the flow).
    db_url : the ``--db`` catalog URL; with None, ``$MASCARA_DB_URL`` or the data directory's catalog
        (either is checked: :func:`mascara.catalog._engine.check_url`), unless ``check_catalog`` is False
        (a command that never opens the catalog).

    Raises
    ------
    SelectionError
        a malformed argument, a missing data directory or settings file, or a
        request that matches no night directory (the message lists what exists).
    """
    datadir = Path(datadir)
    if not datadir.is_dir():
        what = "is not a directory" if datadir.exists() else "does not exist"
        raise SelectionError(f"data directory {datadir} {what}")
    night_list = parse_nights(nights, today)
    cams = parse_cameras(cameras)
    sites = parse_sites(site)
    loaded = load_settings_file(settings_file) if settings_file else check_settings(settings)

    existing: dict[str, list[str]] = {}  # night -> camera ids with a raw/ directory
    without_raw: list[str] = []
    ignored: list[str] = []
    for p in sorted(datadir.iterdir()):
        m = NIGHT_DIR_RE.match(p.name)
        if not p.is_dir() or p.name.startswith("."):
            continue
        if not m:
            if (p / "raw").is_dir():  # meant as a night, perhaps: say why it is not one
                ignored.append(f"{p.name}: not a night directory name <YYYYMMDD><SITE><CAM> "
                               f"(site {'+'.join(SITES)}, camera one of {' '.join(CAMERAS)})")
            continue
        if not (p / "raw").is_dir():
            without_raw.append(p.name)
            continue
        try:
            _real_date(m["night"])
        except SelectionError:
            ignored.append(f"{p.name}: {m['night']} is not a real date")
            continue
        if m["site"] not in SITES:
            ignored.append(f"{p.name}: site {m['site']} is not one of {', '.join(SITES)}")
            continue
        existing.setdefault(m["night"], []).append(m["site"] + m["camera"])

    chosen, not_found = [], []
    for night in sorted(existing) if night_list is None else night_list:
        for cam_id in sorted(existing.get(night, [])):
            if (sites is None or cam_id[:2] in sites) and (cams is None or cam_id[2] in cams):
                chosen.append(datadir / f"{night}{cam_id}")
        if night_list is not None and cams is not None:
            for s in sites or sorted({c[:2] for v in existing.values() for c in v}) or []:
                for c in cams:
                    if f"{s}{c}" not in existing.get(night, []):
                        not_found.append(f"{night}{s}{c}")
    if not chosen:
        if not night_list:
            asked = "any"
        elif len(night_list) > 3:  # a range: its ends, not every night of it
            asked = f"{night_list[0]}..{night_list[-1]} ({len(night_list)} nights)"
        else:
            asked = "+".join(night_list)
        looked = (f"night(s) {asked}, "
                  f"camera(s) {'+'.join(cams) if cams else 'any'}, site {'+'.join(sites) if sites else 'any'}")
        if existing:
            there = f"night directories there: {_listing(existing)}"
            if night_list:
                same = {n: existing[n] for n in night_list if n in existing}
                if same:
                    there = (f"cameras present for {'that night' if len(night_list) == 1 else 'those nights'}: "
                             f"{_listing(same)}")
        else:
            there = "no <YYYYMMDD><SITE><CAM>/raw/ directories there at all"
        if without_raw:
            there += f"; without raw/: {', '.join(without_raw[:5])}"
        if ignored:
            there += f"; ignored: {'; '.join(ignored[:3])}"
        message = f"no night directory in {datadir} for {looked}; {there}"
        if night_list:
            known = sorted({c for v in existing.values() for c in v})
            if cams:
                known = sorted({f"{s}{c}" for s in (sites or sorted({k[:2] for k in known}) or []) for c in cams})
            known = [k for k in known if (sites is None or k[:2] in sites) and (cams is None or k[2] in cams)]
            raise NoNightData(message, night_list, [f"{n}{k}" for n in night_list for k in known])
        raise SelectionError(message)
    if night_list is not None:  # only what concerns the nights asked for
        ignored = [i for i in ignored if any(n in i.split(":")[0] for n in night_list)]
        without_raw = [w for w in without_raw if w[:8] in night_list]
    if check_catalog:  # last: it imports SQLAlchemy (a tenth of a second), which the checks above do without
        check_catalog_url(db_url, datadir)
    return Selection(datadir=datadir, nights=night_list, cameras=cams, sites=sites, settings=loaded,
                     night_dirs=chosen, not_found=not_found, ignored=ignored, without_raw=without_raw)


def night_dir_path(path: Path | str) -> Path:
    """A night directory's path as a reduction records it: absolute, the links above it resolved, its own
    name kept (a night directory that is itself a link keeps the night's name, which its target may lack)."""
    import os

    path = Path(path)
    return Path(os.path.realpath(path.parent)) / path.name
