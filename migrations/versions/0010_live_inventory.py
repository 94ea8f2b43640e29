"""The raw inventory a live run ended with: ``reduction_run.final_raw_inventory_hash``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

A live run's fingerprint names no raw inventory (it grows while the run
goes), so a night reduced live never matched the fingerprint of an offline
plan of the same ``raw/``: ``--skip-done`` and ``backfill`` reduced every
live night a second time, saying "other raw inventory" (an outside trial).
A live run that ends records the inventory of ``raw/`` as it reduced it;
a succeeded run whose fingerprint with that inventory equals a plan's is
up to date for it. Runs recorded before this revision, and offline runs,
have none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("reduction_run", sa.Column("final_raw_inventory_hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("reduction_run", "final_raw_inventory_hash")
