"""The argument parser of every fedtune command: a usage mistake is one ``error:`` line and exit code 2.

argparse's default prints the whole usage block before its message; the README promises one line per problem,
so :class:`OneLineParser` prints only the message and points at ``--help``. Sub-command parsers made through
``add_subparsers`` inherit the class.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)
