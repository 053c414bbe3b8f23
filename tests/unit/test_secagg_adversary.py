"""Issue 10's attacks on SecAgg+, replayed by a malicious coordinator: each is declined or detected, no input learned.

The adversary is the coordinator: it runs :class:`~fedtune.secagg.SecAggServer` where that suits it and forges
requests where it attacks, and it holds the keys of the Sybil members it enrolled (real protocol clients it drives,
whose held shares it reads). Honest members are fedtune's own clients, untouched. Each test asserts (1) that the
attack is refused or caught, naming what it should, and (2) that what the adversary holds (Sybils' shares, every
share revealed to it) does not give it both secrets of the target, without which the target's input stays masked.
The contributor-side tests go through fedtune's ClientApp handlers and round driver on an in-process grid.

New API is reached through the modules (``secagg.X``, ``protocol.X``) so that, run against code without it,
each test fails on its own rather than the whole file failing to import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

import fedtune.secagg as secagg
import fedtune.secagg.protocol as protocol
from fedtune.clients.app import LocalUpdate
from fedtune.clients.policy import SIMULATION_STATE_ROOT_ENV
from fedtune.clients.secagg_client import handle_stage
from fedtune.config import CampaignConfig
from fedtune.secagg import STAGES, QuantConfig, SecAggAbort, SecAggError, generate_identity, quantize, shamir
from fedtune.secagg.campaign import decode_mean
from fedtune.strategies.secure import SecureRound
from fedtune.strategies.server_optimizer import build_strategy
from fedtune.wire import (
    ContributorInfo,
    Decline,
    SecAggReply,
    SecAggRequest,
    TrainReport,
    TrainRequest,
    Work,
    secagg_action,
)

from ..conftest import small_campaign
from .inprocess_grid import InProcessGrid

CAMPAIGN = "campaign-adversary"
QUANT = QuantConfig(clip=1.0, bits=16)
LENGTH = 24
Msg = dict[str, Any]


class Cohort:
    """A round's members (the last ``sybils`` enrolled by the coordinator) and the coordinator's own server.

    Parameters
    ----------
    n, sybils : int
        Cohort size and how many of its members are the coordinator's.
    policy : SecAggPolicy, optional
        Every member's policy (the defaults when omitted).
    neighbours, threshold : int, optional
        What the coordinator sends (sized for ``policy`` when omitted).
    """

    def __init__(
        self,
        n: int,
        sybils: int = 0,
        policy: Any = None,
        neighbours: int | None = None,
        threshold: int | None = None,
    ) -> None:
        self.policy = policy or secagg.SecAggPolicy()
        self.ids = [100 + i for i in range(n)]
        self.sybils = set(self.ids[n - sybils :])
        self.keys = {c: generate_identity() for c in self.ids}
        self.registry = {c: public for c, (_, public) in self.keys.items()}
        self.params = secagg.SecAggParams.create(
            CAMPAIGN, 1, self.ids, LENGTH, QUANT, neighbours=neighbours, threshold=threshold, policy=self.policy
        )
        self.server = secagg.SecAggServer(self.params, self.registry, self.policy)
        self.clients = {c: self.client(c) for c in self.ids}
        rng = np.random.default_rng(0)
        self.inputs = {c: rng.uniform(-0.5, 0.5, LENGTH) for c in self.ids}
        self.revealed: list[Msg] = []  # every unmask reply the coordinator received

    def client(self, cid: int, cls: type | None = None, **kwargs: Any) -> Any:
        """An (honest unless ``cls`` says otherwise) protocol client of this cohort."""
        rng = np.random.default_rng(cid)
        return (cls or secagg.SecAggClient)(cid, self.keys[cid][0], CAMPAIGN, policy=self.policy, rng=rng, **kwargs)

    def answer(self, requests: Mapping[int, Msg], skip: Iterable[int] = ()) -> dict[int, Msg]:
        """Every addressed member's reply (``skip``: members whose reply the coordinator drops)."""
        replies = {u: self.clients[u].handle(msg, self.inputs[u]) for u, msg in requests.items() if u not in skip}
        self.revealed += [r for r in replies.values() if r["stage"] == "unmask"]
        return replies

    def stage(self, stage: str) -> dict[int, Msg]:
        """One honest stage: the server's requests, the members' replies, fed back to the server."""
        replies = self.answer(self.server.requests(stage))
        for reply in replies.values():
            self.server.receive(reply)
        return replies

    def until(self, stage: str) -> dict[int, Msg]:
        """Run every stage before ``stage`` honestly; return the server's requests of ``stage``."""
        for earlier in STAGES[: STAGES.index(stage)]:
            self.stage(earlier)
        return self.server.requests(stage)

    def learned(self, target: int) -> bool:
        """Whether the adversary can rebuild both the target's self-mask seed and its mask key (t shares each).

        It holds the Sybils' shares of the target and every share revealed to it; one secret alone leaves the
        target's upload masked (by the other's stream), so both are needed to learn its input.
        """
        graph = self.server.graph
        t = self.params.threshold
        shares: dict[str, dict[int, bytes]] = {"b": {}, "s": {}}
        for s in self.sybils - {target}:
            held = self.clients[s]._held.get(target)
            if held is not None:
                shares["b"][graph.share_point(s)], shares["s"][graph.share_point(s)] = held
        for reply in self.revealed:
            point = graph.share_point(reply["sender"])
            for kind in ("b", "s"):
                for owner, share in zip(reply[f"{kind}_ids"], reply[f"{kind}_shares"], strict=True):
                    if owner == target:
                        shares[kind][point] = share
        return all(len(shares[kind]) >= t for kind in ("b", "s"))


