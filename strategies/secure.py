"""SecAgg+ over the Flower grid: the coordinator learns only the weighted sum of the cohort's updates.

One secure round is five message exchanges, one per stage of :mod:`fedtune.secagg.protocol`; the message
type ``train.secagg_<stage>`` routes each to the ClientApp handler of that stage
(:mod:`fedtune.clients.secagg_client`). Local training happens in the first (``advertise``) stage, so a
secure round costs four extra round trips of small messages and nothing else.

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
    receive their neighbours' pinned keys from the coordinator, so they trust it as their key directory; a
    deployment that also distrusts the coordinator for this needs an out-of-band directory (e.g. keys
    published at enrolment). SecAgg+ client ids are the Flower node ids.

Timeouts
    The ``advertise`` stage includes local training, so it waits ``[federation] round_timeout_s``; the four
    protocol-only stages wait ``[secure_aggregation] stage_timeout_s`` each (see :func:`send_and_receive`
    for why the workflow polls the grid itself). A node that does not answer in
    time, or answers with an error or an invalid message, is out of the round from then on; SecAgg+
    recovers its masks as long as at least ``t`` of its neighbours remain.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.config import CampaignConfig
from fedtune.files import atomic_write_text
from fedtune.secagg import (
    STAGES,
    SecAggAbort,
    SecAggError,
    SecAggParams,
    SecAggServer,
)
from fedtune.secagg.flower import (
    ADVERTISE,
    CONSISTENCY,
    MASKED_INPUT,
    SECAGG_ARRAYS,
    SECAGG_RECORD,
    SHARE_KEYS,
    check_setup,
    decode_mean,
    flatten,
    from_content,
    message_type,
    quant_config,
    round_degree,
    to_content,
    unflatten,
)
from fedtune.wire import Outcome, arrays_from_record, arrays_to_record, contributor_of, record_nbytes

log = logging.getLogger("fedtune.secagg")

REGISTRY_FILE = "secagg_identities.json"


# -- coordinator -------------------------------------------------------------------------------------


def send_and_receive(
    grid: Grid, messages: list[Message], timeout: float, first_poll_s: float = 0.005, max_poll_s: float = 0.1
) -> list[Message]:
    """``Grid.send_and_receive`` (same push, pull and timeout) polling from every 5 ms, backing off to 100 ms.

    Why: Flower's grids sleep a fixed interval between pulls (0.1 s in simulation, 3 s on the deployment
    grid), which a one-exchange round pays once but SecAgg+ pays in each of its four protocol-only stages,
    whose replies come back within milliseconds. The back-off keeps long (training) stages at Flower's
    simulation polling rate.
    """
    pending = set(grid.push_messages(messages))
    end, wait, replies = time.monotonic() + timeout, first_poll_s, []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        left = end - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(wait, left))
        wait = min(1.25 * wait, max_poll_s)
    return replies


def _tail(reason: str, limit: int = 240) -> str:
    """The end of an error reason, on one line: Ray wraps a ClientApp's exception message in its traceback."""
    flat = " ".join(str(reason).split())
    return flat if len(flat) <= limit else "..." + flat[-limit:]


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


@dataclass
class SecureRound:
    """What one secure round produced, for the round loop's model update, metrics row and ledger."""

    cohort: list[int]
    survivors: list[int] = field(default_factory=list)
    arrays: dict[str, np.ndarray] | None = None  # None: aborted, nothing to apply
    train_metrics: MetricRecord | None = None
    abort_reason: str | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)  # each node's last reply (ε and identity)
    examples: int = 0
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    round_trip_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)  # wall time of each stage's exchange

    @property
    def applied(self) -> bool:
        return self.arrays is not None

    @property
    def declined(self) -> int:
        return sum(o.status == "declined" for o in self.outcomes)


class _Tracker:
    """Per-node bookkeeping of a round: the first thing that went wrong and the last reply received."""

    def __init__(self, cohort: Iterable[int]) -> None:
        self.cohort = sorted(cohort)
        self.fate: dict[int, tuple[str, str]] = {}
        self.last: dict[int, Message] = {}  # last reply that says who the node is (and its metrics)
        self.masked: dict[int, Message] = {}  # masked_input replies accepted into the sum

    def out(self, node: int, status: str, reason: str) -> None:
        if node not in self.fate:
            log.warning("secure aggregation: node %s %s: %s", node, status, reason)
            self.fate[node] = (status, reason)

    def outcomes(self, applied: bool, abort_reason: str | None) -> list[Outcome]:
        """Masked input in the applied sum: included, whatever happened to the node afterwards; else its fate."""
        out = []
        aborted = ("failed", f"round aborted: {abort_reason}")
        for node in self.cohort:
            if node in self.masked:
                status, reason = ("included", None) if applied else aborted
            else:
                status, reason = self.fate.get(node, aborted)
            out.append(Outcome(node, status, reason, self.masked.get(node) or self.last.get(node)))
        return out


