"""The compute-credit leaderboard as people and scripts read it: one rich table renderer, one JSON schema.

``fedtune credits`` prints the full board and ``fedtune simulate`` the top of it, both through
:func:`render_leaderboard`; ``fedtune credits --json`` prints :func:`credits_payload`.

JSON schema (``--json``, one object on stdout; ``schema`` changes when fields change meaning)::

    {
      "schema": "fedtune.credits/1",
      "as_of": "2026-01-08T00:00:00+00:00",     # ISO 8601, the time RAC is decayed to
      "campaign": "quickstart" | null,          # null: all campaigns in the ledger
      "credit_unit": "TFLOP-credit (1e12 nominal training FLOPs)",
      "rac_unit": "TFLOP-credits per day",
      "rac_half_life_days": 7.0,
      "contributors": [                         # ranked by total_credit, then rac, then name
        {"rank": 1, "contributor_id": "<32 hex>", "name": "alice", "team": "lab" | null,
         "rounds": 12,                          # rounds whose applied aggregate included this contributor
         "missed_rounds": 1,                    # declined, dropped or failed rounds (no credit)
         "total_credit": 131.86, "rac": 9.4,
         "flagged_rounds": 0}                   # rounds whose reported wall time was impossibly fast
      ],
      "teams": [                                # contributors without a team are not in any row
        {"rank": 1, "team": "lab", "members": 3, "rounds": 30, "total_credit": 400.1, "rac": 25.0,
         "flagged_rounds": 0}
      ]
    }
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from fedtune.credit.formula import CREDIT_UNIT, RAC_HALF_LIFE, RAC_UNIT
from fedtune.credit.ledger import LeaderboardRow, TeamRow

JSON_SCHEMA_ID = "fedtune.credits/1"


def _fmt(value: float) -> str:
    """Credits span tiny test models to large campaigns: fixed point when readable, else scientific."""
    if value == 0:
        return "0"
    return f"{value:,.2f}" if abs(value) >= 0.01 else f"{value:.2e}"


def credits_payload(
    contributors: list[LeaderboardRow], teams: list[TeamRow], campaign: str | None, as_of: datetime
) -> dict[str, Any]:
    """The ``--json`` document (schema in the module docstring)."""
    return {
        "schema": JSON_SCHEMA_ID,
        "as_of": as_of.isoformat(),
        "campaign": campaign,
        "credit_unit": CREDIT_UNIT,
        "rac_unit": RAC_UNIT,
        "rac_half_life_days": RAC_HALF_LIFE.total_seconds() / 86400,
        "contributors": [row.to_json() for row in contributors],
        "teams": [row.to_json() for row in teams],
    }


def render_leaderboard(
    console: Console,
    contributors: list[LeaderboardRow],
    teams: list[TeamRow],
    as_of: datetime,
    title: str = "Compute credit",
) -> None:
    """Print the contributor table, then the team table when any contributor has a team."""
    caption = f"credit: {CREDIT_UNIT}; RAC: {RAC_UNIT}, as of {as_of:%Y-%m-%d %H:%M} UTC"
    table = Table(title=title, caption=caption)
    for column in ("Rank", "Name", "Team", "Rounds", "Total", "RAC", "Flags"):
        table.add_column(column, justify="right" if column in ("Rank", "Rounds", "Total", "RAC") else "left")
    for row in contributors:
        flags = f"{row.flagged_rounds} impossible claim(s)" if row.flagged_rounds else ""
        table.add_row(
            str(row.rank),
            row.name,
            row.team or "",
            str(row.rounds),
            _fmt(row.total_credit),
            _fmt(row.rac),
            flags,
        )
    console.print(table)
    if not teams:
        return
    team_table = Table(title="Teams")
    for column in ("Rank", "Team", "Members", "Rounds", "Total", "RAC"):
        team_table.add_column(column, justify="left" if column == "Team" else "right")
    for team in teams:
        team_table.add_row(
            str(team.rank),
            team.team,
            str(team.members),
            str(team.rounds),
            _fmt(team.total_credit),
            _fmt(team.rac),
        )
    console.print(team_table)
