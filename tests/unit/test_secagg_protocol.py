"""Correctness of the SecAgg+ core: exact modular sums under dropouts at every stage."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedtune.secagg import (
    STAGES,
    NeighbourGraph,
    QuantConfig,
    SecAggAbort,
    SecAggClient,
    SecAggParams,
    SecAggPolicy,
    SecAggServer,
    effective_degree,
    generate_identity,
    quantize,
    quorum,
    run_round,
    shamir,
    size_round,
)
from fedtune.secagg.quantize import max_bits

CAMPAIGN = "test-campaign"
_IDENTITIES = [generate_identity() for _ in range(40)]  # Ed25519 keygen once for all examples
ANY_KT = SecAggPolicy(corrupt_fraction=0.0)  # no colluders assumed: every k, t with k/2 < t <= k is private


def _setup(
    n: int, length: int, quant: QuantConfig, k: int | None, t: int | None, round_id: int = 1, seed: int = 0
) -> tuple[SecAggServer, dict[int, SecAggClient], dict[int, np.ndarray]]:
    """Build a server, n clients with sparse ids, and their float inputs."""
    ids = [7 + 13 * i for i in range(n)]
    registry = {cid: _IDENTITIES[i][1] for i, cid in enumerate(ids)}
    params = SecAggParams.create(CAMPAIGN, round_id, ids, length, quant, neighbours=k, threshold=t, policy=ANY_KT)
    clients = {
        cid: SecAggClient(cid, _IDENTITIES[i][0], CAMPAIGN, policy=ANY_KT, rng=np.random.default_rng(seed + cid))
        for i, cid in enumerate(ids)
    }
    rng = np.random.default_rng(seed)
    inputs = {cid: (rng.normal(0, quant.clip / 2, length)).astype(np.float32) for cid in ids}
    return SecAggServer(params, registry, ANY_KT), clients, inputs


def _expected_survivors(server: SecAggServer, drop: dict[str, set[int]]) -> tuple[int, ...] | None:
    """Oracle: the survivor set SecAgg+ must produce, or None when it must abort (after the round ran)."""
    params, t = server.params, server.params.threshold
    u1 = set(params.cohort) - drop.get("advertise", set())
    if len(u1) < t or effective_degree(len(u1), params.neighbours) < t or u1 & drop.get("view", set()):
        return None  # too few for the graph, or a missing reveal
    assert server.graph is not None  # drawn from the members' nonces once every one revealed
    nb = server.graph.neighbours_of
    u2 = u1 - drop.get("share_keys", set())
    if len(u2) < t:
        return None
    u3 = {u for u in u2 - drop.get("masked_input", set()) if len(nb(u) & u2) >= t}
    need = max(t, quorum(len(u1), 0))  # the consistency quorum, no colluders assumed
    if len(u3) < need or any(len(nb(u) & u3) < t for u in u3):
        return None
    u4 = u3 - drop.get("consistency", set())
    u5 = u4 - drop.get("unmask", set())
    if len(u4) < need or len(u5) < t:
        return None
    if any(len(nb(u) & u5) < t for u in u2):  # b-shares of u3, s-shares of u2 \ u3
        return None
    return tuple(sorted(u3))


@st.composite
def _scenarios(draw: st.DrawFn) -> tuple[int, int | None, int | None, int, QuantConfig, dict[str, set[int]]]:
    n = draw(st.integers(2, 40))
    k = draw(st.one_of(st.none(), st.integers(1, n - 1)))
    degree = effective_degree(n, size_round(n, ANY_KT)[0] if k is None else k)
    t = draw(st.one_of(st.none(), st.none(), st.integers(degree // 2 + 1, degree)))  # mostly t = k/2 + 1
    length = draw(st.integers(1, 300))
    quant = QuantConfig(clip=draw(st.floats(0.01, 100.0)), bits=draw(st.integers(2, min(24, max_bits(n)))))
    ids = [7 + 13 * i for i in range(n)]
    drop: dict[str, set[int]] = {}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))  # Hypothesis' own draws cluster at the edges
    if n >= 8 and rng.random() < 0.5:  # one client lost at each stage: exercises every recovery path at once
        recoverable = [s for s in STAGES if s != "view"]  # a reveal missing in "view" aborts by design
        victims = rng.permutation(ids)[: len(recoverable)]
        drop = {stage: {int(cid)} for stage, cid in zip(recoverable, victims, strict=False)}
    else:  # independent dropouts at a random rate and stage
        drop_rate = rng.choice([0.0, 0.05, 0.1, 0.2])
        for cid in ids:
            if rng.random() < drop_rate:
                drop.setdefault(str(rng.choice(STAGES)), set()).add(cid)
    return n, k, t, length, quant, drop


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenarios(), st.integers(0, 2**16))
def test_unmasked_sum_is_exact_under_dropouts(scenario: tuple, seed: int) -> None:
    n, k, t, length, quant, drop = scenario
    server, clients, inputs = _setup(n, length, quant, k, t, seed=seed)
    try:
        result = run_round(server, clients, inputs, drop)
    except SecAggAbort:
        result = None
    expected = _expected_survivors(server, drop)
    event("abort" if expected is None else f"ok, dropouts at {sorted(s for s, ids in drop.items() if ids)}")
    event(f"cohort size {'<10' if n < 10 else '<25' if n < 25 else '25-40'}")
    assert (result is None) == (expected is None)
    if result is None:
        return
    assert result.survivors == expected and not result.blamed
    plain = np.zeros(length, dtype=np.uint32)
    for cid in expected:  # same per-client rng stream as the client used
        plain += quantize(inputs[cid], quant, np.random.default_rng(seed + cid))
    np.testing.assert_array_equal(result.total, plain)
    true_mean = np.mean([np.clip(inputs[c].astype(np.float64), -quant.clip, quant.clip) for c in expected], 0)
    assert np.max(np.abs(result.mean() - true_mean)) <= quant.mean_error_bound * (1 + 1e-9)


def test_no_dropout_complete_graph_and_weighted_mean() -> None:
    quant = QuantConfig(clip=4.0, bits=20)
    server, clients, updates = _setup(5, 1000, quant, k=None, t=None)
    assert server.params.degree == 4
    weights = {c: float(i + 1) / 5 for i, c in enumerate(clients)}  # e.g. num_examples / max_examples
    updates = {c: np.clip(v / 2, -1, 1) for c, v in updates.items()}
    result = run_round(server, clients, {c: weights[c] * updates[c] for c in clients})
    assert result.survivors == tuple(sorted(clients))
    true = sum(weights[c] * updates[c].astype(np.float64) for c in clients) / sum(weights.values())
    bound = quant.mean_error_bound * len(clients) / sum(weights.values())
    assert np.max(np.abs(result.mean(sum(weights.values())) - true)) <= bound


@pytest.mark.parametrize("n,k", [(10, 4), (31, 8), (40, 11), (12, 11), (7, 100)])
def test_neighbour_graph_is_regular_symmetric_and_seeded(n: int, k: int) -> None:
    ids, degree = list(range(n)), effective_degree(n, k)
    graph = NeighbourGraph(ids, degree, b"\x01" * 32)
    again, other = NeighbourGraph(ids, degree, b"\x01" * 32), NeighbourGraph(ids, degree, b"\x02" * 32)
    for u, v in itertools.permutations(ids, 2):
        assert (v in graph.neighbours_of(u)) == (u in graph.neighbours_of(v))
    assert all(len(graph.neighbours_of(u)) == degree for u in ids)
    assert all(u not in graph.neighbours_of(u) for u in ids)
    assert degree == min(n - 1, k + k % 2)
    assert all(graph.neighbours_of(u) == again.neighbours_of(u) for u in ids)
    if degree < n - 1:
        assert any(graph.neighbours_of(u) != other.neighbours_of(u) for u in ids)


@pytest.mark.parametrize("k,t", [(4, 2), (4, 1), (6, 3), (6, 7), (3, 2)])
def test_threshold_must_exceed_half_the_degree(k: int, t: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        SecAggParams.create("c", 1, range(20), 8, QuantConfig(), neighbours=k, threshold=t)


def test_flower_sized_uint64_node_ids() -> None:
    ids = [3, 2**63 + 5, 2**64 - 1, 12345678901234567890]
    registry = {cid: _IDENTITIES[i][1] for i, cid in enumerate(ids)}
    quant = QuantConfig(clip=1.0, bits=12)
    params = SecAggParams.create(CAMPAIGN, 2**40, ids, 50, quant)
    clients = {c: SecAggClient(c, _IDENTITIES[i][0], CAMPAIGN) for i, c in enumerate(ids)}
    inputs = {c: np.full(50, 0.25, dtype=np.float32) for c in ids}
    result = run_round(SecAggServer(params, registry), clients, inputs, {"masked_input": {ids[1]}})
    assert result.survivors == tuple(sorted(set(ids) - {ids[1]}))
    np.testing.assert_allclose(result.mean(), 0.25, atol=quant.mean_error_bound)
    with pytest.raises(ValueError, match="uint64"):
        SecAggParams.create(CAMPAIGN, 1, [-1, 2], 50, quant)


def _through_config_record(msg: dict) -> dict:
    """Round-trip the non-array fields through Flower's ConfigRecord when Flower is installed."""
    try:
        from flwr.app import ConfigRecord
    except ImportError:
        return dict(msg)
    arrays = {k: v for k, v in msg.items() if isinstance(v, np.ndarray)}
    config = {k: v for k, v in msg.items() if k not in arrays}
    return {**dict(ConfigRecord(config)), **arrays}


