"""The ``fedtune`` command line.

Bad input (campaign file, data, arguments) gets one line on stderr starting with ``error:`` and exit code 2,
before anything is written; Ctrl-C exits 130. Sub-commands import their heavy dependencies only when they run.
"""

from __future__ import annotations

import argparse
import sys

from fedtune.cli.parser import OneLineParser
from fedtune.config import ConfigError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from fedtune.cli.credits import add_credits_parser
    from fedtune.cli.deploy import add_deploy_parsers
    from fedtune.cli.research import add_research_parsers
    from fedtune.cli.simulate import add_simulate_parser

    parser = OneLineParser(prog="fedtune", description="Federated LoRA fine-tuning on community GPUs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_parser(sub)
    add_credits_parser(sub)
    add_deploy_parsers(sub)
    add_research_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C while checking, before anything was started or written
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
