"""Sky quality: per-frame sky and transparency, per-batch transparency and a low-transparency mark.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

- ``frame.sky`` (median sky of the frame's stars, ADU) and ``frame.transparency``
  (median ratio of measured to expected flux of bright stars; 1 is a clear sky),
  for accepted science frames.
- ``batch.transparency`` (median of its frames) and ``batch.low_transparency``
  (below ``mascara.diagnostics.LOW_TRANSPARENCY``).

Plain ``ADD COLUMN`` / ``DROP COLUMN`` (no table copy), so the views, which do
not name these columns, stay as they are on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = {
    "frame": (("sky", sa.Float()), ("transparency", sa.Float())),
    "batch": (("transparency", sa.Float()), ("low_transparency", sa.Boolean())),
}


def upgrade() -> None:
    for table, cols in COLUMNS.items():
        for name, type_ in cols:
            op.add_column(table, sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    for table, cols in COLUMNS.items():
        for name, _ in reversed(cols):
            op.drop_column(table, name)
