"""How much compute credit a round of assigned work is worth, and how recent credit decays.

Under secure aggregation the coordinator never sees an individual update, and a contributor's own report of
how long it worked is gameable (BOINC's lesson). So credit is computed on the server from what the server
itself assigned and knows was included in the applied aggregate, and from the model both sides run.

Formula (README-ready)
----------------------
For a base model with ``N_base`` parameters and a LoRA adapter with ``N_adapter`` parameters, of which
``N_train`` are trained (``N_train = N_adapter`` for plain LoRA; with FFA-LoRA only B trains, so
``N_train`` is the size of the B matrices), one token of training costs, in floating-point operations:

* forward: ``2·N_base + 2·N_adapter`` (one multiply and one add per weight);
* backward, activation gradients: ``2·N_base + 2·N_adapter`` (needed through the frozen base too);
* backward, weight gradients: ``2·N_train`` (frozen weights get none);

so ``train_flops_per_token = 4·N_base + 4·N_adapter + 2·N_train``, which is ``4·N_base + 6·N_adapter`` for
plain LoRA. A contributor whose update was included in round *r* earns

    credit = assigned_tokens × train_flops_per_token / 10^12

in **TFLOP-credits**: one credit is 10^12 nominal training FLOPs. ``assigned_tokens`` counts the tokens of
the local steps the server asked for (sequences × their lengths), not what the contributor reports.
Declined, dropped and failed contributors earn 0 for that round. A contributor that took on less than the campaign
assigns (its own batch b and LoRA rank r, claimed with its update and checked by the round driver) is credited
for that: ``local_steps × b × max_seq_len`` tokens at the FLOPs per token of a rank-r adapter
(:func:`train_flops_per_token_at_rank`; A and B are linear in r). The count is nominal: it leaves out
attention-score FLOPs and the per-sample-gradient overhead of DP-SGD, and ``N_base`` is the base model's
parameter count as the server loads it. It is the same ruler for every contributor of a campaign, which is
what fairness needs.

Recent average credit (RAC), as in BOINC, is credit per day with exponential decay, half-life 7 days:

    RAC(now) = (ln 2 / 7 d) · Σ_i credit_i · 2^(−(now − t_i) / 7 d)

in TFLOP-credits per day: a contributor earning c credits every day has RAC ≈ c, and once it stops, its RAC
halves every 7 days. It is computed at query time from the grant times ``t_i``, so nothing decays in storage.

A reported wall time is checked, never trusted: if ``assigned_flops / reported_wall_s`` exceeds
``margin × declared_peak_flops`` (default margin 1.25) the claim is physically impossible for the declared
hardware and is flagged. Flagging changes no credit (credit never depends on the claim) and drops nothing.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

FLOPS_PER_CREDIT = 1e12
"""One TFLOP-credit is this many nominal training FLOPs."""

CREDIT_UNIT = "TFLOP-credit (1e12 nominal training FLOPs)"
RAC_UNIT = "TFLOP-credits per day"

RAC_HALF_LIFE = timedelta(days=7)
"""BOINC's half-life for recent average credit."""

DEFAULT_CLAIM_MARGIN = 1.25
"""Slack over the declared peak before a claimed speed counts as impossible (probe noise, clock boost)."""


def train_flops_per_token(
    n_base_params: int, n_adapter_params: int, n_trainable_adapter_params: int | None = None
) -> float:
    """Nominal FLOPs to train on one token: ``4·N_base + 4·N_adapter + 2·N_train``.

    Parameters
    ----------
    n_base_params : int
        Parameters of the frozen base model.
    n_adapter_params : int
        All adapter parameters (LoRA A and B), frozen or not: every one is in the forward and backward pass.
    n_trainable_adapter_params : int, optional
        Adapter parameters that receive weight gradients; defaults to all of them (plain LoRA, giving
        ``4·N_base + 6·N_adapter``). Pass the B-matrix size for FFA-LoRA.
    """
    n_train = n_adapter_params if n_trainable_adapter_params is None else n_trainable_adapter_params
    if n_base_params < 0 or n_adapter_params < 0 or not 0 <= n_train <= n_adapter_params:
        raise ValueError(
            f"need 0 <= trainable ({n_train}) <= adapter ({n_adapter_params}) and base >= 0 ({n_base_params})"
        )
    return 4.0 * n_base_params + 4.0 * n_adapter_params + 2.0 * n_train


def train_flops_per_token_at_rank(
    n_base_params: int, n_adapter_params: int, n_trainable_adapter_params: int, rank: int, campaign_rank: int
) -> float:
    """:func:`train_flops_per_token` for a contributor that trained a rank-``rank`` part of a rank-``campaign_rank``
    adapter: LoRA's parameter counts are linear in the rank (A is r × d_in, B is d_out × r)."""
    if not 1 <= rank <= campaign_rank:
        raise ValueError(f"need 1 <= rank ({rank}) <= campaign rank ({campaign_rank})")
    adapter = n_adapter_params * rank // campaign_rank
    return train_flops_per_token(n_base_params, adapter, n_trainable_adapter_params * rank // campaign_rank)


def assigned_flops(tokens: int, flops_per_token: float) -> float:
    """Nominal FLOPs of the work the server assigned."""
    if tokens < 0 or flops_per_token < 0:
        raise ValueError(f"tokens ({tokens}) and flops_per_token ({flops_per_token}) must be >= 0")
    return float(tokens) * float(flops_per_token)


def round_credit(tokens: int, flops_per_token: float) -> float:
    """Credit in TFLOP-credits for ``tokens`` assigned tokens: ``tokens·flops_per_token/1e12``."""
    return assigned_flops(tokens, flops_per_token) / FLOPS_PER_CREDIT


def rac_decay(elapsed: timedelta | float, half_life: timedelta = RAC_HALF_LIFE) -> float:
    """Weight ``2^(−elapsed/half_life)`` of credit granted ``elapsed`` ago (a timedelta, or seconds).

    Grants from the future (clock skew between writer and reader) count in full rather than more.
    """
    seconds = elapsed.total_seconds() if isinstance(elapsed, timedelta) else float(elapsed)
    return 2.0 ** (-max(seconds, 0.0) / half_life.total_seconds())


def rac_weight(granted: datetime, now: datetime, half_life: timedelta = RAC_HALF_LIFE) -> float:
    """RAC, per day, that one credit granted at ``granted`` is worth at ``now``.

    ``(ln 2 / half_life_days) · 2^(−age/half_life)``: the ``ln 2 / half_life`` factor turns the decayed sum
    into a rate, so steady daily credit ``c`` gives RAC ≈ ``c`` (the continuous form of BOINC's update rule).
    """
    return math.log(2.0) / (half_life / timedelta(days=1)) * rac_decay(now - granted, half_life)


def is_impossible_claim(
    assigned_flops: float,
    reported_wall_s: float | None,
    declared_peak_flops: float | None,
    margin: float = DEFAULT_CLAIM_MARGIN,
) -> bool:
    """Whether doing ``assigned_flops`` in ``reported_wall_s`` beats ``margin ×`` the declared peak FLOP/s.

    Unknown hardware or no reported time cannot be judged (``False``); a zero or negative time for real work
    is infinitely fast (``True``).
    """
    if reported_wall_s is None or declared_peak_flops is None or assigned_flops <= 0:
        return False
    if reported_wall_s <= 0:
        return True
    return assigned_flops / reported_wall_s > margin * declared_peak_flops