def _sign_as(key: Any, message: bytes) -> bytes:
    return key.sign(message)


def _shift(share: bytes) -> bytes:
    """A share moved by +1 in GF(2^521 − 1)."""
    value = (int.from_bytes(share, "big") + 1) % shamir.PRIME
    return value.to_bytes(shamir.SHARE_BYTES, "big")


# -- 7. weak parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,k,t",
    [
        (20, 2, 2),  # issue 6(b): "neighbours = 2" sent to a cohort of 20
        (100, 20, 11),  # issue 7: k = 2⌈1.5·log2 n⌉, t = ⌊k/2⌋ + 1, one fifth colluding
        (20, 10, 6),  # acceptable at γ = 0.2 (t > 4 colluders), refused by a contributor assuming γ = 0.4
    ],
)
def test_weaker_parameters_than_the_policy_allows_are_declined_before_training(
    n: int, k: int, t: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strict = secagg.SecAggPolicy(corrupt_fraction=0.4) if (k, t) == (10, 6) else secagg.SecAggPolicy()
    cohort = Cohort(n, policy=strict, neighbours=k, threshold=t)
    target = cohort.ids[0]
    with pytest.raises(SecAggError, match=r"exposes a contributor with probability .* > 2\^-40"):
        cohort.clients[target].advertise_keys(cohort.server.advertise_request())
    assert cohort.clients[target]._c_key is None  # nothing generated, nothing sent

    # the contributor's ClientApp declines in the trainer's refuse hook, i.e. before training
    cfg = CampaignConfig.from_dict(small_campaign(secure_aggregation={"protocol": "secagg+"}))
    seen: list[str | None] = []

    def trainer(message: object, request: TrainRequest, context: Context, refuse: Callable) -> Message:
        seen.append(refuse(request.campaign()))
        raise RuntimeError("stop before training")

    train = TrainRequest.of(cfg, "fingerprint", 1, {"b": np.zeros(3, dtype=np.float32)})
    advertise = {**cohort.server.advertise_request(), "weight_max": 12.0}
    content = SecAggRequest(advertise, train).content()
    message = SimpleNamespace(content=content, metadata=SimpleNamespace(dst_node_id=target))
    monkeypatch.setenv(SIMULATION_STATE_ROOT_ENV, str(tmp_path))  # a virtual contributor with the default policy
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="stop before training"):
        handle_stage("advertise", trainer, message, context)
    if (k, t) != (10, 6):  # the default policy on the contributor refuses the first two
        assert seen and seen[0] is not None and "exposes a contributor" in seen[0]