class SecAggWorkflow:
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

    def run_round(
        self, grid: Grid, strategy: FedAvg, server_round: int, record: ArrayRecord, config: ConfigRecord
    ) -> SecureRound:
        """Sample with the strategy, run the five stages, apply the strategy's server optimizer to the mean."""
        start = time.perf_counter()
        train_msgs = list(strategy.configure_train(server_round, record, config, grid))
        cohort = sorted({m.metadata.dst_node_id for m in train_msgs})
        result, track = SecureRound(cohort=cohort), _Tracker(cohort)
        current = arrays_from_record(record)
        result.bytes_down = record_nbytes(record) * len(cohort)
        try:
            if len(cohort) < self.min_survivors:
                raise SecAggAbort(f"cohort of {len(cohort)}, below the minimum {self.min_survivors}")
            k, t = round_degree(self.cfg, len(cohort))
            vector_len = sum(a.size for a in current.values()) + 1  # + the weight coordinate
            params = SecAggParams.create(
                self.cfg.campaign.name, server_round, cohort, vector_len, self.quant, neighbours=k, threshold=t
            )
            server, registry = self._advertise(grid, server_round, params, train_msgs, track, result)
            self._protocol(grid, server_round, server, registry, track, result)
            agg = server.result()
            mean_delta, weight = decode_mean(agg.total, self.quant, len(agg.survivors))
            result.arrays, result.train_metrics = self._server_step(
                strategy, server_round, current, mean_delta, weight, track
            )
        except SecAggError as exc:
            result.abort_reason = str(exc)
            log.warning("round %d: secure aggregation aborted: %s; no update applied", server_round, exc)
        result.survivors = sorted(track.masked)
        result.outcomes = track.outcomes(result.applied, result.abort_reason)
        result.replies = [track.masked.get(n) or track.last[n] for n in cohort if n in track.last]
        metrics = [m.content["metrics"] for m in track.masked.values()]
        result.examples = sum(int(m["num-examples"]) for m in metrics)
        result.tokens = sum(int(m["tokens"]) for m in metrics)
        result.round_trip_s = time.perf_counter() - start
        return result

    # -- stages ------------------------------------------------------------------------------------

    def _exchange(
        self,
        grid: Grid,
        server_round: int,
        stage: str,
        contents: Mapping[int, RecordDict],
        track: _Tracker,
        result: SecureRound,
    ) -> dict[int, Message]:
        """Send one stage's messages and return the non-error replies; everyone else is out."""
        timeout = (
            self.cfg.federation.round_timeout_s if stage == ADVERTISE else self.cfg.secure_aggregation.stage_timeout_s
        )
        messages = [
            Message(content=c, dst_node_id=node, message_type=message_type(stage), group_id=str(server_round))
            for node, c in contents.items()
        ]
        got: dict[int, Message] = {}
        start = time.perf_counter()
        replies = send_and_receive(grid, messages, timeout)
        result.stage_s[stage] = time.perf_counter() - start
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                track.out(node, "failed", f"{stage}: {_tail(reply.error.reason)}")
                continue
            if "contributor" in reply.content.config_records:  # advertise, decline and masked_input replies
                track.last[node] = reply
            got[node] = reply
        for node in contents:
            if node not in got:
                track.out(node, "dropped", f"no {stage} reply within {timeout:g} s")
        return got

    def _receive(self, server: SecAggServer, stage: str, node: int, reply: Message, track: _Tracker) -> bool:
        """Feed a reply to the protocol server; an invalid one puts its sender out of the round."""
        try:
            msg = from_content(reply.content)
            if msg.get("sender") != node:
                raise SecAggError(f"reply signed for node {msg.get('sender')}")
            server.receive(msg)
        except (SecAggError, KeyError, TypeError) as exc:
            track.out(node, "failed", f"{stage}: invalid reply: {exc}")
            return False
        return True

    def _advertise(
        self,
        grid: Grid,
        server_round: int,
        params: SecAggParams,
        train_msgs: list[Message],
        track: _Tracker,
        result: SecureRound,
    ) -> tuple[SecAggServer, dict[int, bytes]]:
        """Stage 1: adapter + round config + SecAgg+ parameters out; trained contributors' signed keys back.

        Identity keys are checked against the pinned registry before the protocol server sees them.
        """
        request = ConfigRecord({**SecAggServer(params, {}).advertise_request(), "weight_max": self.weight_max})
        contents = {
            m.metadata.dst_node_id: RecordDict(
                {**m.content.array_records, **m.content.config_records, SECAGG_RECORD: request}
            )
            for m in train_msgs
        }
        replies = self._exchange(grid, server_round, ADVERTISE, contents, track, result)
        registry: dict[int, bytes] = {}
        claimed: dict[str, int] = {}
        for node, reply in sorted(replies.items()):
            metrics = reply.content.metric_records.get("metrics")
            if metrics is not None and int(metrics.get("declined", 0)):
                track.out(node, "declined", str(reply.content["reason"]["reason"]))
                continue
            who = contributor_of(reply)
            key = bytes(reply.content[SECAGG_RECORD].get("identity", b"")) if SECAGG_RECORD in reply.content else b""
            if who is None or len(key) != 32:
                track.out(node, "failed", "advertise: reply lacks the contributor's identity or identity key")
                continue
            refused = self.registry.refusal(who.id, key)
            if refused is None and who.id in claimed:
                refused = f"contributor {who.id} already takes part in this round as node {claimed[who.id]}"
            if refused is not None:
                track.out(node, "failed", refused)
                continue
            claimed[who.id] = node
            registry[node] = key
        server = SecAggServer(params, registry)
        for who_id, node in claimed.items():  # pin only keys proven by a valid signature on this round's keys
            if self._receive(server, ADVERTISE, node, replies[node], track):
                self.registry.pin(who_id, registry[node], params.round_id)
        self.registry.save()
        return server, registry

    def _protocol(
        self,
        grid: Grid,
        server_round: int,
        server: SecAggServer,
        registry: Mapping[int, bytes],
        track: _Tracker,
        result: SecureRound,
    ) -> None:
        """Stages 2-5. Raises SecAggAbort when too few remain (before anything is unmasked)."""
        active = {n for n in track.cohort if n not in track.fate}
        for stage in STAGES[1:]:
            requests = server.requests(stage)
            for node in sorted(active - requests.keys()):
                track.out(node, "dropped", f"left out of {stage}: too few of its neighbours remain")
            if stage == CONSISTENCY and len(requests) < self.min_survivors:
                raise SecAggAbort(f"{len(requests)} masked inputs, below the minimum cohort {self.min_survivors}")
            if stage == SHARE_KEYS:  # every advertiser's pinned key, to check neighbours' and signers' signatures
                ids = sorted(requests)
                keys = [registry[v] for v in ids]
                requests = {u: {**r, "registry_ids": ids, "registry_keys": keys} for u, r in requests.items()}
            replies = self._exchange(
                grid, server_round, stage, {u: to_content(r) for u, r in requests.items()}, track, result
            )
            active = {u for u, reply in replies.items() if self._receive(server, stage, u, reply, track)}
            if stage == MASKED_INPUT:
                track.masked = {u: replies[u] for u in sorted(active)}
                result.bytes_up += sum(record_nbytes(replies[u].content[SECAGG_ARRAYS]) for u in active)

    def _server_step(
        self,
        strategy: FedAvg,
        server_round: int,
        current: dict[str, np.ndarray],
        mean_delta: np.ndarray,
        weight: float,
        track: _Tracker,
    ) -> tuple[dict[str, np.ndarray], MetricRecord | None]:
        """Averaged adapter = current + mean update, then the strategy's own step on that one "reply".

        FedAvg returns it as is; FedAdam/FedYogi/FedAvgM treat ``average − current`` as the pseudo-gradient,
        exactly as they would for the individual replies whose weighted mean it is.
        """
        averaged = unflatten(flatten(current) + mean_delta, current)
        survivors = [m.content["metrics"] for m in track.masked.values()]
        total_examples = sum(float(m["num-examples"]) for m in survivors)
        train_loss = sum(float(m["num-examples"]) * float(m["train_loss"]) for m in survivors) / total_examples
        reply = Message(
            content=RecordDict(
                {
                    strategy.arrayrecord_key: arrays_to_record(averaged),
                    "metrics": MetricRecord(
                        {strategy.weighted_by_key: max(1, round(weight * self.weight_max)), "train_loss": train_loss}
                    ),
                }
            ),
            dst_node_id=min(track.masked),
            message_type=MessageType.TRAIN,
        )
        new_record, metrics = strategy.aggregate_train(server_round, [reply])
        if new_record is None:
            raise SecAggAbort("the server optimizer produced no aggregate")
        return arrays_from_record(new_record), metrics
