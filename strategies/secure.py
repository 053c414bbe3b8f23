"""A SecAgg+ round over the Flower grid: the coordinator learns only the weighted sum of the cohort's updates.

:class:`SecureRound` is the :class:`~fedtune.strategies.driver.RoundDriver` of campaigns with
``[secure_aggregation] protocol = "secagg+"``. One secure round is six message exchanges, one per stage of
:mod:`fedtune.secagg.protocol` (messages: :class:`fedtune.wire.SecAggRequest` / :class:`fedtune.wire.SecAggReply`);
the message type ``train.secagg_<stage>`` routes each to the ClientApp handler of that stage
(:mod:`fedtune.clients.secagg_client`). Local training starts in the first (``advertise``) stage; a resident
worker answers it at once and trains while ``view`` and ``share_keys`` go by (its ``masked_input`` reply carries the
update when training ends), so a deployed secure round costs two extra round trips of small messages after
training: ``consistency`` and ``unmask``. The protocol's docstring says what
it guarantees against this coordinator; this driver is the honest coordinator's side: it sizes k and t for the
contributors' default policy (:func:`~fedtune.secagg.campaign.round_degree`), names contributors caught cheating
(their share dropped, the round completed with the good ones; no credit for them), and refuses to apply an
aggregate whose sum, weight or mean is out of range (:func:`~fedtune.secagg.campaign.decode_mean`).

What each contributor masks
    ``x_i = [r_i · clip(Δ_i, ±c), r_i · c]`` with ``Δ_i = B_new − B_old`` the flattened adapter update
    (coordinates in sorted tensor-name order), ``r_i = w_i / w_max ∈ (0, 1]`` its example weight relative
    to the largest weight the server assigns, and ``c`` the clip range. Every coordinate lies in ``[-c, c]``,
    so one :class:`~fedtune.secagg.QuantConfig` ``(c, bits)`` encodes the whole vector, and the secure sum
    yields both ``Σ r_i Δ_i`` and ``Σ r_i`` (the last coordinate, divided by ``c``): the server divides
    one by the other for the example-weighted mean ``Σ w_i Δ_i / Σ w_i`` without learning any ``w_i``.
    This is the brief's "quantize ``w·Δ`` with range ``w_max·c``", scaled by ``1/w_max``.

Choice of the clip range ``c``
    ``[secure_aggregation] clip_range`` when set; otherwise ``[privacy] update_clip_norm`` when set: an
    update clipped to L2 norm ``C`` has every coordinate in ``[-C, C]``, so the per-coordinate clip never
    changes it and secure aggregation adds only rounding noise (but ``C`` is loose per coordinate: set
    ``clip_range`` near 10× the coordinates' spread for finer resolution); otherwise 1.0, far above what a
    LoRA round moves one coordinate by at fine-tuning learning rates. The decoded mean is off by at most
    ``n · 2c / (2^bits − 1) / Σ r_i`` per coordinate, and unbiased (stochastic rounding).

Identity registry (trust on first use)
    SecAgg+ needs every ephemeral key signed by a long-term identity whose public key the verifier already
    holds; accepting whatever key a contributor advertises in the same round would let anyone impersonate
    anyone. The coordinator therefore keeps ``RUN_DIR/secagg_identities.json``: the first time a contributor
    id (the ``contributor`` record's ``id``: the fingerprint of its identity key in deployment, a derived id
    in simulation) takes part, its Ed25519 public key is pinned; afterwards a different key for that id is
    refused (the node counts as failed) and two nodes claiming one id in a round are refused. Contributors
    receive the directory from the coordinator in the ``view`` stage and sign it, so a directory that differs between
    contributors aborts the round; a directory of the coordinator's own keys is a cohort of Sybils, which only the
    contributors' minimum cohort and γ bound (a deployment that distrusts this needs keys published at enrolment,
    which ``SecAggClient(pinned=...)`` checks). SecAgg+ client ids are the Flower node ids.

Timeouts
    Local training ends before a contributor answers ``advertise`` (simulation, a process per message) or before it
    answers ``masked_input`` (a resident worker trains in the background from ``advertise`` on, while it answers
    ``view`` and ``share_keys``), so those two stages wait ``[federation] round_timeout_s``; the four others wait
    ``[secure_aggregation] stage_timeout_s`` each (see
    :func:`~fedtune.strategies.driver.send_and_receive` for why the drivers poll the grid themselves). A node
    that does not answer in time, or answers with an error or an invalid message, is out of the round from
    then on; SecAgg+ recovers its masks as long as at least ``t`` of its neighbours remain.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.config import CampaignConfig
from fedtune.files import atomic_write_text
from fedtune.secagg import STAGES, SecAggAbort, SecAggCheatError, SecAggError, SecAggParams, SecAggServer
from fedtune.secagg.campaign import check_setup, decode_mean, flatten, quant_config, round_degree, unflatten
from fedtune.wire import (
    SECAGG_IDENTITY,
    SECAGG_WEIGHT_MAX,
    SecAggReply,
    SecAggRequest,
    TrainReport,
    TrainRequest,
    WireError,
    secagg_message_type,
)

from .driver import NodeFates, RoundResult, Update, aggregate, exchange, mean_train_loss

log = logging.getLogger("fedtune.secagg")

ADVERTISE, VIEW, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK = STAGES
REGISTRY_FILE = "secagg_identities.json"


class IdentityRegistry:
    """Contributor id -> Ed25519 identity public key, pinned on first use in a JSON file of the run dir.

    Parameters
    ----------
    path : Path
        ``RUN_DIR/secagg_identities.json``; created on the first pin, rewritten atomically.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        raw = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self._pins: dict[str, dict[str, Any]] = dict(raw.get("identities", {}))
        self._dirty = False

    def refusal(self, contributor: str, key: bytes) -> str | None:
        """Why ``key`` cannot be ``contributor``'s identity (another key is pinned), else None."""
        pinned = self._pins.get(contributor)
        if pinned is not None and bytes.fromhex(pinned["key"]) != key:
            return (
                f"identity key of contributor {contributor} differs from the one pinned in round "
                f"{pinned['first_round']} ({self.path.name})"
            )
        return None

    def pin(self, contributor: str, key: bytes, server_round: int) -> None:
        """Pin a key on first use; call only once the contributor has proven it holds the key (a signature)."""
        if contributor not in self._pins:
            self._pins[contributor] = {"key": key.hex(), "first_round": server_round}
            self._dirty = True

    def save(self) -> None:
        """Write new pins (before any key is used in the round, so a crash cannot forget one)."""
        if self._dirty:
            atomic_write_text(self.path, json.dumps({"version": 1, "identities": self._pins}, indent=1, sort_keys=True))
            self._dirty = False


