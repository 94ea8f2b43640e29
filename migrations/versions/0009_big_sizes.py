"""File sizes as 64-bit integers: ``product.size`` and ``frame.size``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

Sizes were ``INTEGER``, which PostgreSQL stores in 32 bits: an outside trial
found that a product over 2,147,483,647 bytes (the fLC of a full 5,000-frame
night is about 2.7 GB) made the transaction that records a run's success
fail with ``integer out of range`` after both night files were written, and
every re-run failed the same way. SQLite's ``INTEGER`` already holds 64 bits;
its tables are copied only so that the declared type matches the models (the
views that name them are dropped around the copy and recreated from their
stored definitions, as in 0007). Downgrading a PostgreSQL catalog that holds a
size over 32 bits fails: nothing is truncated.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COLUMNS = (("product", False), ("frame", True))  # (table, nullable) of each ``size`` column


def _retype(new: sa.types.TypeEngine, old: sa.types.TypeEngine) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        for table, nullable in COLUMNS:
            op.alter_column(table, "size", type_=new, existing_type=old, existing_nullable=nullable)
        return
    views = bind.execute(sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'view' ORDER BY rowid")).all()
    for name, _sql in reversed(views):
        op.execute(f'DROP VIEW "{name}"')
    for table, nullable in COLUMNS:
        with op.batch_alter_table(table, recreate="always") as batch_op:
            batch_op.alter_column("size", type_=new, existing_type=old, existing_nullable=nullable)
    for _name, sql in views:
        bind.exec_driver_sql(sql)  # as stored: no bind-parameter parsing of a ':' in a hand-made view


def upgrade() -> None:
    _retype(sa.BigInteger(), sa.Integer())


def downgrade() -> None:
    _retype(sa.Integer(), sa.BigInteger())