# -- 6(b). a ground graph seed -------------------------------------------------------------------------


def test_the_members_nonces_decide_the_graph_and_the_coordinator_cannot_grind_it() -> None:
    cohort = Cohort(20, sybils=4, neighbours=10, threshold=6)  # 4 = γ·n colluders; t = 6 > 4
    target, sybil = cohort.ids[0], max(cohort.sybils)
    advertise = {**cohort.server.advertise_request(), "graph_seed": b"\x07" * 32}  # the old lever: ignored
    for u in cohort.ids:
        cohort.server.receive(cohort.clients[u].advertise_keys(advertise))
    view = cohort.stage("view")
    nonces = {u: reply["nonce"] for u, reply in view.items()}
    requests = cohort.server.requests("share_keys")
    graph = cohort.server.graph
    assert graph.seed == cohort.server.view.graph_seed(nonces)  # a hash of the signed view and every nonce
    other = {**nonces, cohort.ids[1]: bytes(32)}  # one honest member's nonce alone moves the graph
    moved = secagg.NeighbourGraph(cohort.ids, graph_degree(cohort), cohort.server.view.graph_seed(other))
    assert any(moved.neighbours_of(u) != graph.neighbours_of(u) for u in cohort.ids)

    # grinding after the reveals (the issue needed 65 tries): a Sybil nonce that puts every Sybil next to the target
    def sybils_next_to_target(nonce: bytes) -> int:
        seed = cohort.server.view.graph_seed({**nonces, sybil: nonce})
        return len(secagg.NeighbourGraph(cohort.ids, graph_degree(cohort), seed).neighbours_of(target) & cohort.sybils)

    ground = max((i.to_bytes(32, "big") for i in range(400)), key=sybils_next_to_target)
    assert sybils_next_to_target(ground) == len(cohort.sybils)  # grinding would pay (each try: 5%)
    msg = requests[target]
    forged = {**msg, "nonce": [ground if v == sybil else n for v, n in zip(msg["ids"], msg["nonce"], strict=True)]}
    with pytest.raises(SecAggError, match="does not match its commitment"):
        cohort.clients[target].share_keys(forged)

    # withholding a reveal to re-roll the graph aborts the round before any share is dealt
    short = {k: (v[1:] if isinstance(v, list) else v) for k, v in msg.items()}
    with pytest.raises(SecAggAbort, match="every view member"):
        cohort.clients[target].share_keys(short)
    fresh = Cohort(6)
    fresh.stage("advertise")
    fresh.answer(fresh.server.requests("view"), skip=[fresh.ids[-1]])
    with pytest.raises(SecAggAbort, match="missing reveal"):
        fresh.server.requests("share_keys")
    assert not cohort.learned(target) and not any(c._held for c in cohort.clients.values())


def graph_degree(cohort: Cohort) -> int:
    return secagg.effective_degree(len(cohort.ids), cohort.params.neighbours)


# -- 6(a). split survivor sets, split cohort views -----------------------------------------------------


