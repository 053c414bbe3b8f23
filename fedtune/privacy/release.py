"""What a contributor may report besides its noised update: coarse figures that say little about its data.

Job: :func:`coarse_epsilon` and :func:`coarse_loss` turn the two figures a coordinator finds useful (the ε a
contributor has spent, its mean train loss) into values on a coarse public grid, the only form in which they
leave the contributor (:class:`fedtune.wire.TrainReport`, :class:`fedtune.wire.Decline`).

Threat: the coordinator is the adversary of each contributor's data. Everything it receives beyond the noised
update is an un-noised function of the private shard unless it is public or assigned: an exact ε is a function of
the sampling rate ``batch_size / n`` (it reveals the shard size ``n``), an exact mean loss moves with every sampled
record. On the grid, the ε reveals at most which step of :data:`EPSILON_STEP` it falls in (rounded up, so the
coordinator never under-estimates what was spent) and the loss one of ``LOSS_MAX / LOSS_STEP + 1`` values
(≤ 6.1 bits a round). Neither is covered by the DP guarantee; README's "What leaves a contributor" says so.
The loss is computed on an adapter the coordinator chose, so a crafted one turns those bits into a reading of
single records: it leaves only when the contributor's policy says ``report_train_loss`` (off by default).

Pitfalls: round ε *up* (a coordinator planning with it must not believe more budget is left than there is), and
clip the loss before rounding (a diverging run's loss would otherwise leave as an exact large number).
"""

from __future__ import annotations

import math

EPSILON_STEP = 0.25
"""Grid of a reported ε: rounded up to a multiple of this."""
LOSS_STEP = 0.25
"""Grid of a reported train loss: clipped to ``[0, LOSS_MAX]``, rounded to the nearest multiple of this."""
LOSS_MAX = 16.0
"""Largest reported train loss (a per-token cross-entropy above 16 nats is a diverged run either way)."""


def coarse_epsilon(epsilon: float) -> float:
    """``epsilon`` rounded up to a multiple of :data:`EPSILON_STEP` (``inf`` stays ``inf``, 0 stays 0)."""
    if math.isnan(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if math.isinf(epsilon):
        return epsilon
    return math.ceil(round(epsilon / EPSILON_STEP, 9)) * EPSILON_STEP


def coarse_loss(loss: float) -> float:
    """``loss`` clipped to ``[0, LOSS_MAX]`` and rounded to the nearest multiple of :data:`LOSS_STEP`.

    A non-finite loss (a diverged run) is reported as :data:`LOSS_MAX`.
    """
    if not math.isfinite(loss):
        return LOSS_MAX
    return round(min(max(loss, 0.0), LOSS_MAX) / LOSS_STEP) * LOSS_STEP
