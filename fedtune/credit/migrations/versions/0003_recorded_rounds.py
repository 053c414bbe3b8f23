"""One row per recorded round: a round is credited once, whatever the cohort of a replay.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

``round_credits``' unique (campaign, round, contributor) stops a replay from crediting the same contributor
twice, but a round replayed after a coordinator crash with a *different* cohort would still credit a second set
of contributors. ``recorded_rounds`` is the round's claim: the transaction that inserts its (campaign, round)
row is the only one that writes credit rows for it. Existing rounds are backfilled from ``round_credits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "recorded_rounds",
        sa.Column("campaign", sa.String(length=200), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("campaign", "round", name=op.f("pk_recorded_rounds")),
    )
    op.execute(
        "INSERT INTO recorded_rounds (campaign, round, recorded_at) "
        "SELECT campaign, round, MIN(recorded_at) FROM round_credits GROUP BY campaign, round"
    )


def downgrade() -> None:
    op.drop_table("recorded_rounds")
