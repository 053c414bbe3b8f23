"""The ``simulate`` command: a whole campaign on this machine, with a progress bar and a summary table.

Order matters: the campaign file and ``--run-dir`` are checked before anything heavy is imported (a typo
answers in well under a second), then :mod:`fedtune.preflight` checks model, data, DP and SecAgg+; only then
is the run dir created (or, with ``--resume``, repaired) and Ray started. Every problem before that point is
one ``error:`` line, exit 2, nothing written. Ctrl-C stops the run within seconds, exit 130, and names the
``--resume`` command (:mod:`fedtune.cli.interrupt`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from fedtune.config import CampaignConfig, load_config
from fedtune.console import campaign_round_line, output_console
from fedtune.rundir import RunDir, usable_run_dir


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
    console = output_console()
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


class _QuietFlower(logging.Filter):
    """Drop Flower's records a fedtune user cannot act on; fedtune reports contributor failures itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:  # a contributor's traceback, logged by the engine per message
            return not record.pathname.endswith(("vce_api.py", "raybackend.py"))
        return False  # warnings: run_simulation's deprecation, fraction_evaluate = 0, ...


def quiet_libraries() -> None:
    """Hide progress bars, deprecation chatter and Flower's warnings that say nothing about the campaign."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _QuietFlower) for f in flwr_logger.filters):
        flwr_logger.addFilter(_QuietFlower())


def resume_command(args: argparse.Namespace, run_dir: Path) -> str:
    """The command that carries on this run: same campaign file and overrides, ``--resume``."""
    parts = ["fedtune", "simulate", args.config, "--run-dir", str(run_dir), "--resume"]
    if args.contributors is not None:
        parts += ["--contributors", str(args.contributors)]
    if args.rounds is not None:
        parts += ["--rounds", str(args.rounds)]
    return shlex.join(parts)


def _farewell(args: argparse.Namespace, run_dir: RunDir) -> str:
    rows = run_dir.read_metrics()
    kept = f"rounds 0-{len(rows) - 1}" if rows else "no completed round"
    return f"interrupted: {run_dir.root} keeps {kept}; carry on with: {resume_command(args, run_dir.root)}"


def prepare_run_dir(args: argparse.Namespace, cfg: CampaignConfig) -> tuple[RunDir, list[str]]:
    """Check everything, then create the run dir (or repair it for ``--resume``); returns it and what was done.

    Nothing is written until every check has passed.
    """
    from fedtune.preflight import check_campaign, check_local_contributors

    requested = Path(args.run_dir) if args.run_dir else Path(cfg.campaign.run_dir)
    run_dir = RunDir(usable_run_dir(requested, args.config, resume=args.resume).resolve())
    plan = None
    if args.resume:
        if args.rounds is None and run_dir.config.is_file():  # carry on to the rounds it started with (or ran to)
            started = load_config(run_dir.config).federation.rounds
            cfg.federation.rounds = max(started, len(run_dir.read_metrics()) - 1)
        plan = run_dir.check_resumable(cfg, args.config)
    if not args.verbose:
        quiet_libraries()
    check_campaign(cfg)
    check_local_contributors(cfg)
    cfg.campaign.run_dir = str(run_dir.root)
    if plan is not None:
        return run_dir, plan.apply()
    run_dir.create(cfg.to_toml())
    return run_dir, []


def cmd_simulate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args))
    run_dir, notes = prepare_run_dir(args, cfg)
    from fedtune.server.simulation import private_ray_cluster, simulate

    private_ray_cluster()  # before anything imports ray (stop_on_interrupt does)
    from fedtune.cli.interrupt import stop_on_interrupt
    from fedtune.server.failures import CampaignStopped

    print(f"run dir: {run_dir.root}", file=sys.stderr)
    for note in notes:
        print(f"resume: {note}", file=sys.stderr)
    reporter = _ProgressReporter()
    try:
        with stop_on_interrupt(lambda: _farewell(args, run_dir)):
            simulate(cfg, run_dir, reporter, verbose=args.verbose)
    except CampaignStopped as exc:
        reporter.close()  # before the line, so the bar does not redraw over it
        print(f"error: {exc} (once fixed, carry on with: {resume_command(args, run_dir.root)})", file=sys.stderr)
        return 1
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