def test_split_survivor_sets_are_refused_and_the_target_stays_masked() -> None:
    """Issue 6(a): n = 4, one Sybil, the target "survives" for one honest holder and "dropped" for the other."""
    cohort = Cohort(4, sybils=1, policy=secagg.SecAggPolicy(corrupt_fraction=0.25))  # 1 colluder is within γ
    target, a, b = cohort.ids[:3]
    (sybil,) = cohort.sybils
    cohort.until("consistency")  # everyone uploaded; the coordinator now splits the survivor set
    view = cohort.server.view
    u3, u3_split = sorted([target, a, sybil]), sorted([a, b, sybil])  # the target: survivor / dropped
    header = {"campaign_id": CAMPAIGN, "round": 1}
    sigs: dict[tuple[int, ...], dict[int, bytes]] = {tuple(u3): {}, tuple(u3_split): {}}
    for u, survivors in ((target, u3), (a, u3), (b, u3_split)):
        reply = cohort.clients[u].consistency_check({**header, "stage": "consistency", "survivors": survivors})
        sigs[tuple(survivors)][u] = reply["signature"]
    for survivors in sigs:  # the Sybil signs both
        sigs[survivors][sybil] = _sign_as(cohort.keys[sybil][0], protocol._consistency_transcript(view, survivors))

    def unmask(u: int, survivors: list[int], dropped: list[int]) -> Msg:
        signed = sigs[tuple(survivors)]
        body = {
            "survivors": survivors,
            "dropped": dropped,
            "signer_ids": list(signed),
            "signatures": list(signed.values()),
        }
        reply = cohort.clients[u].unmask({**header, "stage": "unmask", **body})
        cohort.revealed.append(reply)
        return reply

    assert target in unmask(a, u3, [b])["b_ids"]  # a quorum (3 of 4) signed u3: the target's b-share
    with pytest.raises(SecAggAbort, match="quorum"):  # only b and the Sybil signed the split set
        unmask(b, u3_split, [target])
    assert not cohort.learned(target)


def _share_keys_request(ids: list[int], view_replies: Mapping[int, Msg]) -> Msg:
    """The share_keys request the coordinator builds from everyone's nonce and view signature."""
    return {
        "campaign_id": CAMPAIGN,
        "round": 1,
        "stage": "share_keys",
        "ids": ids,
        "nonce": [view_replies[v]["nonce"] for v in ids],
        "signature": [view_replies[v]["signature"] for v in ids],
    }


def test_split_cohort_views_abort_before_any_share_is_dealt() -> None:
    cohort = Cohort(6, sybils=1)
    left_out = cohort.ids[1]
    cohort.stage("advertise")
    full = cohort.server.requests("view")[cohort.ids[0]]
    members = {v: e for v, e in cohort.server.view.members.items() if v != left_out}
    smaller = {**full, **protocol.RoundView(cohort.params, members).to_message()}
    views = {u: (full if u == left_out else smaller) for u in cohort.ids}  # one member sees another cohort
    replies = {u: cohort.clients[u].sign_view(views[u]) for u in cohort.ids}
    share_keys = _share_keys_request(cohort.ids, replies)
    with pytest.raises(SecAggError, match="signature"):  # the others signed a view without it
        cohort.clients[left_out].share_keys(share_keys)
    assert cohort.clients[left_out].graph is None and not cohort.learned(left_out)


# -- 6(c). substituted key directory ---------------------------------------------------------------------


def _substituted(cohort: Cohort, impostors: Iterable[int]) -> tuple[Msg, dict[int, Any]]:
    """A view request with each of ``impostors``' rows replaced by one the coordinator made (and its clients)."""
    genuine = cohort.server.view
    members, clients = dict(genuine.members), {}
    for v in impostors:
        key, public = generate_identity()
        clients[v] = secagg.SecAggClient(v, key, CAMPAIGN, policy=cohort.policy)
        reply = clients[v].advertise_keys(cohort.server.advertise_request())
        fields = (reply[k] for k in ("c_pk", "s_pk", "nonce_commit", "seed_commit"))
        members[v] = protocol.Member(public, *fields)
    view = protocol.RoundView(cohort.params, members)
    return {"campaign_id": CAMPAIGN, "round": 1, "stage": "view", **view.to_message()}, clients


def test_a_key_directory_that_differs_between_contributors_is_caught_by_the_signed_view() -> None:
    cohort = Cohort(6)
    target, victim_peer = cohort.ids[:2]
    cohort.stage("advertise")
    requests = cohort.server.requests("view")
    forged_view, impostors = _substituted(cohort, [victim_peer])  # the target alone sees the forged key
    replies = {u: cohort.clients[u].sign_view(forged_view if u == target else msg) for u, msg in requests.items()}
    forged_digest = protocol.RoundView.from_message(cohort.params, forged_view).digest
    imp = impostors[victim_peer]
    replies[victim_peer] = {"nonce": imp._nonce, "signature": _sign_as(imp._identity, forged_digest)}
    share_keys = _share_keys_request(cohort.ids, replies)
    with pytest.raises(SecAggError, match="signature"):  # the honest others signed the genuine directory
        cohort.clients[target].share_keys(share_keys)
    assert cohort.clients[target].graph is None and not cohort.learned(target)


