"""Contributor side of a SecAgg+ round: one ClientApp handler per protocol stage.

The coordinator's ``train.secagg_<stage>`` messages arrive one stage at a time, possibly in a fresh
process each (Flower keeps only the node's ``Context`` across the messages of a run, also in simulation),
so everything the protocol needs between stages lives in ``context.state``: the exported
:class:`~fedtune.secagg.SecAggClient` state (this round's ephemeral secrets), the identity keys the
coordinator vouched for, and the float update waiting to be masked. The long-term identity key is never
put there; it is reloaded for every stage. The update is dropped once masked, the rest after unmasking.

The first stage trains (with every check of the plain round: base fingerprint, privacy budget) and also
refuses a cohort smaller than ``[secure_aggregation] min_cohort``; the consistency stage refuses to sign a
survivor set that small, because the unmasked sum of a few inputs says too much about each of them.
Requests and replies are :class:`fedtune.wire.SecAggRequest` / :class:`fedtune.wire.SecAggReply`; a request
that is not well-formed raises :class:`fedtune.wire.WireError` (no reply).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtune.config import CampaignConfig
from fedtune.secagg import STAGES, SecAggAbort, SecAggClient, SecAggCryptoError, SecAggError, SecAggProtocolError
from fedtune.secagg.campaign import encode_update, quant_config
from fedtune.secagg.crypto import identity_public_bytes
from fedtune.wire import (
    SECAGG_IDENTITY,
    SECAGG_REGISTRY_IDS,
    SECAGG_REGISTRY_KEYS,
    SECAGG_WEIGHT_MAX,
    ContributorInfo,
    SecAggReply,
    SecAggRequest,
    TrainReport,
    secagg_action,
)

log = logging.getLogger("fedtune.client.secagg")

ADVERTISE, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK = STAGES
STATE = "secagg"  # ConfigRecord: SecAggClient.export_state()
META = "secagg-meta"  # ConfigRecord: identity seed, minimum cohort, the coordinator's key directory
UPDATE = "secagg-update"  # ArrayRecord: the float vector to mask
REPORT = "secagg-report"  # MetricRecord (TrainReport) + ConfigRecord (ContributorInfo) below: for masked_input
WHO = "secagg-contributor"
_SIM_IDENTITY_DOMAIN = b"fedtune/simulated-secagg-identity/v1\x00"


class LocalUpdateLike(Protocol):
    """What :func:`fedtune.clients.app.local_update` returns when the contributor trains."""

    cfg: CampaignConfig
    start: dict[str, np.ndarray]
    end: dict[str, np.ndarray]
    report: TrainReport
    who: ContributorInfo


Trainer = Callable[..., "LocalUpdateLike | Message"]
"""``trainer(message, request, context, refuse=...)``: :func:`fedtune.clients.app.local_update`."""


def register_secagg_handlers(app: ClientApp, trainer: Trainer) -> None:
    """Register ``@app.train("secagg_<stage>")`` for every stage; ``trainer`` runs the local round."""
    for stage in STAGES:
        app.train(secagg_action(stage))(functools.partial(handle_stage, stage, trainer))


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


def _advertise(message: Message, context: Context, request: SecAggRequest, trainer: Trainer) -> Message:
    """Stage 1: train (or decline), keep the weighted update in the context, answer with signed keys."""
    for key in (STATE, META, UPDATE, REPORT, WHO):  # leftovers of an aborted round
        context.state.pop(key, None)
    msg, train = request.msg, request.train
    assert train is not None  # the advertise request always carries one (SecAggRequest.read)
    cohort = len(msg.get("cohort", ()))

    def too_small(cfg: CampaignConfig) -> str | None:
        need = cfg.secure_aggregation.min_cohort
        if cohort < need:
            return f"secure-aggregation cohort of {cohort} is below the campaign minimum {need}"
        return advertise_refusal(cfg, context, msg, message.metadata.dst_node_id)  # before training: costs no ε

    update = trainer(message, train, context, refuse=too_small)
    if isinstance(update, Message):
        return update
    cfg, node = update.cfg, message.metadata.dst_node_id
    identity = identity_key(context, cfg.campaign.seed)
    public = identity_public_bytes(identity)
    quant = quant_config(cfg)
    client = SecAggClient(node, identity, {node: public}, cfg.campaign.name, round_id=int(msg["round"]), quant=quant)
    reply = client.handle(msg)
    ratio = min(1.0, float(update.report.num_examples) / float(msg[SECAGG_WEIGHT_MAX]))
    vector = encode_update(update.start, update.end, ratio, quant.clip)
    context.state[STATE] = ConfigRecord(client.export_state())
    context.state[META] = ConfigRecord({"seed": cfg.campaign.seed, "min-cohort": cfg.secure_aggregation.min_cohort})
    context.state[UPDATE] = ArrayRecord({"x": Array(vector)})
    context.state[REPORT] = update.report.to_record()
    context.state[WHO] = update.who.to_record()
    answer = SecAggReply({**reply, SECAGG_IDENTITY: public}, contributor=update.who)
    return Message(content=answer.content(), reply_to=message)


def advertise_refusal(cfg: CampaignConfig, context: Context, msg: dict[str, Any], node: int) -> str | None:
    """Why this round's SecAgg+ parameters are refused (as the advertise stage would refuse them), else ``None``.

    Runs inside the trainer's checks, before training, so a round whose parameters are bad costs no ε.
    """
    identity = identity_key(context, cfg.campaign.seed)
    public = identity_public_bytes(identity)
    client = SecAggClient(
        node, identity, {node: public}, cfg.campaign.name, round_id=int(msg["round"]), quant=quant_config(cfg)
    )
    try:
        client.handle(msg)
    except (SecAggError, ValueError) as exc:
        return f"secure-aggregation round refused: {exc}"
    return None


def _registry(meta: ConfigRecord, request: dict[str, Any], node: int, public: bytes) -> dict[int, bytes]:
    """Identity keys to verify peers with: sent by the coordinator in share_keys, kept for unmask."""
    ids, keys = SECAGG_REGISTRY_IDS, SECAGG_REGISTRY_KEYS
    if ids in request:
        registry = {int(v): bytes(k) for v, k in zip(request[ids], request[keys], strict=True)}
        if registry.get(node) != public:
            raise SecAggCryptoError("the coordinator's key directory does not hold this contributor's identity key")
        meta[ids], meta[keys] = list(registry), list(registry.values())
    return {int(v): bytes(k) for v, k in zip(meta.get(ids, []), meta.get(keys, []), strict=True)}


def _continue(stage: str, message: Message, context: Context, request: dict[str, Any]) -> Message:
    """Stages 2-5: restore the round's client from the context, answer, store or discard its state."""
    if STATE not in context.state:
        raise SecAggProtocolError(f"{stage} request but no secure-aggregation round in progress on this node")
    meta, node = context.state[META], message.metadata.dst_node_id
    identity = identity_key(context, int(meta["seed"]))
    registry = _registry(meta, request, node, identity_public_bytes(identity))
    client = SecAggClient.restore(dict(context.state[STATE]), identity, registry, rng=np.random.default_rng())
    if stage == CONSISTENCY and len(request.get("survivors", ())) < int(meta["min-cohort"]):
        raise SecAggAbort(f"{len(request['survivors'])} survivors, below the campaign minimum {meta['min-cohort']}")
    vector = context.state[UPDATE]["x"].numpy() if stage == MASKED_INPUT else None
    answer = SecAggReply(client.handle(request, vector))
    if stage == MASKED_INPUT:
        report, who = TrainReport.from_record(context.state[REPORT]), ContributorInfo.from_record(context.state[WHO])
        answer = SecAggReply(answer.msg, contributor=who, report=report)
        del context.state[UPDATE]
    if stage == UNMASK:
        for key in (STATE, META, REPORT, WHO):
            context.state.pop(key, None)
    else:
        context.state[STATE] = ConfigRecord(client.export_state())
    return Message(content=answer.content(), reply_to=message)
