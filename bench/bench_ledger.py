"""Ledger write and query throughput on SQLite and PostgreSQL, side by side.

Why: the coordinator credits every cohort member at the end of every round, inside the round loop, so a
slow ledger would stall a campaign; and the leaderboard is computed at query time (RAC decays from the
clock), so it must stay fast as the ledger grows. Each backend gets a fresh database (a temporary SQLite
file; a fresh schema on the PostgreSQL server at ``--postgres`` or ``$FEDTUNE_TEST_POSTGRES_URL``), the
same contributors and the same rounds (90% included, 5% dropped, 5% declined, every one reporting a wall
time). Prints a Markdown table; ``--out FILE`` also writes the figures as JSON.

    python bench/bench_ledger.py            # 1,000 contributors x 100 rounds
    python bench/bench_ledger.py --quick    # 200 x 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from fedtune.credit.formula import train_flops_per_token
from fedtune.credit.ledger import Contributor, Ledger, RoundEntry, redact
from fedtune.identity import simulated_identity

CAMPAIGN = "bench"
FLOPS_PER_TOKEN = train_flops_per_token(1_000_000_000, 4_000_000)
START = datetime(2026, 1, 1, tzinfo=UTC)


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as folder:
        yield f"sqlite:///{Path(folder) / 'ledger.sqlite'}"


@contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A fresh schema on the server, dropped afterwards, so runs never see each other's rows."""
    admin = sa.create_engine(url, poolclass=sa.NullPool)
    schema = f"bench_{uuid.uuid4().hex[:16]}"
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield admin.url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def cohort_entries(ids: list[str], round_: int) -> list[RoundEntry]:
    """A round's outcomes: every 20th member dropped, every 20th (offset) declined, the rest included."""
    entries = []
    for i, cid in enumerate(ids):
        slot = (i + round_) % 20
        if slot == 0:
            entries.append(RoundEntry(cid, "dropped", 64, 32_768, reason="lost connection"))
        elif slot == 1:
            entries.append(RoundEntry(cid, "declined", reason="privacy budget spent"))
        else:
            entries.append(RoundEntry(cid, "included", 64, 32_768, reported_wall_s=30.0 + i % 7))
    return entries


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def run_backend(url: str, contributors: int, rounds: int) -> dict[str, float]:
    """Open, register, record every round, replay one, query: seconds and rates."""
    people = [simulated_identity(CAMPAIGN, p, team=f"team-{p % 10}") for p in range(contributors)]
    ids = [person.id for person in people]
    open_s, ledger = timed(lambda: Ledger.open(url))
    with ledger:
        register_s, _ = timed(
            lambda: ledger.register_contributors(Contributor(p.id, p.name, p.team, 50e12) for p in people)
        )
        rounds_in = [cohort_entries(ids, r) for r in range(rounds)]

        def record_all() -> int:
            return sum(
                len(
                    ledger.record_round(
                        CAMPAIGN, r, rounds_in[r], START + timedelta(hours=r), flops_per_token=FLOPS_PER_TOKEN
                    )
                )
                for r in range(rounds)
            )

        record_s, written = timed(record_all)
        assert written == contributors * rounds, (written, contributors * rounds)
        replay_s, again = timed(
            lambda: ledger.record_round(CAMPAIGN, rounds - 1, rounds_in[-1], flops_per_token=FLOPS_PER_TOKEN)
        )
        assert again == []
        as_of = START + timedelta(hours=rounds)
        board_s, board = timed(lambda: ledger.leaderboard(CAMPAIGN, as_of))
        teams_s, _ = timed(lambda: ledger.team_totals(CAMPAIGN, as_of))
        assert len(board) == contributors
    return {
        "open_migrate_s": open_s,
        "register_s": register_s,
        "record_s": record_s,
        "rows_per_s": written / record_s,
        "rounds_per_s": rounds / record_s,
        "ms_per_round": 1000 * record_s / rounds,
        "replay_round_ms": 1000 * replay_s,
        "leaderboard_ms": 1000 * board_s,
        "team_totals_ms": 1000 * teams_s,
    }


ROWS = [
    ("rows recorded / s", "rows_per_s", "{:,.0f}"),
    ("rounds recorded / s", "rounds_per_s", "{:,.2f}"),
    ("ms per round (one transaction)", "ms_per_round", "{:,.1f}"),
    ("replay of a recorded round (no-op), ms", "replay_round_ms", "{:,.1f}"),
    ("leaderboard query, ms", "leaderboard_ms", "{:,.0f}"),
    ("team totals query, ms", "team_totals_ms", "{:,.0f}"),
    ("register all contributors, s", "register_s", "{:,.3f}"),
    ("open + migrate to head, s", "open_migrate_s", "{:,.3f}"),
]


def markdown(results: dict[str, dict[str, float] | None], contributors: int, rounds: int) -> str:
    names = list(results)
    lines = [
        f"Ledger, {contributors:,} contributors x {rounds:,} rounds ({contributors * rounds:,} rows)",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, key, fmt in ROWS:
        cells = [fmt.format(r[key]) if r else "skipped" for r in results.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contributors", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="200 contributors x 20 rounds")
    parser.add_argument("--postgres", default=os.environ.get("FEDTUNE_TEST_POSTGRES_URL"), metavar="URL")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    contributors, rounds = (200, 20) if args.quick else (args.contributors, args.rounds)

    results: dict[str, dict[str, float] | None] = {}
    with sqlite_database() as url:
        results["SQLite"] = run_backend(url, contributors, rounds)
    if args.postgres:
        with postgres_schema(args.postgres) as url:
            results["PostgreSQL"] = run_backend(url, contributors, rounds)
    else:
        results["PostgreSQL"] = None
    print(markdown(results, contributors, rounds))
    if args.out:
        report = {
            "contributors": contributors,
            "rounds": rounds,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "postgres": redact(args.postgres) if args.postgres else None,
            "sqlalchemy": sa.__version__,
            "results": results,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
