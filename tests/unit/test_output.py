"""What ``simulate`` prints: contributor failures summarised (and a hopeless campaign stopped), Flower's warnings a
user cannot act on muted, tables at their natural width when the output is not a terminal."""

from __future__ import annotations

import logging

import pytest

from fedtune.cli.simulate import _QuietFlower
from fedtune.console import PIPE_WIDTH, one_line, output_console
from fedtune.server.failures import CampaignStopped, stop_if_hopeless
from fedtune.strategies.driver import NodeOutcome, failure_reason

RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() "
    '(pid=123, ip=127.0.0.1)\n  File "ray_actor.py", line 65, in run\n    raise ClientAppException(str(ex)) from ex\n'
    "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: "
    "cannot reach ε=0.001, δ=1e-05 with q=0.04 over 6 steps: The privacy budget is too low.'>"
)


def test_failure_reason_is_the_contributors_own_message() -> None:
    assert failure_reason(RAY_REASON) == (
        "cannot reach ε=0.001, δ=1e-05 with q=0.04 over 6 steps: The privacy budget is too low."
    )
    assert failure_reason("ValueError: bad shard\n") == "ValueError: bad shard"
    assert failure_reason("<class 'ValueError'>:<'no such shard'>") == "no such shard"
    assert failure_reason(None) == "no reason given"


def crashed(node: int, reason: str) -> NodeOutcome:
    """A node whose ClientApp raised, as the round driver records it."""
    return NodeOutcome(node, "failed", f"train: {failure_reason(reason)}", error=True)


def test_every_contributor_failing_the_same_way_stops_the_campaign() -> None:
    outcomes = [crashed(node, RAY_REASON.replace("pid=123", f"pid={node}")) for node in (1, 2, 3)]
    with pytest.raises(CampaignStopped, match=r"round 4: every contributor \(3\) failed the same way.*cannot reach"):
        stop_if_hopeless(4, outcomes)


@pytest.mark.parametrize(
    "others",
    [
        [NodeOutcome(9, "declined", "privacy budget spent")],
        [NodeOutcome(9, "dropped", "no reply within the round timeout")],
        [NodeOutcome(9, "failed", "round not applied: too few updates")],  # trained, not applied
        [crashed(9, "CUDA out of memory")],  # a different error: maybe this contributor's own problem
    ],
)
def test_a_round_with_any_other_outcome_goes_on(others: list[NodeOutcome]) -> None:
    stop_if_hopeless(1, [crashed(1, RAY_REASON), crashed(2, RAY_REASON), *others])


def test_one_line_takes_the_innermost_exception() -> None:
    try:
        try:
            raise ValueError("JSON parse error:\n  row 0")
        except ValueError as inner:
            raise RuntimeError("An error occurred while generating the dataset") from inner
    except RuntimeError as outer:
        assert one_line(outer) == "JSON parse error: row 0"
    assert one_line("x" * 500).endswith("...") and len(one_line("x" * 500)) == 300


def _record(level: int, msg: str, path: str = "/site-packages/flwr/server/grid/grid.py") -> logging.LogRecord:
    return logging.LogRecord("flwr", level, path, 1, msg, None, None)


def test_flower_warnings_a_user_cannot_act_on_are_muted() -> None:
    quiet = _QuietFlower()
    assert not quiet.filter(_record(logging.WARNING, "DEPRECATED FEATURE: The `run_simulation` function is deprecated"))
    assert not quiet.filter(_record(logging.WARNING, "fraction_evaluate is set to 0.0"))
    assert not quiet.filter(_record(logging.ERROR, "Traceback ...", "/flwr/server/superlink/fleet/vce/vce_api.py"))
    assert quiet.filter(_record(logging.ERROR, "Simulation Runtime crashed."))


def test_tables_keep_their_width_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from rich.table import Table

    console = output_console()  # stdout is captured: not a terminal
    assert not console.is_terminal and console.width == PIPE_WIDTH
    table = Table()
    headers = ["round", "eval loss", "perplexity", "train loss", "contributors", "declined", "up MB", "down MB"]
    for header in [*headers, "wall seconds"]:
        table.add_column(header)
    table.add_row(*["123456.789"] * 9)
    console.print(table)
    out = capsys.readouterr().out
    assert "…" not in out and all(h in out for h in headers) and "123456.789" in out
