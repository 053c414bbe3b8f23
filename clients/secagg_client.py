"""Contributor side of a SecAgg+ round: one ClientApp handler per protocol stage.

Job
    Answer the coordinator's ``train.secagg_<stage>`` messages, one stage at a time, possibly in a fresh process
    each (Flower keeps only the node's ``Context`` across the messages of a run, also in simulation): everything the
    protocol needs between stages lives in ``context.state``: the exported :class:`~fedtune.secagg.SecAggClient`
    state (this round's ephemeral secrets and the signed view) and the float update waiting to be masked. The
    long-term identity key is never put there; it is reloaded for every stage. The update is dropped once masked,
    the rest after unmasking.

    A process that serves every message of its node (the resident worker: :func:`train_in_background`) answers
    ``advertise`` as soon as every check has passed and trains in a background thread meanwhile, so the ``view`` and
    ``share_keys`` exchanges happen during training instead of after it; ``masked_input`` waits for the update
    (kept in this process's memory until then). Elsewhere training finishes before ``advertise`` is answered.

Threat
    The coordinator is the adversary of this contributor's update. Before training, the ``advertise`` stage checks
    the round's SecAgg+ parameters against the contributor's own policy (:mod:`fedtune.clients.policy`: minimum
    cohort, security bits σ, colluding fraction γ; the campaign's ``min_cohort`` can only raise the minimum) with
    :func:`fedtune.secagg.check_round_params`, and declines with the reason if they fall short; the protocol client
    re-checks them on the signed view and refuses a survivor set below the minimum (:mod:`fedtune.secagg.protocol`
    says what else each stage checks). Requests and replies are :class:`fedtune.wire.SecAggRequest` /
    :class:`fedtune.wire.SecAggReply`; a request that is not well-formed raises (no reply).

Pitfalls
    The first stage also trains (with every check of the plain round: base fingerprint, privacy budget), so the
    parameter check must run in the trainer's ``refuse`` hook, before training, not after it. In the background
    mode a contributor can no longer decline once it has answered ``advertise``: the answer waits for the trainer's
    ``on_train`` hook, which runs after the last check. A training that fails afterwards makes the node drop out at
    ``masked_input`` (recoverable); a process killed during ``view``/``share_keys`` aborts the round, as before.
    A node's next ``advertise`` waits for its previous training, so two never share the model.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtune.config import CampaignConfig
from fedtune.secagg import (
    STAGES,
    SecAggClient,
    SecAggCryptoError,
    SecAggError,
    SecAggParams,
    SecAggPolicy,
    SecAggPolicyError,
    SecAggProtocolError,
    check_round_params,
)
from fedtune.secagg.campaign import encode_update, quant_config
from fedtune.secagg.crypto import identity_public_bytes
from fedtune.wire import (
    SECAGG_IDENTITY,
    SECAGG_WEIGHT_MAX,
    WORK_BATCH_SIZE,
    WORK_RANK,
    ContributorInfo,
    SecAggReply,
    SecAggRequest,
    TrainReport,
    Work,
    secagg_action,
)

from .errors import Handler
from .policy import load_policy

log = logging.getLogger("fedtune.client.secagg")

ADVERTISE, VIEW, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK = STAGES
STATE = "secagg"  # ConfigRecord: SecAggClient.export_state()
META = "secagg-meta"  # ConfigRecord: the campaign seed (to reload a simulated identity key)
UPDATE = "secagg-update"  # ArrayRecord: the float vector to mask
REPORT = "secagg-report"  # MetricRecord (TrainReport) + ConfigRecord (ContributorInfo) below: for masked_input
WHO = "secagg-contributor"
WORK_STATE = "secagg-work"  # ConfigRecord (Work): the rank and batch taken on, when less than assigned
_SIM_IDENTITY_DOMAIN = b"fedtune/simulated-secagg-identity/v1\x00"


class LocalUpdateLike(Protocol):
    """What :func:`fedtune.clients.app.local_update` returns when the contributor trains."""

    cfg: CampaignConfig
    start: dict[str, np.ndarray]
    end: dict[str, np.ndarray]
    report: TrainReport
    who: ContributorInfo
    work: Work | None


Trainer = Callable[..., "LocalUpdateLike | Message"]
"""``trainer(message, request, context, refuse=..., on_train=...)``: :func:`fedtune.clients.app.local_update`."""


class _Job:
    """One round's local training in a background thread of the resident worker, from ``advertise`` to
    ``masked_input``."""

    def __init__(self, node: int, round_id: int, weight_max: float) -> None:
        self.node, self.round_id, self.weight_max = node, round_id, weight_max
        self.who: ContributorInfo | None = None
        self._started, self._done = threading.Event(), threading.Event()
        self._outcome: LocalUpdateLike | Message | None = None
        self._error: BaseException | None = None

    def start(self, run: Callable[..., LocalUpdateLike | Message]) -> LocalUpdateLike | Message | None:
        """Run ``run(on_train=...)`` in a thread; its outcome if it ends before training starts, else None."""

        def body() -> None:
            try:
                self._outcome = run(on_train=self._on_train)
            except BaseException as exc:  # noqa: BLE001 - re-raised where the outcome is read
                self._error = exc
            finally:
                self._done.set()
                self._started.set()

        threading.Thread(target=body, name=f"secagg-train-{self.node}", daemon=True).start()
        self._started.wait()
        return self.result() if self._done.is_set() else None

    def _on_train(self, who: ContributorInfo) -> None:
        self.who = who
        self._started.set()

    def wait(self) -> None:
        self._done.wait()

    def result(self) -> LocalUpdateLike | Message:
        """Wait for the training to end; its update (or decline), or what it raised."""
        self.wait()
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome


_BACKGROUND = False
_JOBS: dict[int, _Job] = {}  # node id -> its round's training, between advertise and masked_input


def training_now() -> bool:
    """Whether a round's training is running in the background of this process (between advertise and
    masked_input)."""
    return any(not job._done.is_set() for job in list(_JOBS.values()))


def train_in_background(enabled: bool) -> None:
    """Overlap local training with the ``view`` and ``share_keys`` stages (for a process that serves every stage).

    Only a process that gets every message of its node may do this (the resident worker,
    :mod:`fedtune.clients.worker`): the update stays in this process's memory until ``masked_input``.
    """
    global _BACKGROUND
    _BACKGROUND = enabled


def _settle(node: int) -> None:
    """Wait for, then forget, ``node``'s background training of an earlier round, whatever its end."""
    if (job := _JOBS.pop(node, None)) is not None:
        job.wait()


