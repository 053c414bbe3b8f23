"""``fedtune credits``: the compute-credit leaderboard of a run or of a shared ledger database.

Credit is the community's visible reward, so anyone with read access to the ledger can print the standings:
a table for people (rendered with rich), JSON for scripts.
The table and the ``--json`` document (schema in :mod:`fedtune.credit.leaderboard`) are rendered there.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedtune.cli.parser import OneLineParser
from fedtune.credit.formula import CREDIT_UNIT, RAC_HALF_LIFE
from fedtune.rundir import LEDGER_FILENAME


def _aware_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (e.g. 2026-01-08T00:00:00+00:00)")
    return moment


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run-dir", type=Path, help=f"run directory holding {LEDGER_FILENAME}")
    source.add_argument("--db", metavar="URL", help="SQLAlchemy URL of the ledger (e.g. postgresql+psycopg://…)")
    parser.add_argument("--campaign", help="only this campaign (default: all in the ledger)")
    parser.add_argument("--top", type=int, metavar="N", help="show the N best contributors only")
    parser.add_argument("--json", action="store_true", help="print JSON (schema in fedtune.credit.leaderboard)")
    parser.add_argument("--as-of", type=_aware_time, metavar="ISO8601", help="decay RAC to this time (default: now)")


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


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_credits(args: argparse.Namespace) -> int:
    """Print the leaderboard for ``args`` (from :func:`add_credits_parser`); return the exit status.

    Reads only: the ledger is opened read-only (:meth:`Ledger.open_readonly`), so a wrong path or URL is an
    ``error:`` line and exit 2, never a new or migrated database.
    """
    import sqlalchemy as sa

    from fedtune.console import one_line, output_console
    from fedtune.credit.leaderboard import credits_payload, render_leaderboard
    from fedtune.credit.ledger import Ledger, LedgerError, default_url, redact, utc_now

    if args.db is None and args.run_dir is None:
        return _refuse("fedtune credits: expected --run-dir DIR or --db URL, found neither")
    if args.top is not None and args.top < 1:
        return _refuse(f"--top: expected an integer >= 1, found {args.top}")
    url = args.db if args.db is not None else default_url(args.run_dir)
    as_of = (args.as_of or utc_now()).astimezone(UTC)
    try:
        with Ledger.open_readonly(url) as ledger:
            known = ledger.campaigns()
            if args.campaign is not None and args.campaign not in known:
                return _refuse(f"--campaign: expected one of the ledger's campaigns {known}, found {args.campaign!r}")
            contributors = ledger.leaderboard(args.campaign, as_of, limit=args.top)
            teams = ledger.team_totals(args.campaign, as_of)
    except LedgerError as exc:
        return _refuse(str(exc))
    except sa.exc.SQLAlchemyError as exc:
        return _refuse(
            f"{redact(url)}: expected a readable ledger, found {one_line(getattr(exc, 'orig', None) or exc)!r}"
        )
    if args.json:
        print(json.dumps(credits_payload(contributors, teams, args.campaign, as_of), indent=2))
    else:
        render_leaderboard(output_console(), contributors, teams, as_of)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m fedtune.cli.credits``), same options as ``fedtune credits``."""
    parser = OneLineParser(prog="fedtune credits", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return run_credits(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
