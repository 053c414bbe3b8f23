"""What people read while a campaign runs: one line per round, formatted in one place.

``simulate``'s progress bar, ``coordinate``'s console and the server log print the campaign's rounds with
:func:`campaign_round_line`; ``join`` prints the contributor's own rounds with :func:`contributor_round_line`.
Errors from libraries are cut to one line with :func:`one_line` (the CLI's promise: a problem gets one line).
"""

from __future__ import annotations

from typing import Any

PIPE_WIDTH = 1000
"""Columns rich may use when output is not a terminal: tables keep their natural width instead of 80."""


def campaign_round_line(row: dict[str, Any]) -> str:
    """One line for a round of ``metrics.jsonl`` (round 0 is the initial adapter)."""
    loss = float(row.get("eval_loss", float("nan")))
    if row.get("round") == 0:
        return f"round 0: eval loss {loss:.4f} (initial adapter)"
    text = f"round {row.get('round')}: eval loss {loss:.4f}, {row.get('participants', 0)} contributors"
    extra = [f"{row[k]} {k}" for k in ("declined", "failed") if row.get(k)]
    if extra:
        text += f" ({', '.join(extra)})"
    if row.get("applied") is False:
        text += ", no update applied"
    return text


def contributor_round_line(row: dict[str, Any]) -> str:
    """One line for a round of a contributor's own ``rounds.jsonl``."""
    if row.get("error"):
        return f"a round failed: {row['error']} (the coordinator was told only the exception's type)"
    if row.get("declined"):
        return f"round {row.get('round')}: declined ({row.get('reason', 'no reason given')})"
    parts = [f"round {row.get('round')}: trained {row.get('examples', 0)} examples, {row.get('tokens', 0)} tokens"]
    if row.get("train_loss") is not None:
        parts.append(f"loss {float(row['train_loss']):.4f}")
    if row.get("epsilon") is not None:
        parts.append(f"ε {float(row['epsilon']):.2f}")
    if row.get("wall_s") is not None:
        parts.append(f"{float(row['wall_s']):.1f} s")
    return ", ".join(parts)


def one_line(problem: BaseException | str, limit: int = 300) -> str:
    """A problem on one line: the innermost exception of a chain (libraries wrap the useful one), whitespace
    collapsed, cut at ``limit`` characters; for text, its last non-blank line (a traceback's message)."""
    if isinstance(problem, BaseException):
        exc = problem
        while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        text = " ".join(str(exc).split()) or type(exc).__name__
    else:
        lines = [line.strip() for line in problem.splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def output_console(stderr: bool = False) -> Any:
    """A rich ``Console``: the terminal's width on a terminal; elsewhere (a pipe, a file) wide enough that
    tables keep their natural width instead of being cut at rich's default of 80 columns."""
    from rich.console import Console

    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)
