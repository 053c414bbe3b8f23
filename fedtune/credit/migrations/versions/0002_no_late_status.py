"""Drop the never-used ``late`` round status from the check constraint.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

A contributor that answers after the round closed is ``dropped`` (its reply is not in the aggregate); no code
path ever wrote ``late``. Batch mode recreates the table on SQLite, which cannot alter a constraint in place.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = "ck_round_credits_status"


def _replace_check(allowed: str) -> None:
    with op.batch_alter_table("round_credits", recreate="auto") as batch:
        batch.drop_constraint(op.f(_NAME), type_="check")
        batch.create_check_constraint(op.f(_NAME), f"status IN ({allowed})")


def upgrade() -> None:
    _replace_check("'included', 'declined', 'dropped', 'failed'")


def downgrade() -> None:
    _replace_check("'included', 'declined', 'dropped', 'late', 'failed'")