def test_a_directory_of_only_the_coordinators_keys_is_a_sybil_cohort_bounded_by_policy() -> None:
    """Issue 6(c): every peer key is the coordinator's. Undetectable from inside (it is a cohort of Sybils); what
    stops it is what bounds Sybils: identity keys the contributor pinned out of band, and its minimum cohort."""
    cohort = Cohort(6)
    target, *peers = cohort.ids
    cohort.stage("advertise")
    cohort.server.requests("view")
    all_fake, _ = _substituted(cohort, peers)
    assert cohort.client(target).policy.corrupt_fraction < 1  # documented limit: γ counts these as colluders
    pinned = cohort.client(target, pinned={peers[0]: cohort.registry[peers[0]]})
    keys = pinned.advertise_keys(cohort.server.advertise_request())
    with pytest.raises(SecAggError, match="pinned"):
        pinned.sign_view({**all_fake, **_own_entry(all_fake, pinned, keys)})
    strict = cohort.client(target)
    strict.policy = secagg.SecAggPolicy(min_cohort=8)
    with pytest.raises(SecAggError, match="below this contributor's minimum 8"):
        strict.advertise_keys(cohort.server.advertise_request())


def _own_entry(view_msg: Msg, client: Any, keys: Msg) -> Msg:
    """``view_msg``'s columns with ``client``'s row set to its advertised ``keys``, as a coordinator would send."""
    row = view_msg["ids"].index(client.client_id)
    own = {
        "identity": client._identity_pk,
        **{k: keys[k] for k in protocol._VIEW_FIELDS if k not in ("ids", "identity")},
    }
    return {k: [own[k] if i == row else x for i, x in enumerate(view_msg[k])] for k in own}


# -- 8. malicious contributors ---------------------------------------------------------------------------


class ShiftingHolder(secagg.SecAggClient):  # type: ignore[misc]
    """A contributor that reveals its first share of ``kind`` moved by +1."""

    kind = "b"

    def unmask(self, msg: Mapping[str, Any]) -> Msg:
        reply = super().unmask(msg)
        if reply[f"{self.kind}_shares"]:
            reply[f"{self.kind}_shares"] = [_shift(reply[f"{self.kind}_shares"][0]), *reply[f"{self.kind}_shares"][1:]]
        return reply


@pytest.mark.parametrize("kind", ["b", "s"])
def test_a_shifted_share_is_caught_its_holder_named_and_the_round_completes_exactly(kind: str) -> None:
    cohort = Cohort(10)
    cheat, dropped = cohort.ids[3], cohort.ids[7]
    cohort.clients[cheat] = cohort.client(cheat, type(f"Shifting{kind}", (ShiftingHolder,), {"kind": kind}))
    result = secagg.run_round(cohort.server, cohort.clients, cohort.inputs, {"masked_input": {dropped}})
    assert set(result.blamed) == {cheat} and f"{kind}-share of client" in result.blamed[cheat]
    survivors = [u for u in cohort.ids if u != dropped]
    assert result.survivors == tuple(survivors)  # the cheat's own input stays in: its masks are recovered
    exact = sum(quantize(cohort.inputs[u], QUANT, np.random.default_rng(u)) for u in survivors)
    np.testing.assert_array_equal(result.total, exact)