def register_secagg_handlers(
    app: ClientApp, trainer: Trainer, wrap: Callable[[Handler], Handler] = lambda handler: handler
) -> None:
    """Register ``@app.train("secagg_<stage>")`` for every stage; ``trainer`` runs the local round, ``wrap`` (the
    ClientApp's :func:`~fedtune.clients.errors.private_errors`) wraps each handler."""
    for stage in STAGES:
        app.train(secagg_action(stage))(wrap(functools.partial(handle_stage, stage, trainer)))


def identity_key(context: Context, seed: int) -> Ed25519PrivateKey:
    """The contributor's long-term Ed25519 identity key.

    Deployment: the PEM file named by node config ``identity-key``, else ``<state-dir>/identity.key`` (what
    ``fedtune join`` creates). Simulation only (no state dir): derived from the public campaign seed and the
    partition id, so anyone can recompute it; it exists only to make virtual contributors stable across runs.
    """
    node = context.node_config
    if "identity-key" in node or "state-dir" in node:
        path = Path(str(node.get("identity-key") or Path(str(node["state-dir"])) / "identity.key"))
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise SecAggCryptoError(f"{path}: not an Ed25519 private key")
        return key
    partition = int(node.get("partition-id", 0))
    material = _SIM_IDENTITY_DOMAIN + f"{seed}:{partition}".encode()
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(material).digest())


def handle_stage(stage: str, trainer: Trainer, message: Message, context: Context) -> Message:
    """Entry point of every ``train.secagg_<stage>`` message. An exception means no valid reply."""
    request = SecAggRequest.read(message.content, stage)
    if stage == ADVERTISE:
        return _advertise(message, context, request, trainer)
    return _continue(stage, message, context, request.msg)


def secagg_policy(context: Context, cfg: CampaignConfig) -> SecAggPolicy:
    """The contributor's own SecAgg+ policy; the campaign's ``min_cohort`` may only make it stricter."""
    own = load_policy(context)
    return SecAggPolicy(
        security_bits=own.secagg_security_bits,
        corrupt_fraction=own.secagg_max_corrupt_fraction,
        dropout_fraction=own.secagg_max_dropout_fraction,
        min_cohort=max(own.secagg_min_cohort, cfg.secure_aggregation.min_cohort),
        # never below the minimum (a campaign may raise it): SecAggPolicy refuses max < min
        max_cohort=max(own.secagg_max_cohort, own.secagg_min_cohort, cfg.secure_aggregation.min_cohort),
    )


