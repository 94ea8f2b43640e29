"""Frames that left ``raw/``: frame status ``gone``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

A ``frame`` row describes a raw file of a camera-night. When a file is no
longer in ``raw/`` at the intake of a later reduction (replaced by its
``.fits.gz``, moved to an archive, deleted by hand), its row is kept with the
status ``gone`` and the earlier status in the reason, instead of counting as
an accepted frame of the night forever. The views count ``ok`` and
``rejected`` rows only, so they need no change.

On SQLite the CHECK constraint can only change by copying the table; the
views that name ``frame`` are dropped around the copy and recreated from
their stored definitions (SQLite checks views when the copy is renamed).
On PostgreSQL the constraint is replaced in place.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

OLD = ("ok", "rejected")
NEW = ("ok", "rejected", "gone")


def _check(words: tuple[str, ...]) -> str:
    return f"status IN ({', '.join(repr(w) for w in words)})"


def _replace_check(words: tuple[str, ...]) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.drop_constraint("ck_frame_status", "frame", type_="check")
        op.create_check_constraint("ck_frame_status", "frame", _check(words))
        return
    # views in creation order; those that use another are dropped after it and recreated before it
    views = bind.execute(sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'view' ORDER BY rowid")).all()
    for name, _sql in reversed(views):
        op.execute(f'DROP VIEW "{name}"')
    with op.batch_alter_table("frame", recreate="always") as batch_op:
        batch_op.drop_constraint("ck_frame_status", type_="check")
        batch_op.create_check_constraint("ck_frame_status", _check(words))
    for _name, sql in views:
        bind.exec_driver_sql(sql)  # as stored: no bind-parameter parsing of a ':' in a hand-made view


def upgrade() -> None:
    _replace_check(NEW)


def downgrade() -> None:
    # before 0007 a file that left raw/ stayed as it was recorded: give gone rows their earlier status back
    frame = sa.table("frame", sa.column("status", sa.String()), sa.column("reason", sa.String()))
    bind = op.get_bind()
    # "(was ok)" for frames, "(was ok: combined into the master dark)" and the like for calibration files
    was_ok = sa.or_(frame.c.reason.like("%(was ok)"), frame.c.reason.like("%(was ok: %"))
    bind.execute(sa.update(frame).where(frame.c.status == "gone", was_ok).values(status="ok"))
    bind.execute(sa.update(frame).where(frame.c.status == "gone").values(status="rejected"))
    _replace_check(OLD)