class InconsistentDealer(secagg.SecAggClient):  # type: ignore[misc]
    """A contributor whose self-mask shares are off its polynomial for one holder (hashed as dealt)."""

    def share_keys(self, msg: Mapping[str, Any]) -> Msg:
        real = shamir.split
        calls = []

        def split(secret: bytes, threshold: int, points: Iterable[int]) -> dict[int, bytes]:
            shares = real(secret, threshold, points)
            calls.append(secret)
            if len(calls) == 1:  # the self-mask seed: spoil the share every reconstruction uses
                first = min(shares)
                shares[first] = _shift(shares[first])
            return shares

        with mock.patch.object(shamir, "split", split):
            return super().share_keys(msg)


def test_a_dealer_of_inconsistent_shares_is_named_and_nothing_is_unmasked_wrongly() -> None:
    cohort = Cohort(10)
    cheat = cohort.ids[4]
    cohort.clients[cheat] = cohort.client(cheat, InconsistentDealer)
    with pytest.raises(SecAggError, match=rf"client {cheat} cheated: dealt b-shares") as caught:
        secagg.run_round(cohort.server, cohort.clients, cohort.inputs)
    assert caught.value.culprit == cheat and cohort.server.blamed.keys() == {cheat}


def _driver_round(stage: str, tamper: Callable[[Msg], None], folder: Path, claim: Work | None = None) -> Any:
    """One SecureRound over fedtune's ClientApp handlers, 6 contributors; node 1000's ``stage`` reply is tampered
    (``claim``: the work it says it took on, in place of none)."""
    raw = small_campaign(
        federation={"contributors_per_round": 6, "min_cohort": 2, "round_timeout_s": 5.0},
        simulation={"contributors": 6},
        secure_aggregation={"protocol": "secagg+", "stage_timeout_s": 5.0},
    )
    cfg = CampaignConfig.from_dict(raw)
    start = {"layer.0.lora_B": np.linspace(-0.1, 0.1, 24, dtype=np.float32).reshape(6, 4)}

    def trainer(message: Message, request: TrainRequest, context: Context, refuse: Any = None) -> Any:
        p = int(context.node_config["partition-id"])
        who = ContributorInfo(f"id-{p}", f"sim-{p}")
        if refuse is not None and (reason := refuse(request.campaign())) is not None:
            return Message(Decline(reason, who).content(), reply_to=message)
        begin = request.tensors()
        end = {k: v + 0.01 * (p + 1) for k, v in begin.items()}
        return LocalUpdate(request.campaign(), begin, end, TrainReport(12, 3, 1.0), who)

    def tampered(message: Message, context: Context) -> Message:
        reply = handle_stage(stage, trainer, message, context)
        if message.metadata.dst_node_id != 1000:
            return reply
        got = SecAggReply.read(reply.content, stage)
        msg = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in got.msg.items()}
        tamper(msg)
        return Message(SecAggReply(msg, got.contributor, got.report, claim).content(), reply_to=message)

    app = ClientApp()
    for name in STAGES:
        app.train(secagg_action(name))(tampered if name == stage else functools.partial(handle_stage, name, trainer))
    grid = InProcessGrid(app, {1000 + p: {"partition-id": p} for p in range(6)})
    request = TrainRequest.of(cfg, "fingerprint", 1, start)
    with pytest.MonkeyPatch.context() as patch:  # virtual contributors with the default policy
        patch.setenv(SIMULATION_STATE_ROOT_ENV, str(folder / "contributors"))
        return SecureRound(cfg, folder).run(grid, build_strategy(cfg, 6), request), start


LEVELS = QUANT.levels


def _add(index: int, amount: int) -> Callable[[Msg], None]:
    def tamper(msg: Msg) -> None:
        one = msg["masked"][index:][:1]
        one += np.uint32(amount % 2**32)  # array arithmetic wraps mod 2^32, as the protocol's does

    return tamper


