"""Command line: ``mascara <subcommand>`` and ``mascprocess``.

A thin layer: every subcommand parses its arguments and calls one function of
the library; the handlers live with the code they drive.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _seconds(text: str) -> float:
    """An argparse type: a duration in seconds, a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text}")
    return v


def _at_least_one(text: str) -> int:
    """An argparse type: a whole number >= 1 (a refused value is a command-line mistake, exit 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n} (-o erases earlier outputs instead)")
    return n


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write simulated raw nights with truth files")
    p.add_argument("datadir", help="data directory to write <YYYYMMDD><SITE><CAM>/raw/ into (created if missing)")
    p.add_argument("--night", required=True, help="YYYYMMDD[+YYYYMMDD...]")
    p.add_argument("--site", default="LP", choices=["LP", "LS"])
    p.add_argument("--camera", default="E", help="camera letters joined by +, e.g. E+S")
    p.add_argument("--frames", type=int, default=None, help="frames per camera-night (default: whole night)")
    p.add_argument("--size", default="small", choices=["small", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clouds", action="store_true", help="add passing clouds")
    p.add_argument("--pointing-offset", type=float, default=0.0, help="deg; true pointing off nominal")
    p.add_argument("--bad-frames", type=int, default=0, help="number of deliberately broken frames")
    p.add_argument("--psf", default="gaussian", choices=["gaussian", "moffat"],
                   help="PSF model: Gaussian, or a field-dependent elliptical Moffat (beta 3, FWHM 2-3 px)")
    p.add_argument("--live", action="store_true",
                   help="write the frames as they would arrive during the night (calibration frames first)")
    p.add_argument("--speed", type=float, default=1.0, help="with --live: times faster than real time (default 1)")
    p.add_argument("--write-mode", default="rename", choices=["rename", "in-place"],
                   help="how frames are written: a temporary name then a rename, or in place in two halves")
    p.set_defaults(handler="mascara.simulate:cli_simulate")


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show what was reduced (the night_status view)")
    p.add_argument("datadir", nargs="?", default=".", help="data directory whose catalog to show (default: .)")
    p.add_argument("--db", default=None, help=DB_HELP)
    p.add_argument("--night", default=None, help="YYYYMMDD, several joined by +, or a range YYYYMMDD..YYYYMMDD")
    _add_camera_site(p)  # as mascprocess, quicklook and backfill take them; they select the rows of every view
    p.add_argument("--json", action="store_true", help="machine-readable output")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--season", action="store_true",
                      help="monthly totals per site and camera instead (the season view) of the months the "
                           "--night nights fall in, whole months: camera-nights done, failed, running, pending, "
                           "empty; frames; CPU hours")
    view.add_argument("--rejected", action="store_true",
                   help="the raw files refused by the intake or the reduction instead, each with the reason")
    p.set_defaults(handler="mascara.catalog.commands:cli_status")


def _add_camera_site(p: argparse.ArgumentParser) -> None:
    """``--camera`` and ``--site`` of the commands that select camera-nights (default: all found)."""
    p.add_argument("--camera", default=None, help="camera letters joined by +, default: all found")
    p.add_argument("--site", default=None, help="LP or LS; default: every site found")


def _add_quicklook(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quicklook", help="redraw the quick-look figures of reduced camera-nights (from their work/)",
        description="Redraw <night>/quicklook/*.png of each selected camera-night and the summary figure of each "
                    "night and site (<datadir>/quicklook/) from what the reduction left in work/: for figures "
                    "that are missing or stale (a reduction stopped after recording its success, a drawing "
                    "that failed, figures deleted). Reads nothing else and changes no reduction.",
        epilog="exit codes: 0 every selected camera-night drawn; 1 one had nothing reduced to draw (named) or "
               "failed, or a requested night directory is missing; 2 a mistake in the request.")
    p.add_argument("datadir", help="data directory holding <YYYYMMDD><SITE><CAM>/")
    p.add_argument("--night", default=None, help="YYYYMMDD, a range YYYYMMDD..YYYYMMDD, several joined by +, "
                                                  "or all (default)")
    _add_camera_site(p)
    p.set_defaults(handler="mascara.quicklook:cli_quicklook")


def _add_db(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="catalog maintenance")
    dsub = p.add_subparsers(dest="db_command", required=True)
    up = dsub.add_parser("upgrade", help="apply Alembic migrations")
    up.add_argument("datadir", nargs="?", default=".", help="data directory whose catalog to upgrade (default: .)")
    up.add_argument("--db", default=None, help=DB_HELP)
    up.add_argument("--revision", default="head", help="Alembic revision to upgrade to (default: head)")
    up.set_defaults(handler="mascara.catalog.commands:cli_db_upgrade")


def _add_backfill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backfill", help="reprocess a range of nights: one Prefect flow run per camera-night, for the pool's workers",
        description="Submit one run of the deployment reduce-night/backfill-night per camera-night of the "
                    "nights given that needs it, to the Prefect server of PREFECT_API_URL; the workers of "
                    "the pool reduce them (one each with `prefect worker start --pool mascara --limit 1`), "
                    "the nightly queue first. Camera-nights whose latest reduction succeeded with the same "
                    "code version, settings, star catalogue and raw files are skipped unless --force.",
        epilog="exit codes: 0 submitted or nothing to do (with --wait: every run completed); 1 with --wait, a "
               "run did not complete; 2 a mistake in the request, or no server or deployment to submit to.")
    p.add_argument("datadir", help="data directory holding <YYYYMMDD><SITE><CAM>/raw/ (as the workers see it)")
    p.add_argument("--night", required=True,
                   help="YYYYMMDD, a range YYYYMMDD..YYYYMMDD, or several joined by + (nights without data "
                        "are listed and skipped)")
    _add_camera_site(p)
    p.add_argument("--force", action="store_true",
                   help="submit up-to-date camera-nights too (their outputs are moved to _old)")
    p.add_argument("--settings", default=None, help="JSON file of settings overrides (a change reprocesses)")
    p.add_argument("--db", default=None, help=DB_HELP)
    p.add_argument("--keep-old", type=_at_least_one, default=1, metavar="N",
                   help="generations of earlier outputs to keep")
    p.add_argument("--backfill-limit", type=int, default=None, metavar="N",
                   help="at most N backfill runs at once over all workers (the backfill work queue's "
                        "concurrency limit; 0 removes it; default: leave it as it is)")
    p.add_argument("--deployment", default="reduce-night/backfill-night",
                   help="deployment of one camera-night (default: reduce-night/backfill-night)")
    p.add_argument("--pool", default="mascara", help="work pool whose queues are ordered (default: mascara)")
    p.add_argument("--dask-address", default=None, metavar="tcp://HOST:PORT",
                   help="run the batches of every submitted camera-night on this Dask cluster (started with "
                        "`dask scheduler` and `dask worker`; its workers need PREFECT_API_URL and the code)")
    p.add_argument("--dry-run", action="store_true", help="only show what would be submitted")
    p.add_argument("--wait", action="store_true", help="wait until every submitted run has finished")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="with --wait: stop waiting after")
    p.add_argument("--json", action="store_true",
                   help="print the camera-nights as JSON on standard output (the JSON alone: every other line "
                        "goes to stderr)")
    p.add_argument("-q", "--quiet", action="store_true", help="only the summary line")
    p.set_defaults(handler="flows.backfill:cli_backfill")


#: Help of every ``--db`` option.
DB_HELP = ("catalog URL, e.g. postgresql+psycopg://user@host/mascara (default: $MASCARA_DB_URL, "
           "else the SQLite file <datadir>/catalog.sqlite)")
MASCPROCESS_HELP = ("Reduce MASCARA camera-nights into fLC/sLC light curves with the Prefect flow reduce-night "
                    "(or the plain driver with --no-prefect), recording everything in the catalog.")
MASCPROCESS_EPILOG = ("exit codes: 0 every selected camera-night reduced; 1 at least one not reduced (failed, no "
                      "frames, no master dark with --require-calibration, or held by another run; see mascara "
                      "status); 2 a command-line mistake, nothing started; 128+N interrupted by signal N.")


def add_mascprocess_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("datadir", help="data directory holding the night directories <YYYYMMDD><SITE><CAM>/raw/")
    p.add_argument("--night", default=None, help="YYYYMMDD, several joined by +, or a range YYYYMMDD..YYYYMMDD (nights without data in a range are skipped); default: every night found")
    _add_camera_site(p)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors: no progress bars, no summary line")
    p.add_argument("-v", "--verbose", action="store_true", help="show the flow's log (Prefect INFO) and the reduction's debug messages")
    p.add_argument("-o", "--overwrite", action="store_true", help="erase old outputs instead of moving them to _old")
    p.add_argument("--keep-old", type=_at_least_one, default=1, metavar="N",
                   help="generations of earlier outputs to keep (<name>_old, _old2, ...; default 1; -o erases "
                        "instead)")
    p.add_argument("--db", default=None, help=DB_HELP)
    p.add_argument("--settings", default=None, help="JSON file of settings overrides")
    p.add_argument("--dask-address", default=None, help="run batches on a Dask cluster (tcp://... or 'local')")
    p.add_argument("--no-prefect", action="store_true", help="plain sequential driver without Prefect")
    p.add_argument("--skip-done", action="store_true",
                   help="leave alone camera-nights whose latest reduction succeeded with the same code version, "
                        "settings, star catalogue and raw files, its files in place (default: reduce them again, "
                        "moving the earlier outputs to _old)")
    p.add_argument("--require-calibration", action="store_true",
                   help="do not reduce a camera-night without a usable master dark (default: reduce it, "
                        "record and show the warning)")
    live = p.add_argument_group("live mode (reduce a night while it is observed; needs --night, --site, --camera)")
    live.add_argument("--live", action="store_true",
                      help="watch each camera-night's raw/ and reduce every batch once its frames have arrived; "
                           "the night files are written at sunrise (or after --idle-timeout)")
    live.add_argument("--idle-timeout", type=_seconds, default=None, metavar="SECONDS",
                      help="end the live night after this long without a new frame (default: at sunrise)")
    live.add_argument("--grace", type=_seconds, default=300.0, metavar="SECONDS",
                      help="reduce an incomplete batch after this long without a new frame (default 300)")
    live.add_argument("--poll", type=_seconds, default=2.0, metavar="SECONDS",
                      help="how often raw/ is looked at (default 2)")


#: Handlers that tell :mod:`mascara._collector` themselves when their modules are loaded (each of their paths
#: that runs for long does); the others are told once their own module is imported.
SETTLES_ITSELF = frozenset({"flows.mascprocess:cli_mascprocess"})


def _dispatch(args: argparse.Namespace, prog: str = "mascara") -> int:
    import importlib

    module, func = args.handler.split(":")
    try:
        handler = getattr(importlib.import_module(module), func)
        if args.handler not in SETTLES_ITSELF:
            from mascara import _collector

            _collector.settled()
        return int(handler(args) or 0)
    except Exception as exc:
        sqlalchemy = sys.modules.get("sqlalchemy.exc")
        if sqlalchemy is None or not isinstance(exc, sqlalchemy.DatabaseError) or not getattr(args, "datadir", None):
            raise
        # a catalog that is not one (a damaged or foreign file): name it, without a page of traceback
        from mascara.catalog._engine import resolve_url, unusable

        try:
            url = resolve_url(getattr(args, "db", None), str(args.datadir))
        except Exception:  # noqa: BLE001 - the message goes out without the URL
            url = None
        print(f"{prog}: {unusable(url, exc)}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mascara", description="MASCARA all-sky camera reduction: simulate "
                                     "nights, reduce them (process, same as mascprocess), show and upgrade the catalog.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    _add_status(sub)
    _add_quicklook(sub)
    _add_db(sub)
    _add_backfill(sub)
    p = sub.add_parser("process", help="same as mascprocess", description=MASCPROCESS_HELP,
                       epilog=MASCPROCESS_EPILOG)
    add_mascprocess_arguments(p)
    p.set_defaults(handler="flows.mascprocess:cli_mascprocess")
    return _dispatch(parser.parse_args(argv))


def mascprocess_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mascprocess", description=MASCPROCESS_HELP, epilog=MASCPROCESS_EPILOG)
    add_mascprocess_arguments(parser)
    parser.set_defaults(handler="flows.mascprocess:cli_mascprocess")
    return _dispatch(parser.parse_args(argv), "mascprocess")


def _command(entry: Callable[[], int]) -> int:
    """Run a console command in a process of its own (see :mod:`mascara._collector`)."""
    from mascara import _collector

    _collector.loading()
    try:
        return entry()
    finally:
        if "mascara.catalog._engine" in sys.modules:  # closed now: no collection at exit closes them
            sys.modules["mascara.catalog._engine"].dispose_all()
        _collector.exiting()


def mascara_command() -> int:
    """The ``mascara`` console command."""
    return _command(main)


def mascprocess_command() -> int:
    """The ``mascprocess`` console command."""
    return _command(mascprocess_main)


if __name__ == "__main__":
    sys.exit(mascara_command())
