"""Fault injection for tests of the orchestration (never used by the science).

``MASCARA_FLOW_FAULT="<night_id>:<batch>:<n>[:<kind>]"`` makes the first ``n``
attempts of that batch task raise a transient error before any work is done
(``kind``: ``OSError``, the default, or ``OperationalError``).  Several specs
may be joined with ``,``.  The attempt number comes from Prefect's task run, so
it counts correctly across processes and Dask workers.
"""

from __future__ import annotations

import os

ENV = "MASCARA_FLOW_FAULT"


class InjectedFault(OSError):
    """A transient I/O error injected on purpose."""


def maybe_fail(night_id: str, batch: int, attempt: int) -> None:
    """Raise the injected error if a spec matches this batch and ``attempt`` (1-based)."""
    spec = os.environ.get(ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        nid, b, n = parts[0], int(parts[1]), int(parts[2])
        kind = parts[3] if len(parts) > 3 else "OSError"
        if nid == night_id and b == int(batch) and attempt <= n:
            msg = f"injected transient failure of {night_id} batch {batch}, attempt {attempt}"
            if kind == "OperationalError":
                from sqlalchemy.exc import OperationalError

                raise OperationalError(msg, None, ConnectionError(msg))
            raise InjectedFault(msg)
