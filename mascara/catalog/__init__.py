"""The reduction catalog: SQLModel tables, Alembic migrations, views and leases.

Open it with :func:`connect`; see :class:`Catalog` for the operations.
"""

from __future__ import annotations

from mascara.catalog.catalog import (
    DEFAULT_LEASE_SECONDS,
    FINGERPRINT_FIELDS,
    Catalog,
    CatalogConflict,
    CatalogError,
    LeaseHeld,
    LeaseLost,
    JournalEntry,
    RunInfo,
    connect,
    fingerprint_key,
    make_id,
)
from mascara.catalog.models import FRAME_STATUSES, MOVE_ACTIONS, PRODUCT_KINDS, STATUSES

__all__ = [
    "DEFAULT_LEASE_SECONDS", "FINGERPRINT_FIELDS", "FRAME_STATUSES", "MOVE_ACTIONS", "PRODUCT_KINDS",
    "STATUSES", "Catalog", "CatalogConflict", "CatalogError", "JournalEntry", "LeaseHeld", "LeaseLost", "RunInfo",
    "connect", "fingerprint_key", "make_id",
]