def _advertise(message: Message, context: Context, request: SecAggRequest, trainer: Trainer) -> Message:
    """Stage 1: check the parameters against this contributor's policy and make its keys, train (or decline), answer.

    In a resident worker (:func:`train_in_background`) the answer goes out once every check has passed and training
    has started; training goes on in a background thread while this process answers ``view`` and ``share_keys``,
    and ``masked_input`` waits for it. Elsewhere (simulation, a process per message) training finishes first.
    """
    node = message.metadata.dst_node_id
    _settle(node)  # a previous round's training never runs beside this one's
    for key in (STATE, META, UPDATE, REPORT, WHO, WORK_STATE):  # leftovers of an aborted round
        context.state.pop(key, None)
    msg, train = request.msg, request.train
    assert train is not None  # the advertise request always carries one (SecAggRequest.read)
    params = SecAggParams.from_message(msg)  # malformed: no reply
    ready: dict[str, Any] = {}

    def refused(cfg: CampaignConfig) -> str | None:
        """Every check of the round's SecAgg+ parameters, run by the trainer before the privacy budget and training."""
        policy = secagg_policy(context, cfg)
        if (reason := check_round_params(params, policy)) is not None:
            return reason
        identity = identity_key(context, cfg.campaign.seed)
        quant = quant_config(cfg)
        client = SecAggClient(node, identity, cfg.campaign.name, round_id=params.round_id, quant=quant, policy=policy)
        try:  # campaign, round, quantization, membership; then fresh keys and commitments
            ready["reply"] = client.handle(msg)
        except SecAggError as exc:
            return f"secure aggregation: {exc}"
        ready.update(client=client, identity=identity, seed=cfg.campaign.seed)
        return None

    weight_max = float(msg[SECAGG_WEIGHT_MAX])
    run = functools.partial(trainer, message, train, context, refuse=refused)
    job = _Job(node, params.round_id, weight_max) if _BACKGROUND else None
    update = run() if job is None else job.start(run)
    if isinstance(update, Message):
        return update
    if update is None:  # training goes on in the background (it passed every check); masked_input collects it
        assert job is not None and job.who is not None
        _JOBS[node], who = job, job.who
    else:
        if "client" not in ready and (reason := refused(update.cfg)) is not None:  # a trainer that skipped the hook
            raise SecAggPolicyError(reason)
        _store_update(context, update, weight_max)
        who = update.who
    client, identity = ready["client"], ready["identity"]
    context.state[STATE] = ConfigRecord(client.export_state())
    context.state[META] = ConfigRecord({"seed": ready["seed"], "round": params.round_id})
    answer = SecAggReply({**ready["reply"], SECAGG_IDENTITY: identity_public_bytes(identity)}, contributor=who)
    return Message(content=answer.content(), reply_to=message)


def _store_update(context: Context, update: LocalUpdateLike, weight_max: float) -> None:
    """Keep the trained update, encoded for masking, and what the masked input reports, until ``masked_input``."""
    ratio = min(1.0, float(update.report.num_examples) / weight_max)
    vector = encode_update(update.start, update.end, ratio, quant_config(update.cfg).clip)
    context.state[UPDATE] = ArrayRecord({"x": Array(vector)})
    context.state[REPORT] = update.report.to_record()
    context.state[WHO] = update.who.to_record()
    if update.work is not None:
        context.state[WORK_STATE] = update.work.to_record()


def _continue(stage: str, message: Message, context: Context, request: dict[str, Any]) -> Message:
    """Stages 2-6: restore the round's client from the context, answer, store or discard its state."""
    if STATE not in context.state:
        raise SecAggProtocolError(f"{stage} request but no secure-aggregation round in progress on this node")
    identity = identity_key(context, int(context.state[META]["seed"]))
    client = SecAggClient.restore(dict(context.state[STATE]), identity, rng=np.random.default_rng())
    if stage == MASKED_INPUT and UPDATE not in context.state:  # trained in the background since advertise
        job = _JOBS.pop(message.metadata.dst_node_id, None)
        if job is None or job.round_id != int(context.state[META]["round"]):
            raise SecAggProtocolError("masked_input request but this node trained nothing for this round")
        update = job.result()  # what the training raised, if it failed: no reply, a dropout the protocol recovers
        if isinstance(update, Message):  # unreachable: a trainer declines only before training starts
            raise SecAggProtocolError("masked_input request but this node declined the round")
        _store_update(context, update, job.weight_max)
    vector = context.state[UPDATE]["x"].numpy() if stage == MASKED_INPUT else None
    answer = SecAggReply(client.handle(request, vector))
    if stage == MASKED_INPUT:
        report, who = TrainReport.from_record(context.state[REPORT]), ContributorInfo.from_record(context.state[WHO])
        work = None
        if WORK_STATE in context.state:
            record = context.state[WORK_STATE]
            work = Work(int(record[WORK_RANK]), int(record[WORK_BATCH_SIZE]))
        answer = SecAggReply(answer.msg, contributor=who, report=report, work=work)
        del context.state[UPDATE]
    if stage == UNMASK:
        for key in (STATE, META, REPORT, WHO, WORK_STATE):
            context.state.pop(key, None)
    else:
        context.state[STATE] = ConfigRecord(client.export_state())
    return Message(content=answer.content(), reply_to=message)