def test_client_state_survives_a_fresh_process_per_stage() -> None:
    """A ClientApp may be a new process per message: rebuild every client from its exported state."""
    quant = QuantConfig(clip=1.0, bits=12)
    server, clients, inputs = _setup(9, 100, quant, k=4, t=3, seed=5)
    keys = {cid: _IDENTITIES[i][0] for i, cid in enumerate(clients)}
    states = {cid: _through_config_record(c.export_state()) for cid, c in clients.items()}
    dropped = next(iter(clients))
    for stage in STAGES:
        for u, request in server.requests(stage).items():
            if stage == "masked_input" and u == dropped:
                continue
            client = SecAggClient.restore(states[u], keys[u], rng=np.random.default_rng(5 + u))
            reply = client.handle(_through_config_record(request), inputs[u])
            states[u] = _through_config_record(client.export_state())
            server.receive(_through_config_record(reply))
    result = server.result()
    assert dropped not in result.survivors and len(result.survivors) == 8
    plain = sum(quantize(inputs[c], quant, np.random.default_rng(5 + c)) for c in result.survivors)
    np.testing.assert_array_equal(result.total, plain)


def test_too_few_survivors_is_a_clean_abort() -> None:
    server, clients, inputs = _setup(6, 10, QuantConfig(), k=None, t=4)
    with pytest.raises(SecAggAbort):
        run_round(server, clients, inputs, {"masked_input": set(list(clients)[:3])})


def test_dequantized_mean_tracks_true_mean_at_high_precision() -> None:
    quant = QuantConfig(clip=0.1, bits=16)
    server, clients, inputs = _setup(8, 5000, quant, k=4, t=3)
    inputs = {c: (v / 40).astype(np.float32) for c, v in inputs.items()}
    result = run_round(server, clients, inputs, {"unmask": {next(iter(clients))}})
    true = np.mean([inputs[c] for c in result.survivors], 0)
    assert np.max(np.abs(result.mean() - true)) <= quant.mean_error_bound


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(1, 12), st.integers(0, 12), st.randoms())
def test_shamir_any_t_shares_recover_and_fewer_do_not(secret: bytes, t: int, extra: int, rnd) -> None:
    points = rnd.sample(range(1, 500), t + extra)
    shares = shamir.split(secret, t, points)
    subset = {x: shares[x] for x in rnd.sample(points, t)}
    assert shamir.combine(subset, t) == secret
    if t > 1:
        fewer = dict(list(subset.items())[: t - 1])
        with pytest.raises(ValueError):
            shamir.combine(fewer, t)
