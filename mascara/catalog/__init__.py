"""The reduction catalog: SQLModel tables, Alembic migrations, views and leases.

Open it with :func:`connect`; see :class:`Catalog` for the operations.

The names below are loaded on first use (PEP 562): importing a submodule
such as :mod:`mascara.catalog._engine`, which ``mascprocess`` does to check a
catalog URL before it starts Prefect's temporary server, then costs
SQLAlchemy alone, not SQLModel and the tables.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mascara.catalog.catalog import (
        DEFAULT_LEASE_SECONDS,
        FINGERPRINT_FIELDS,
        Catalog,
        CatalogConflict,
        CatalogError,
        JournalEntry,
        LeaseHeld,
        LeaseLost,
        RunInfo,
        connect,
        fingerprint_key,
        make_id,
    )
    from mascara.catalog.models import FRAME_STATUSES, MOVE_ACTIONS, PRODUCT_KINDS, STATUSES

_FROM = {
    **dict.fromkeys(("DEFAULT_LEASE_SECONDS", "FINGERPRINT_FIELDS", "Catalog", "CatalogConflict", "CatalogError",
                     "JournalEntry", "LeaseHeld", "LeaseLost", "RunInfo", "connect", "fingerprint_key", "make_id"),
                    "mascara.catalog.catalog"),
    **dict.fromkeys(("FRAME_STATUSES", "MOVE_ACTIONS", "PRODUCT_KINDS", "STATUSES"), "mascara.catalog.models"),
}

__all__ = [
    "DEFAULT_LEASE_SECONDS", "FINGERPRINT_FIELDS", "FRAME_STATUSES", "MOVE_ACTIONS", "PRODUCT_KINDS",
    "STATUSES", "Catalog", "CatalogConflict", "CatalogError", "JournalEntry", "LeaseHeld", "LeaseLost", "RunInfo",
    "connect", "fingerprint_key", "make_id",
]


def __getattr__(name: str) -> Any:
    module = _FROM.get(name)
    if module is None:  # a submodule (``from mascara.catalog import lifecycle``) is then imported as usual
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
