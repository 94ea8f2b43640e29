"""Serve the ``reduce-night`` deployments from one long-running process (no work pool needed).

    python -m flows.serve /data/mascara [--name nightly] [--cron "0 12 * * *"] [--dask-address tcp://...]

Creates ``reduce-night/<name>`` with the nightly schedule (the previous night,
every camera) and executes its runs in this process until interrupted.  The
alternative with a work pool and workers is ``prefect.yaml``.
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    p.add_argument("datadir")
    p.add_argument("--name", default="nightly")
    p.add_argument("--cron", default="0 12 * * *", help="UTC cron of the nightly run")
    p.add_argument("--no-schedule", action="store_true")
    p.add_argument("--db", default=None, help="catalog URL (default: MASCARA_DB_URL or <datadir>/catalog.sqlite)")
    p.add_argument("--dask-address", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.schedules import Cron

    from flows.reduce_night import flow_with_runner

    flow_obj = flow_with_runner(args.dask_address)
    flow_obj.serve(
        name=args.name,
        parameters={"datadir": os.path.abspath(args.datadir), "nights": "yesterday", "db_url": args.db},
        schedules=None if args.no_schedule else [Cron(args.cron, timezone="UTC")],
        tags=["mascara"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
