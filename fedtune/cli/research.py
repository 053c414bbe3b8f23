"""The researcher's commands: ``init`` (a campaign from a domain template), ``sweep`` (a grid of simulated runs
and their comparison table) and ``report`` (an HTML page with plots of one or more runs).

Bad input gets one ``error:`` line and exit code 2 (a :class:`ConfigError`) before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtune.config import ConfigError


def cmd_init(args: argparse.Namespace) -> int:
    from fedtune.research.templates import write_template

    target = write_template(Path(args.dir), args.template, model=args.model, data=args.data, force=args.force)
    print(f"wrote {target} (template {args.template}); next: fedtune simulate {target}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedtune.cli.simulate import _overrides
    from fedtune.config import load_config
    from fedtune.preflight import check_campaign
    from fedtune.research.sweep import Sweep, SweepInterrupted, parse_axis, run_sweep

    axes = [parse_axis(spec, args.config) for spec in args.set or []]
    if len({a.name for a in axes}) != len(axes):
        raise ConfigError(args.config, "--set", "each section.key at most once", [a.name for a in axes])
    root = Path(args.out) if args.out else Path(load_config(args.config).campaign.run_dir + "-sweep")
    sweep = Sweep(Path(args.config), axes, root.resolve(), _overrides(args))
    if not args.verbose:
        from fedtune.cli.simulate import quiet_libraries

        quiet_libraries()
    try:
        return run_sweep(sweep, check=check_campaign, say=lambda line: print(line, flush=True), verbose=args.verbose)
    except SweepInterrupted as exc:
        print(
            f"interrupted: {sweep.root} keeps every finished point and the completed rounds of {exc.point.name}; "
            "run the same command again to carry on",
            file=sys.stderr,
            flush=True,
        )
        return 128 + exc.signum


def cmd_report(args: argparse.Namespace) -> int:
    from fedtune.research.report import build_report

    labels = args.labels.split(",") if args.labels else None
    first = Path(args.runs[0])
    out = Path(args.out) if args.out else (first / "report" if len(args.runs) == 1 else Path("fedtune-report"))
    try:
        written = build_report(args.runs, out, title=args.title, labels=labels)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {written['html']} ({len(written) - 1} figures, PNGs beside it)")
    return 0


def add_research_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``init``, ``sweep`` and ``report`` on ``fedtune``'s sub-commands."""
    from fedtune.research.templates import template_names

    init = sub.add_parser("init", help="write a campaign file from a domain template (FlowerTune-style)")
    init.add_argument("dir", help="folder for campaign.toml (created if absent)")
    init.add_argument("--template", default="general", choices=template_names(), help="domain (default: general)")
    init.add_argument("--model", help="replace the template's base model (hub id or local folder)")
    init.add_argument("--data", help="replace the template's training source (hub id or local file)")
    init.add_argument("--force", action="store_true", help="overwrite an existing campaign.toml")
    init.set_defaults(func=cmd_init)

    sw = sub.add_parser("sweep", help="run a grid of campaign variants in simulation and compare them")
    sw.add_argument("config", help="campaign TOML file")
    sw.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=V1,V2",
        help="an axis of the grid, e.g. privacy.target_epsilon=1,4,8 (repeat for more axes)",
    )
    sw.add_argument("--out", help="sweep folder (default: the campaign's run_dir + '-sweep'); rerun to resume")
    sw.add_argument("--rounds", type=int, help="override [federation] rounds for every point")
    sw.add_argument("--contributors", type=int, help="override [simulation] contributors for every point")
    sw.add_argument("--eval-threads", type=int, help="override [evaluation] threads for every point")
    sw.add_argument("--verbose", action="store_true", help="show each point's simulation output")
    sw.set_defaults(func=cmd_sweep)

    rp = sub.add_parser("report", help="an HTML report with plots comparing runs (and sweeps)")
    rp.add_argument("runs", nargs="+", help="run dirs or sweep folders")
    rp.add_argument("--out", help="output folder (default: RUN/report for one run, else ./fedtune-report)")
    rp.add_argument("--title", default="fedtune report")
    rp.add_argument("--labels", help="comma-separated legend labels, one per run (default: campaign names)")
    rp.set_defaults(func=cmd_report)