class SecureRound:
    """Runs SecAgg+ rounds of a campaign over a Flower grid.

    Parameters
    ----------
    cfg : CampaignConfig
        The campaign; its secure-aggregation setup is checked here (:func:`check_setup`).
    run_dir : Path
        Holds the identity registry file.
    """

    def __init__(self, cfg: CampaignConfig, run_dir: Path) -> None:
        check_setup(cfg)
        self.cfg, self.quant = cfg, quant_config(cfg)
        self.registry = IdentityRegistry(Path(run_dir) / REGISTRY_FILE)
        fed = cfg.federation
        self.weight_max = float(fed.local_steps * fed.batch_size)  # largest num-examples the server assigns
        self.min_survivors = max(fed.min_cohort, cfg.secure_aggregation.min_cohort)

    def run(self, grid: Grid, strategy: FedAvg, request: TrainRequest) -> RoundResult:
        """Sample with the strategy, run the six stages, apply the strategy's server optimizer to the mean.

        Only survivors whose masked input is in the applied sum are included (credited), less any caught cheating;
        an abort (fewer than the threshold or the minimum cohort left, a dealer's shares that do not rebuild its
        secret, an out-of-range aggregate) applies nothing and leaves the optimizer state as it was.
        """
        server_round, start = request.server_round, time.perf_counter()
        train_msgs = list(strategy.configure_train(server_round, request.arrays, request.config(), grid))
        fates = NodeFates(server_round, {m.metadata.dst_node_id for m in train_msgs})
        stage_s: dict[str, float] = {}
        arrays, metrics, abort_reason, bytes_up = None, None, None, 0
        try:
            if len(fates.cohort) < self.min_survivors:
                raise SecAggAbort(f"cohort of {len(fates.cohort)}, below the minimum {self.min_survivors}")
            k, t = round_degree(self.cfg, len(fates.cohort))
            current = request.tensors()
            vector_len = sum(a.size for a in current.values()) + 1  # + the weight coordinate
            params = SecAggParams.create(
                self.cfg.campaign.name, server_round, fates.cohort, vector_len, self.quant, neighbours=k, threshold=t
            )
            server = self._advertise(grid, request, params, fates, stage_s)
            bytes_up, reports = self._protocol(grid, server_round, server, fates, stage_s)
            agg = server.result()
            for holder, dealer in agg.complaints:
                log.warning("round %d: node %s reports invalid shares from node %s", server_round, holder, dealer)
            assigned = sum(min(float(reports[u].num_examples), self.weight_max) for u in agg.survivors)
            mean_delta, weight = decode_mean(agg.total, self.quant, len(agg.survivors), assigned / self.weight_max)
            arrays, metrics = self._server_step(strategy, server_round, request, current, mean_delta, weight, fates)
        except SecAggCheatError as exc:  # a dealer whose shares do not rebuild its secret: nothing can be unmasked
            self._named(fates, exc)
            abort_reason = str(exc)
        except SecAggError as exc:
            abort_reason = str(exc)
        extra = {
            "secure_aggregation": True,
            "survivors": len(fates.inputs),
            "secagg_stage_s": {k: round(v, 4) for k, v in stage_s.items()},
        }
        return fates.result(request, arrays, metrics, abort_reason, bytes_up, time.perf_counter() - start, extra)

    @staticmethod
    def _named(fates: NodeFates, exc: SecAggCheatError) -> None:
        """A contributor caught cheating: failed with the reason, never credited (its input may stay in the sum)."""
        fates.inputs.pop(exc.culprit, None)
        fates.out(exc.culprit, "failed", str(exc))

    # -- stages ------------------------------------------------------------------------------------

    def _exchange(
        self,
        grid: Grid,
        server_round: int,
        stage: str,
        requests: Mapping[int, SecAggRequest],
        fates: NodeFates,
        stage_s: dict[str, float],
    ) -> dict[int, SecAggReply]:
        """Send one stage's requests and return the well-formed replies; everyone else is out."""
        training = stage in (ADVERTISE, MASKED_INPUT)  # contributors' training ends in one of them (see Timeouts)
        timeout = self.cfg.federation.round_timeout_s if training else self.cfg.secure_aggregation.stage_timeout_s
        messages = [
            Message(
                content=r.content(),
                dst_node_id=node,
                message_type=secagg_message_type(stage),
                group_id=str(server_round),
            )
            for node, r in requests.items()
        ]
        start = time.perf_counter()
        replies = exchange(grid, messages, timeout, fates, stage)
        stage_s[stage] = time.perf_counter() - start
        got = {m.metadata.src_node_id: fates.read(m, stage) for m in replies}
        return {node: reply for node, reply in got.items() if isinstance(reply, SecAggReply)}

    def _claim_holds(self, stage: str, node: int, reply: SecAggReply, fates: NodeFates) -> bool:
        """A masked input's work claim within the campaign, matching its reported examples; otherwise its sender
        is out before the server takes its input (a dropout to the protocol).

        Its rank cannot be checked against the masked update, but a claim only ever lowers the credit.
        """
        if reply.work is None or reply.report is None:
            return True
        try:
            reply.work.check(self.cfg, f"secagg {stage} reply", reply.report.num_examples)
        except WireError as exc:
            fates.out(node, "failed", str(exc))
            return False
        return True

    def _receive(self, server: SecAggServer, stage: str, node: int, reply: SecAggReply, fates: NodeFates) -> bool:
        """Feed a reply to the protocol server; an invalid one puts its sender out of the round."""
        try:
            server.receive(reply.msg)
        except SecAggCheatError as exc:
            self._named(fates, exc)
            return False
        except (SecAggError, KeyError, TypeError, ValueError) as exc:
            fates.out(node, "failed", f"{stage}: invalid reply: {exc}")
            return False
        return True

    def _advertise(
        self,
        grid: Grid,
        request: TrainRequest,
        params: SecAggParams,
        fates: NodeFates,
        stage_s: dict[str, float],
    ) -> SecAggServer:
        """Stage 1: the train request + SecAgg+ parameters out; trained contributors' signed keys back.

        Identity keys are checked against the pinned registry before the protocol server sees them.
        """
        advertise = SecAggRequest(
            {**SecAggServer(params, {}).advertise_request(), SECAGG_WEIGHT_MAX: self.weight_max}, train=request
        )
        replies = self._exchange(
            grid, request.server_round, ADVERTISE, {n: advertise for n in fates.cohort}, fates, stage_s
        )
        registry: dict[int, bytes] = {}
        claimed: dict[str, int] = {}
        for node, reply in sorted(replies.items()):
            assert reply.contributor is not None  # the wire format requires it in advertise replies
            who, key = reply.contributor.id, bytes(reply.msg[SECAGG_IDENTITY])
            refused = self.registry.refusal(who, key)
            if refused is None and who in claimed:
                refused = f"contributor {who} already takes part in this round as node {claimed[who]}"
            if refused is not None:
                fates.out(node, "failed", refused)
                continue
            claimed[who] = node
            registry[node] = key
        server = SecAggServer(params, registry)
        for who, node in claimed.items():  # pin only keys proven by a valid signature on this round's keys
            if self._receive(server, ADVERTISE, node, replies[node], fates):
                self.registry.pin(who, registry[node], params.round_id)
        self.registry.save()
        return server

    def _protocol(
        self,
        grid: Grid,
        server_round: int,
        server: SecAggServer,
        fates: NodeFates,
        stage_s: dict[str, float],
    ) -> tuple[int, dict[int, TrainReport]]:
        """Stages 2-6; returns the masked upload's bytes and what each masked input's sender reported.

        Raises SecAggAbort when too few remain.
        """
        active, bytes_up, reports = fates.active(), 0, {}
        for stage in STAGES[1:]:
            requests: dict[int, dict[str, Any]] = server.requests(stage)
            for node in sorted(active - requests.keys()):
                fates.out(node, "dropped", f"left out of {stage}: too few of its neighbours remain")
            if stage == CONSISTENCY and len(requests) < self.min_survivors:
                raise SecAggAbort(f"{len(requests)} masked inputs, below the minimum cohort {self.min_survivors}")
            replies = self._exchange(
                grid, server_round, stage, {u: SecAggRequest(r) for u, r in requests.items()}, fates, stage_s
            )
            active = {
                u
                for u, reply in sorted(replies.items())
                if self._claim_holds(stage, u, reply, fates) and self._receive(server, stage, u, reply, fates)
            }
            if stage == MASKED_INPUT:
                for u in sorted(active):
                    reply = replies[u]
                    assert reply.report is not None and reply.contributor is not None  # required by the wire format
                    fates.contributed(u, reply.report, reply.contributor, reply.work)
                    reports[u] = reply.report
                    bytes_up += sum(v.nbytes for v in reply.msg.values() if isinstance(v, np.ndarray))
        return bytes_up, reports

    def _server_step(
        self,
        strategy: FedAvg,
        server_round: int,
        request: TrainRequest,
        current: dict[str, np.ndarray],
        mean_delta: np.ndarray,
        weight: float,
        fates: NodeFates,
    ) -> tuple[dict[str, np.ndarray] | None, MetricRecord | None]:
        """Averaged adapter = current + mean update, then the strategy's own step on that one "reply".

        FedAvg returns it as is; FedAdam/FedYogi/FedAvgM treat ``average − current`` as the pseudo-gradient,
        exactly as they would for the individual replies whose weighted mean it is. The train loss is the
        survivors' example-weighted mean, as Flower computes it for a plain round.
        """
        averaged, layout = unflatten(flatten(current) + mean_delta, current), request.layout
        weights = {u: min(float(r.num_examples), self.weight_max) for u, r in fates.inputs.items()}
        train_loss = mean_train_loss([(w, fates.inputs[u].train_loss) for u, w in weights.items()])
        update = Update(min(fates.inputs), layout.pack(averaged), max(1, round(weight * self.weight_max)), train_loss)
        return aggregate(strategy, server_round, [update], layout)
