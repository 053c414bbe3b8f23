"""``fedtune credits``: the compute-credit leaderboard of a run or of a shared ledger database.

Credit is the community's visible reward, so anyone with read access to the ledger can print the standings:
a table for people (rendered with rich), JSON for scripts.

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
         "missed_rounds": 1,                    # declined, dropped, late or failed rounds (no credit)
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

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from fedtune.credit import CREDIT_UNIT, RAC_HALF_LIFE, RAC_UNIT
from fedtune.ledger import LEDGER_FILENAME, LeaderboardRow, Ledger, TeamRow, redact, resolve_url, utc_now

JSON_SCHEMA_ID = "fedtune.credits/1"


def _aware_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (e.g. 2026-01-08T00:00:00+00:00)")
    return moment


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run-dir", type=Path, help=f"run directory holding {LEDGER_FILENAME}")
    source.add_argument(
        "--db", metavar="URL", help="SQLAlchemy URL of the ledger (e.g. postgresql+psycopg://…)"
    )
    parser.add_argument("--campaign", help="only this campaign (default: all in the ledger)")
    parser.add_argument("--top", type=int, metavar="N", help="show the N best contributors only")
    parser.add_argument("--json", action="store_true", help="print JSON (schema in fedtune.credits_cli)")
    parser.add_argument(
        "--as-of", type=_aware_time, metavar="ISO8601", help="decay RAC to this time (default: now)"
    )


def add_credits_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``credits`` to a CLI's subparsers; its ``func`` default is :func:`run_credits`."""
    parser = subparsers.add_parser(
        "credits",
        help="show the compute-credit leaderboard",
        description="Leaderboard of compute credit: rank, name, team, rounds, total credit, recent average "
        f"credit (RAC, {RAC_HALF_LIFE.days}-day half-life) and flagged claims. Unit: {CREDIT_UNIT}.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_credits)
    return parser


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
    console: Console, contributors: list[LeaderboardRow], teams: list[TeamRow], as_of: datetime
) -> None:
    """Print the contributor table, then the team table when any contributor has a team."""
    caption = f"credit: {CREDIT_UNIT}; RAC: {RAC_UNIT}, as of {as_of:%Y-%m-%d %H:%M} UTC"
    table = Table(title="Compute credit", caption=caption)
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


def run_credits(args: argparse.Namespace) -> int:
    """Print the leaderboard for ``args`` (from :func:`add_credits_parser`); return the exit status."""
    if args.db is None and args.run_dir is None:
        print("fedtune credits: give --run-dir DIR or --db URL", file=sys.stderr)
        return 2
    if args.db is None and not (args.run_dir / LEDGER_FILENAME).is_file():
        print(f"fedtune credits: no ledger at {args.run_dir / LEDGER_FILENAME}", file=sys.stderr)
        return 2
    url = resolve_url(args.run_dir, args.db)
    as_of = (args.as_of or utc_now()).astimezone(UTC)
    try:
        with Ledger.open(url) as ledger:
            contributors = ledger.leaderboard(args.campaign, as_of, limit=args.top)
            teams = ledger.team_totals(args.campaign, as_of)
    except sa.exc.SQLAlchemyError as error:
        print(f"fedtune credits: cannot read ledger {redact(url)}: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(credits_payload(contributors, teams, args.campaign, as_of), indent=2))
    else:
        render_leaderboard(Console(), contributors, teams, as_of)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m fedtune.credits_cli``), same options as ``fedtune credits``."""
    parser = argparse.ArgumentParser(prog="fedtune credits", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return run_credits(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
