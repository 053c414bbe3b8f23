"""How many neighbours k and what threshold t a SecAgg+ round needs against a coordinator with colluders.

Job
    Turn a contributor's threat model (:class:`SecAggPolicy`: security parameter σ, the largest colluding fraction
    γ of a cohort, the dropout fraction δ, the smallest cohort it joins) into the round parameters it accepts
    (:func:`check_sizing`) and the ones an honest coordinator sends (:func:`size_round`). Pure arithmetic: no
    transport, no cryptography.

Threat
    The coordinator colludes with ``C = ⌊γ·n⌋`` members of an ``n``-member cohort (Sybils it enrolled count), fixed
    before the neighbour graph is drawn: the graph seed is a hash of every member's nonce, committed before any is
    revealed (:mod:`fedtune.secagg.protocol`). The graph is a k-regular Harary ring over a uniformly random order
    of the cohort, so each member's neighbourhood is a uniformly random k-subset of the other ``n − 1``. An honest
    member u's secrets (its self-mask seed b_u and its mask key s_u) are recoverable only if at least t of its k
    share holders collude: the signed survivor set and the consistency quorum (:func:`quorum`) make every honest
    holder reveal the same one of the two, so the colluders must supply all t shares of the other themselves.
    The number of colluders among u's neighbours is hypergeometric ``Hyp(n − 1, C, k)``, hence

        P[some honest member's secrets are recoverable] ≤ (n − C) · P[Hyp(n − 1, C, k) ≥ t]     (union bound)

    computed exactly (integer arithmetic) by :func:`exposure_probability`; it is 0 whenever ``t > C``.
    Liveness is judged against honest failures only (a malicious coordinator can always stall a round): each
    member independently drops with probability δ after the cohort's view is signed; the round finishes when every
    member has ≥ t neighbours left to reveal its shares and ≥ :func:`quorum` members sign the survivor set:

        P[the round cannot finish] ≤ n · P[Bin(k, 1 − δ) < t] + P[Bin(n, 1 − δ) < quorum]     (union bound)

    (:func:`failure_probability`). :func:`size_round` picks the smallest k, and for it the smallest t > k/2, with
    exposure ≤ 2^-σ and failure ≤ :data:`LIVENESS_TARGET`; where no k < n − 1 reaches that target (small
    cohorts), the complete graph with the smallest private t.

Pitfalls
    The bounds are per round attempt: a coordinator that aborts and restarts a round draws a fresh graph each
    time, so m attempts multiply the exposure bound by m. γ counts members of the signed view, not of the cohort
    the coordinator claims: a view smaller than the cohort is re-checked with its own size. Dropouts between a
    member's commitment and its reveal abort the round (tolerating them would let the coordinator grind the
    graph), so the liveness bound assumes dropouts after the reveal (training happens before the commitment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "LIVENESS_TARGET",
    "SecAggPolicy",
    "check_sizing",
    "corrupt_count",
    "effective_degree",
    "exposure_probability",
    "failure_probability",
    "quorum",
    "size_round",
    "smallest_threshold",
]

LIVENESS_TARGET = 2.0**-10
"""Largest per-round probability that honest dropouts stop a round, for the parameters an honest coordinator picks."""


@dataclass(frozen=True)
class SecAggPolicy:
    """A contributor's SecAgg+ threat model (the SecAgg+ fields of its ``ContributorPolicy``).

    Parameters
    ----------
    security_bits : int
        σ: per round, an honest member's secrets may be recoverable with probability at most 2^-σ.
    corrupt_fraction : float
        γ: the largest fraction of a cohort the coordinator colludes with (its own Sybils included).
    dropout_fraction : float
        δ: each member's chance of dropping during a round; sizes t for liveness (never a reason to refuse).
    min_cohort : int
        The smallest signed cohort (and survivor set) this contributor takes part in.
    max_cohort : int
        The largest: a member checks every view member's signature and sizes the round over the whole cohort, so
        a coordinator naming a million members would hold the machine for minutes each round.
    """

    security_bits: int = 40
    corrupt_fraction: float = 0.2
    dropout_fraction: float = 0.2
    min_cohort: int = 2
    max_cohort: int = 10_000

    def __post_init__(self) -> None:
        if not 1 <= self.security_bits <= 256:
            raise ValueError(f"security_bits must be in [1, 256], got {self.security_bits}")
        if not 0.0 <= self.corrupt_fraction < 1.0:
            raise ValueError(f"corrupt_fraction must be in [0, 1), got {self.corrupt_fraction}")
        if not 0.0 <= self.dropout_fraction < 1.0:
            raise ValueError(f"dropout_fraction must be in [0, 1), got {self.dropout_fraction}")
        if self.min_cohort < 2:
            raise ValueError(f"min_cohort must be at least 2, got {self.min_cohort}")
        if self.max_cohort < self.min_cohort:
            raise ValueError(f"max_cohort must be at least min_cohort ({self.min_cohort}), got {self.max_cohort}")


def effective_degree(cohort_size: int, neighbours: int) -> int:
    """Degree actually used: k rounded up to even (a Harary ring), or n − 1 for a complete graph."""
    return min(cohort_size - 1, neighbours + neighbours % 2)


def corrupt_count(cohort_size: int, corrupt_fraction: float) -> int:
    """C = ⌊γ·n⌋ colluders in a cohort of n (a hair of slack so 0.2·10 is 2, not 1)."""
    return math.floor(corrupt_fraction * cohort_size + 1e-9)


def quorum(cohort_size: int, corrupt: int) -> int:
    """Signatures on the survivor set a member needs before it reveals shares: ⌊(n + C)/2⌋ + 1.

    Honest members sign one survivor set each, colluders any number; two different sets with this many
    signatures would need ``2·quorum ≤ n + C`` signatures, so at most one survivor set can reach it.
    """
    return (cohort_size + corrupt) // 2 + 1


def exposure_probability(cohort_size: int, degree: int, threshold: int, corrupt: int) -> float:
    """Union bound on P[some honest member has ≥ t colluders among its k neighbours], exact per member.

    ``(n − C) · P[Hyp(n − 1, C, k) ≥ t]``, the hypergeometric tail summed in integers.
    """
    n, k, t, c = cohort_size, degree, threshold, corrupt
    if not 0 <= c < n or not 1 <= k <= n - 1:
        raise ValueError(f"need 0 <= corrupt < n and 1 <= degree <= n - 1 (n={n}, k={k}, C={c})")
    hits = sum(math.comb(c, i) * math.comb(n - 1 - c, k - i) for i in range(max(t, 0), min(c, k) + 1))
    return float(min(Fraction(1), (n - c) * Fraction(hits, math.comb(n - 1, k))))


def _binomial_below(trials: int, p: float, t: int) -> float:
    """P[Bin(trials, p) < t], summed in log space (no overflow for large cohorts)."""
    if t <= 0:
        return 0.0
    if t > trials:
        return 1.0
    if p >= 1.0:
        return 0.0
    if p <= 0.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [
        math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1) + i * lp + (trials - i) * lq
        for i in range(t)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def failure_probability(cohort_size: int, degree: int, threshold: int, dropout: float, corrupt: int = 0) -> float:
    """P[honest dropouts (each member with probability δ) stop the round]: a union bound, exact when complete.

    Over the complete graph every member's holders are all the others, so with S members left the round
    finishes iff ``S − 1 ≥ t`` (or nobody dropped) and ``S ≥ quorum``: one binomial tail.
    """
    n = cohort_size
    need = max(threshold, quorum(n, corrupt))
    if degree == n - 1:
        return _binomial_below(n, 1.0 - dropout, max(threshold + 1, need)) if threshold + 1 <= n else 1.0
    holders = n * _binomial_below(degree, 1.0 - dropout, threshold)
    return min(1.0, holders + _binomial_below(n, 1.0 - dropout, need))


def smallest_threshold(cohort_size: int, degree: int, policy: SecAggPolicy) -> int | None:
    """Smallest t in (k/2, k] whose exposure bound meets ``policy`` for this cohort and degree, or None."""
    n, c = cohort_size, corrupt_count(cohort_size, policy.corrupt_fraction)
    return _smallest_private_threshold(n, degree, c, policy.security_bits)


def _smallest_private_threshold(n: int, k: int, corrupt: int, security_bits: int) -> int | None:
    bound = 2.0**-security_bits
    for t in range(k // 2 + 1, k + 1):
        if exposure_probability(n, k, t, corrupt) <= bound:
            return t
    return None


def size_round(cohort_size: int, policy: SecAggPolicy, liveness: float = LIVENESS_TARGET) -> tuple[int, int]:
    """(k, t) for a cohort: the smallest even degree, with its smallest threshold, meeting σ, γ and liveness.

    Raises
    ------
    ValueError
        When no threshold keeps the secrets safe even over the complete graph (γ too close to 1 for the cohort).
    """
    n = cohort_size
    if n < 2:
        raise ValueError("a secure aggregation cohort needs at least 2 members")
    c = corrupt_count(n, policy.corrupt_fraction)
    for k in [*range(2, n - 1, 2), n - 1]:
        t = _smallest_private_threshold(n, k, c, policy.security_bits)
        if t is not None and failure_probability(n, k, t, policy.dropout_fraction, c) <= liveness:
            return k, t
    t = _smallest_private_threshold(n, n - 1, c, policy.security_bits)
    if t is None:
        raise ValueError(
            f"no threshold protects a cohort of {n} with {c} colluders (γ = {policy.corrupt_fraction}): "
            "use a larger cohort or a smaller corrupt fraction"
        )
    return n - 1, t


def check_sizing(cohort_size: int, neighbours: int, threshold: int, policy: SecAggPolicy) -> str | None:
    """Why a contributor with ``policy`` refuses (n, k, t), or None: the cohort size and the exposure bound."""
    n = cohort_size
    if n < policy.min_cohort:
        return f"secure-aggregation cohort of {n} is below this contributor's minimum {policy.min_cohort}"
    k = effective_degree(n, neighbours)
    if not k / 2 < threshold <= k:
        return f"threshold {threshold} must satisfy {k}/2 < t <= {k} (degree {k} for a cohort of {n})"
    c = corrupt_count(n, policy.corrupt_fraction)
    exposure = exposure_probability(n, k, threshold, c)
    if exposure > 2.0**-policy.security_bits:
        need = _smallest_private_threshold(n, k, c, policy.security_bits)
        fix = f"threshold >= {need}" if need is not None else "more neighbours"
        return (
            f"k={k}, t={threshold} for a cohort of {n} with {c} colluders (γ={policy.corrupt_fraction}) exposes "
            f"a contributor with probability {exposure:.2g} > 2^-{policy.security_bits}: needs {fix}"
        )
    return None
