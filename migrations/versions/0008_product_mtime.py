"""A product's modification time as its run left it: ``product.mtime_ns``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

Whether a recorded file is still the one its run wrote was judged by its
size alone; an outside trial's second catalog rewrote an fLC of the same
size in place and ``status``, ``--skip-done`` and ``backfill`` went on
calling the night done. The run now records each product's ``st_mtime_ns``
beside its size, and a file whose size or modification time differs is
replaced (renames keep both; ``cp -a`` and ``rsync -a`` keep both).
Products recorded before this revision have none and are judged by size.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("product", sa.Column("mtime_ns", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("product", "mtime_ns")
