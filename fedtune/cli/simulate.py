"""The ``simulate`` command: a whole campaign on this machine, with a progress bar and a summary table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedtune.config import CampaignConfig, load_config
from fedtune.console import campaign_round_line
from fedtune.preflight import validate_campaign


class _ProgressReporter:
    """Live progress for a simulation: a bar with the round and the latest eval loss."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.task = None

    def on_start(self, cfg: CampaignConfig, row0: dict[str, Any]) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            f"campaign {cfg.campaign.name}", total=cfg.federation.rounds, status=f"eval loss {row0['eval_loss']:.4f}"
        )

    def on_round(self, row: dict[str, Any]) -> None:
        line = campaign_round_line(row)
        self.progress.update(self.task, advance=1, status=line)
        self.progress.console.print(f"  {line}")

    def close(self) -> None:
        self.progress.stop()


def _summary(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedtune run {run_dir}")
    for col in (
        "round",
        "eval loss",
        "perplexity",
        "train loss",
        "contributors",
        "declined",
        "up MB",
        "down MB",
        "wall s",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        train = "-" if r.get("train_loss") is None else f"{r['train_loss']:.4f}"
        table.add_row(
            str(r["round"]),
            f"{r['eval_loss']:.4f}",
            f"{r['perplexity']:.2f}",
            train,
            str(r["participants"]),
            str(r["declined"]),
            f"{r['bytes_up'] / 1e6:.3f}",
            f"{r['bytes_down'] / 1e6:.3f}",
            f"{r['wall_s']:.1f}",
        )
    console = Console()
    console.print(table)
    _top_contributors(console, run_dir)
    with_tasks = [r for r in rows if r.get("tasks")]
    if with_tasks:
        scored = with_tasks[-1]
        parts = [
            f"{task} " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("n", "timeouts"))
            for task, metrics in scored["tasks"].items()
        ]
        console.print(f"task metrics after round {scored['round']}: " + "; ".join(parts))
    if len(rows) > 1:
        first, last = rows[0]["eval_loss"], rows[-1]["eval_loss"]
        console.print(
            f"eval loss {first:.4f} -> {last:.4f} (down {(first - last) / first:.1%}); adapter: {run_dir / 'adapter'}"
        )


def _top_contributors(console: Any, run_dir: Path, n: int = 5) -> None:
    from fedtune.credit.leaderboard import render_leaderboard
    from fedtune.credit.ledger import Ledger, default_url, utc_now

    cfg = load_config(run_dir / "config.toml")
    as_of = utc_now()
    with Ledger.open(cfg.credit.db or default_url(run_dir)) as ledger:
        rows = ledger.leaderboard(cfg.campaign.name, as_of, limit=n)
    render_leaderboard(console, rows, [], as_of, title=f"top {n} contributors (all: fedtune credits --run-dir RUN)")


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if args.rounds is not None:
        out.setdefault("federation", {})["rounds"] = args.rounds
    if args.contributors is not None:
        out.setdefault("simulation", {})["contributors"] = args.contributors
    if args.eval_threads is not None:
        out.setdefault("evaluation", {})["threads"] = args.eval_threads
    return out


def quiet_libraries() -> None:
    """Hide download-style progress bars and deprecation chatter that say nothing about the campaign."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.rundir import RunDir, fresh_run_dir
    from fedtune.server.simulation import simulate

    if not args.verbose:
        quiet_libraries()
    cfg = validate_campaign(args.config, _overrides(args))
    requested = Path(args.run_dir).resolve() if args.run_dir else Path(cfg.campaign.run_dir)
    run_dir = RunDir(requested if args.resume and (requested / "config.toml").is_file() else fresh_run_dir(requested))
    cfg.campaign.run_dir = str(run_dir.root)
    run_dir.create(cfg.to_toml())
    print(f"run dir: {run_dir.root}", file=sys.stderr)
    reporter = _ProgressReporter()
    try:
        simulate(cfg, run_dir, reporter, verbose=args.verbose)
    finally:
        reporter.close()
    rows = run_dir.read_metrics()
    if len(rows) != cfg.federation.rounds + 1:
        print(
            f"error: the campaign stopped after round {len(rows) - 1} of {cfg.federation.rounds}; see the log above",
            file=sys.stderr,
        )
        return 1
    _summary(run_dir.root, rows)
    if len(rows) > 1 and not any(r.get("applied", r.get("participants", 0) > 0) for r in rows[1:]):
        print(
            "error: no round applied an update (every contributor failed or declined); see the log with --verbose",
            file=sys.stderr,
        )
        return 1
    return 0


def add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``simulate`` on ``fedtune``'s sub-commands."""
    sim = sub.add_parser("simulate", help="run a whole campaign on this machine (Flower simulation engine)")
    sim.add_argument("config", help="campaign TOML file, e.g. experiments/quickstart.toml")
    sim.add_argument("--run-dir", help="where to write the run (default: [campaign] run_dir)")
    sim.add_argument("--rounds", type=int, help="override [federation] rounds")
    sim.add_argument("--contributors", type=int, help="override [simulation] contributors")
    sim.add_argument(
        "--eval-threads", type=int, help="override [evaluation] threads (torch threads of the server's evaluation)"
    )
    sim.add_argument(
        "--resume", action="store_true", help="carry on an interrupted run in --run-dir from its last completed round"
    )
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.set_defaults(func=cmd_simulate)
