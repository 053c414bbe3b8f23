"""The k/t sizing of SecAgg+ checked against brute force and Monte Carlo on small cohorts.

The exposure bound must be a true upper bound on P[some honest member has ≥ t colluding neighbours] for the graph
the protocol draws (a Harary ring over a uniformly random order), and exact per member; the liveness bound must
hold for independent dropouts; :func:`size_round` must pick the smallest degree that meets both.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from fedtune.secagg import (
    NeighbourGraph,
    SecAggParams,
    SecAggPolicy,
    check_round_params,
    corrupt_count,
    exposure_probability,
    failure_probability,
    quorum,
    size_round,
)
from fedtune.secagg.quantize import QuantConfig
from fedtune.secagg.sizing import LIVENESS_TARGET, check_sizing, smallest_threshold


@pytest.mark.parametrize("n,corrupt,degree,t", [(7, 2, 2, 2), (7, 2, 4, 2), (7, 3, 4, 3), (8, 3, 4, 2), (6, 2, 5, 2)])
def test_exposure_is_exact_per_member_and_bounds_the_brute_force_probability(
    n: int, corrupt: int, degree: int, t: int
) -> None:
    """Every order of the ring, equally likely: the protocol's graph seed makes the order uniform."""
    members, colluders = list(range(n)), set(range(n - corrupt, n))
    honest = [u for u in members if u not in colluders]
    any_exposed, exposed = 0, dict.fromkeys(honest, 0)
    orders = list(itertools.permutations(members))
    for order in orders:
        graph = NeighbourGraph.ring(order, degree)
        hits = [u for u in honest if len(graph[u] & colluders) >= t]
        any_exposed += bool(hits)
        for u in hits:
            exposed[u] += 1
    per_member = Fraction(exposed[honest[0]], len(orders))
    assert all(Fraction(e, len(orders)) == per_member for e in exposed.values())
    bound = exposure_probability(n, degree, t, corrupt)
    assert bound == pytest.approx(float(min(1, len(honest) * per_member)), rel=1e-12)  # exact hypergeometric tail
    assert any_exposed / len(orders) <= bound + 1e-12


def test_exposure_is_zero_once_the_threshold_exceeds_the_colluders() -> None:
    for n in (10, 50, 100):
        c = corrupt_count(n, 0.2)
        assert exposure_probability(n, min(n - 1, 2 * c), c + 1, c) == 0.0
        assert exposure_probability(n, min(n - 1, 2 * c), c, c) > 0.0


@pytest.mark.slow
@pytest.mark.parametrize("n,degree,t,dropout", [(12, 6, 4, 0.2), (20, 8, 5, 0.1), (9, 8, 5, 0.2), (16, 15, 8, 0.3)])
def test_failure_bound_holds_against_monte_carlo_dropouts(n: int, degree: int, t: int, dropout: float) -> None:
    """The round finishes iff every member keeps ≥ t live neighbours and a quorum of members is left."""
    rng = np.random.default_rng(n * 100 + degree)
    trials, failures, need = 20_000, 0, max(t, quorum(n, 0))
    for _ in range(trials):
        graph = NeighbourGraph.ring(list(rng.permutation(n)), degree)
        alive = set(np.flatnonzero(rng.random(n) >= dropout).tolist())
        failures += len(alive) < need or any(len(graph[u] & alive) < t for u in range(n))
    bound, rate = failure_probability(n, degree, t, dropout), failures / trials
    margin = 4 * math.sqrt(max(rate, 1e-4) * (1 - rate) / trials)
    assert rate <= bound + margin
    if degree == n - 1:  # exact for the complete graph
        assert rate == pytest.approx(bound, abs=margin)


@pytest.mark.parametrize("n", [2, 3, 4, 8, 10, 20, 33, 100, 200])
def test_size_round_is_the_smallest_degree_meeting_both_targets(n: int) -> None:
    policy = SecAggPolicy()
    k, t = size_round(n, policy)
    c = corrupt_count(n, policy.corrupt_fraction)
    degree = min(n - 1, k)
    assert degree / 2 < t <= degree and exposure_probability(n, degree, t, c) <= 2**-40
    assert t == smallest_threshold(n, degree, policy) and check_sizing(n, k, t, policy) is None
    for smaller in range(2, degree, 2):  # no sparser graph meets both
        t2 = smallest_threshold(n, smaller, policy)
        assert t2 is None or failure_probability(n, smaller, t2, 0.2, c) > LIVENESS_TARGET
    if degree < n - 1:
        assert failure_probability(n, degree, t, 0.2, c) <= LIVENESS_TARGET


def test_the_defaults_for_the_cohorts_readme_quotes() -> None:
    assert [size_round(n, SecAggPolicy()) for n in (10, 20, 100)] == [(9, 5), (19, 10), (44, 23)]


def test_a_contributor_refuses_old_defaults_and_small_cohorts_by_its_own_policy() -> None:
    quant = QuantConfig(clip=1.0, bits=16)
    bell = SecAggParams.create("c", 1, range(100), 8, quant, neighbours=20, threshold=11)
    assert "exposes a contributor" in check_round_params(bell, SecAggPolicy())
    sized = SecAggParams.create("c", 1, range(100), 8, quant)
    assert check_round_params(sized, SecAggPolicy()) is None
    assert "below this contributor's minimum 150" in check_round_params(sized, SecAggPolicy(min_cohort=150))
    assert "exposes" in check_round_params(sized, SecAggPolicy(corrupt_fraction=0.45))
    at_least_80 = SecAggPolicy(min_cohort=80)  # a cohort of 100 is claimed, a view of 60 signed
    assert check_round_params(sized, at_least_80) is None
    assert "cohort of 60 is below" in check_round_params(sized, at_least_80, view_size=60)
    at_most_90 = SecAggPolicy(max_cohort=90)  # claimed or signed, a cohort above the maximum is declined
    assert "cohort of 100 is above this client's maximum 90" in check_round_params(sized, at_most_90)
    assert check_round_params(sized, at_most_90, view_size=90) is None
    with pytest.raises(ValueError, match="max_cohort"):
        SecAggPolicy(min_cohort=10, max_cohort=5)
    with pytest.raises(ValueError, match="corrupt_fraction"):
        SecAggPolicy(corrupt_fraction=1.0)
