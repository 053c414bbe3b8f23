"""When contributor failures make a campaign impossible: stop it, with the reason, instead of carrying on.

A round in which every sampled contributor fails with the same error (an ε no noise multiplier reaches, a
base model none of them can load, a bug) will fail the same way next round: carrying on only writes rounds
that apply nothing and ends in "exit 0, down 0.0%". The round loop calls :func:`stop_if_hopeless` with a
round's outcomes before it records the round; it raises :class:`CampaignStopped`, which ``fedtune simulate``
turns into one ``error:`` line and a non-zero exit. The run dir keeps the rounds before, so ``--resume``
carries on once the cause is fixed.

Pitfalls: Flower wraps a contributor's exception in layers of its own (in simulation, a Ray traceback in
the error reason), so reasons are compared by their last line, the exception's own message; a round in
which anyone trained, declined or merely timed out is never a reason to stop (that is what ``min_cohort``
and later rounds are for).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.strategies.driver import NodeOutcome


class CampaignStopped(RuntimeError):
    """The campaign cannot go on; ``str()`` is the one line shown to the user."""


def stop_if_hopeless(server_round: int, outcomes: Sequence[NodeOutcome]) -> None:
    """Raise :class:`CampaignStopped` when every sampled contributor failed with the same error this round."""
    errors = [o for o in outcomes if o.error]
    if not outcomes or len(errors) != len(outcomes):
        return
    reasons = {(o.reason or "").split(": ", 1)[-1] for o in errors}  # without the stage label
    if len(reasons) == 1:
        raise CampaignStopped(
            f"round {server_round}: every contributor ({len(errors)}) failed the same way, so the campaign "
            f"cannot go on: {reasons.pop()}"
        )