@pytest.mark.parametrize(
    "tamper,named",
    [
        (_add(3, 2**31), "coordinate 3 of the unmasked sum"),  # an out-of-range masked input
        (_add(-1, 5 * LEVELS), "the weight coordinate"),  # an inflated weight coordinate
        (_add(-1, -(LEVELS // 4)), "differs from the 6 the server assigned"),  # a deflated one, still in range
    ],
)
def test_an_out_of_range_input_or_weight_is_detected_and_nothing_applied(
    tamper: Callable[[Msg], None], named: str, tmp_path: Path
) -> None:
    result, _ = _driver_round("masked_input", tamper, tmp_path)
    assert not result.applied and result.arrays is None
    assert named in result.abort_reason and "not applied" in result.abort_reason
    assert {o.status for o in result.outcomes} == {"failed"}  # nobody credited for a refused aggregate


def test_the_coordinator_names_a_contributor_revealing_a_wrong_share_and_applies_the_exact_mean(
    tmp_path: Path,
) -> None:
    def shift_first_b_share(msg: Msg) -> None:
        msg["b_shares"] = [_shift(msg["b_shares"][0]), *msg["b_shares"][1:]]

    result, start = _driver_round("unmask", shift_first_b_share, tmp_path)
    assert result.applied and result.abort_reason is None
    fates = {o.node_id: (o.status, o.reason) for o in result.outcomes}
    assert fates[1000][0] == "failed" and "client 1000 cheated: revealed a b-share of client" in fates[1000][1]
    assert all(status == "included" for node, (status, _) in fates.items() if node != 1000)  # no credit for 1000
    mean = np.mean([0.01 * (p + 1) for p in range(6)])  # its update stays in the sum: its masks were removed
    np.testing.assert_allclose(result.arrays["layer.0.lora_B"], start["layer.0.lora_B"] + mean, atol=2e-4)


def test_decode_mean_refuses_an_out_of_range_aggregate_and_names_it() -> None:
    n, quant = 4, QuantConfig(clip=0.5, bits=12)
    honest = np.full(11, n * quant.levels // 2, dtype=np.uint32)
    honest[-1] = n * quant.levels  # every weight r = 1
    over = honest.copy()
    over[5] = n * quant.levels + 1
    with pytest.raises(SecAggAbort, match="coordinate 5 of the unmasked sum"):
        decode_mean(over, quant, n)
    light = honest.copy()
    light[-1] = n * quant.levels // 2 + 1  # Σ r just above 0: every mean coordinate blows past the clip range
    light[:-1] = n * quant.levels
    with pytest.raises(SecAggAbort, match="decoded mean out of range"):
        decode_mean(light, quant, n)
    mean, weight = decode_mean(honest, quant, n, expected_weight=4.0)
    assert weight == pytest.approx(4.0) and np.max(np.abs(mean)) < quant.mean_error_bound
    with pytest.raises(SecAggAbort, match="differs from the 3.5 the server assigned"):
        decode_mean(honest, quant, n, expected_weight=3.5)


@pytest.mark.parametrize(
    "claim,named",
    [
        (Work(rank=64, batch_size=2), "rank 64 / batch 2 outside the campaign's"),  # more than the campaign's rank
        (Work(rank=1, batch_size=1), "batch 1 × 3 steps, but 12 examples reported"),  # a claim its report belies
    ],
)
def test_a_masked_input_with_an_impossible_work_claim_is_out_and_the_rest_applied(
    claim: Work, named: str, tmp_path: Path
) -> None:
    """A contributor cannot inflate (or garble) what it claims to have done under SecAgg+, where the coordinator
    cannot look at its update: the claim is checked against the campaign and its own report before the server
    takes its masked input, and it leaves the round as a dropout (its masks are recovered, nobody else's credit or
    the mean changes)."""
    result, start = _driver_round("masked_input", lambda msg: None, tmp_path, claim)
    fates = {o.node_id: (o.status, o.reason) for o in result.outcomes}
    assert fates[1000][0] == "failed" and named in fates[1000][1], fates[1000]
    assert result.applied and all(status == "included" for n, (status, _) in fates.items() if n != 1000)
    mean = np.mean([0.01 * (p + 1) for p in range(1, 6)])  # 1000's input is not in the sum
    np.testing.assert_allclose(result.arrays["layer.0.lora_B"], start["layer.0.lora_B"] + mean, atol=2e-4)
