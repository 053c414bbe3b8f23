"""Initial ledger schema: contributors and per-round credit rows.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

One row per (campaign, round, contributor) -- the unique constraint is what makes replaying a round after a
coordinator crash a no-op. Times are naive UTC (``fedtune.credit.ledger.UTCDateTime`` adds the zone on read).
Written out in full rather than importing the models, so later model changes cannot alter this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "contributors",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("team", sa.String(length=200), nullable=True),
        sa.Column("declared_peak_flops", sa.Double(), nullable=True),
        sa.Column("registered_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contributors")),
    )
    op.create_index(op.f("ix_contributors_team"), "contributors", ["team"], unique=False)
    op.create_table(
        "round_credits",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("campaign", sa.String(length=200), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("contributor_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("assigned_examples", sa.BigInteger(), nullable=False),
        sa.Column("assigned_tokens", sa.BigInteger(), nullable=False),
        sa.Column("flops_per_token", sa.Double(), nullable=False),
        sa.Column("assigned_flops", sa.Double(), nullable=False),
        sa.Column("credit", sa.Double(), nullable=False),
        sa.Column("reported_wall_s", sa.Double(), nullable=True),
        sa.Column("declared_peak_flops", sa.Double(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("flag_reason", sa.Text(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "status IN ('included', 'declined', 'dropped', 'late', 'failed')",
            name=op.f("ck_round_credits_status"),
        ),
        sa.ForeignKeyConstraint(
            ["contributor_id"],
            ["contributors.id"],
            name=op.f("fk_round_credits_contributor_id_contributors"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_round_credits")),
        sa.UniqueConstraint(
            "campaign", "round", "contributor_id", name=op.f("uq_round_credits_campaign_round_contributor_id")
        ),
    )
    op.create_index(
        op.f("ix_round_credits_contributor_id_recorded_at"),
        "round_credits",
        ["contributor_id", "recorded_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_round_credits_contributor_id_recorded_at"), table_name="round_credits")
    op.drop_table("round_credits")
    op.drop_index(op.f("ix_contributors_team"), table_name="contributors")
    op.drop_table("contributors")
