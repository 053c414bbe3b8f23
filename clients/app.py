"""The fedtune ClientApp: what runs on a contributor for each round (Flower Message API).

The coordinator's train message (:class:`fedtune.wire.TrainRequest`) carries the campaign config, the base
fingerprint and the current shared adapter tensors. The contributor checks the fingerprint, its privacy budget
and (under SecAgg+) the cohort against its own policy, trains on its own shard, and replies with its new adapter
tensors and what it did (:class:`~fedtune.wire.TrainReply`). A contributor that will not train this round (a
foreign base, a spent privacy budget) replies with a :class:`~fedtune.wire.Decline` and its reason; a request
that is not well-formed is refused (the handler raises :class:`~fedtune.wire.WireError`, the coordinator sees
an error reply). Every message is built and read by :mod:`fedtune.wire`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.config import CampaignConfig
from fedtune.identity import simulated_identity
from fedtune.ml.data import TokenizedSet, load_shard
from fedtune.ml.model import (
    FingerprintMismatch,
    build_model,
    check_fingerprint,
    load_trainable,
    trainable_arrays,
)
from fedtune.privacy import ContributorPrivacy, PrivacyParams, clip_update
from fedtune.wire import (
    ContributorInfo,
    Decline,
    TrainReply,
    TrainReport,
    TrainRequest,
    arrays_from_record,
    arrays_to_record,
)

from .secagg_client import Trainer, register_secagg_handlers
from .trainer import Randomness, train_local

log = logging.getLogger("fedtune.client")
app = ClientApp()


@dataclass
class _Workspace:
    """Model and shard kept between rounds in a long-lived contributor process."""

    model: object
    shard: TokenizedSet


_WORKSPACES: dict[tuple[str, int, int], _Workspace] = {}


def _workspace(
    cfg: CampaignConfig, cfg_key: str, partition_id: int, num_partitions: int, device: str = "cpu"
) -> _Workspace:
    key = (cfg_key, partition_id, num_partitions)
    if key not in _WORKSPACES:
        _WORKSPACES.clear()  # one campaign per process at a time: free the previous model
        model, tokenizer = build_model(cfg, device)
        _WORKSPACES[key] = _Workspace(model, load_shard(cfg, tokenizer, partition_id, num_partitions))
    return _WORKSPACES[key]


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    if str(node.get("data", "")):
        return 0, 1  # its own data, whole
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))


def contributor_info(cfg: CampaignConfig, context: Context) -> ContributorInfo:
    """Who this contributor is, for the coordinator's credit ledger.

    A deployed contributor's join agent puts its key-derived id, name, team and benchmarked peak FLOP/s
    in the node config; a virtual one gets an id derived from the campaign and its partition.
    """
    node = context.node_config
    if "contributor-id" in node:
        return ContributorInfo(
            id=str(node["contributor-id"]),
            name=str(node.get("name", "")),
            team=str(node.get("team", "")) or None,
            declared_peak_flops=float(node.get("peak-flops", 0.0)) or None,
        )
    who = simulated_identity(cfg.campaign.name, _partition(context)[0])
    return ContributorInfo(who.id, who.name, who.team)


def record_round(context: Context, row: dict) -> None:
    """Append this contributor's round to ``STATE_DIR/rounds.jsonl``, which ``fedtune join`` prints."""
    state = str(context.node_config.get("state-dir", ""))
    if state:
        Path(state).mkdir(parents=True, exist_ok=True)
        with (Path(state) / "rounds.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({**row, "time": time.time()}, sort_keys=True) + "\n")


def decline(message: Message, context: Context, server_round: int, why: Decline) -> Message:
    """Reply that this contributor does not train this round, and why (the server logs it)."""
    log.warning("declining round %d: %s", server_round, why.reason)
    record_round(context, {"round": server_round, "declined": True, "reason": why.reason, "epsilon": why.epsilon})
    return Message(content=why.content(), reply_to=message)


def state_dir(context: Context, request: TrainRequest, contributor: str) -> Path:
    """The contributor's own state (privacy accountant): ``--state-dir`` when deployed, in the run dir in
    simulation."""
    node = context.node_config
    if "state-dir" in node:
        return Path(str(node["state-dir"]))
    if not request.state_root:
        raise ValueError("no state dir: set the node config 'state-dir' (fedtune join does)")
    return Path(request.state_root) / contributor


def load_privacy(cfg: CampaignConfig, context: Context, folder: Path, shard_size: int) -> ContributorPrivacy | None:
    """The contributor's lifetime accountant, or ``None`` when the campaign trains without DP."""
    if cfg.privacy.mechanism == "none":
        return None
    node = context.node_config
    personal = node.get("max-epsilon") or cfg.privacy.personal_max_epsilon.get(str(_partition(context)[0]))
    params = PrivacyParams.from_campaign(
        cfg.privacy, campaign_rounds=cfg.federation.rounds, personal_max_epsilon=float(personal) if personal else None
    )
    fed = cfg.federation
    return ContributorPrivacy.load(
        folder, params, shard_size=shard_size, batch_size=fed.batch_size, local_steps=fed.local_steps
    )


def clipped_update(start: dict[str, np.ndarray], end: dict[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """``start + clip(end - start)``: bounds what one contributor can move the shared adapter by."""
    clipped, _ = clip_update({k: end[k] - start[k] for k in start}, bound)
    return {k: start[k] + clipped[k] for k in start}


@dataclass
class LocalUpdate:
    """A finished local round: the adapter before and after (clipped), what was done, and by whom."""

    cfg: CampaignConfig
    start: dict[str, np.ndarray]
    end: dict[str, np.ndarray]
    report: TrainReport
    who: ContributorInfo


def local_update(
    message: Message,
    request: TrainRequest,
    context: Context,
    refuse: Callable[[CampaignConfig], str | None] | None = None,
) -> LocalUpdate | Message:
    """Every contributor-side check, then local training: a decline reply, or the update to send.

    ``refuse`` adds a reason to decline (checked before the privacy budget and training, so a refused
    round costs neither); the plain and the secure-aggregation handlers share everything else.
    """
    cfg, server_round = request.campaign(), request.server_round
    if str(context.node_config.get("data", "")):  # a deployed contributor trains on its own data
        cfg.data.source = str(context.node_config["data"])
    who = contributor_info(cfg, context)
    try:
        check_fingerprint(cfg.model, request.base_fingerprint)
    except FingerprintMismatch as exc:
        return decline(message, context, server_round, Decline(str(exc), who))
    if refuse is not None and (reason := refuse(cfg)) is not None:
        return decline(message, context, server_round, Decline(reason, who))
    partition_id, num_partitions = _partition(context)
    ws = _workspace(
        cfg,
        hashlib.sha256(request.campaign_toml.encode()).hexdigest(),
        partition_id,
        num_partitions,
        str(context.node_config.get("device", "cpu")),
    )
    fed = cfg.federation
    privacy = load_privacy(cfg, context, state_dir(context, request, who.id), len(ws.shard))
    if privacy is not None:
        ok, reason = privacy.check_round(fed.local_steps)
        if not ok:
            return decline(message, context, server_round, Decline(reason, who, privacy.epsilon_spent()))
    start = arrays_from_record(request.arrays)
    load_trainable(ws.model, start)
    seed = cfg.campaign.seed * 1_000_003 + server_round * 1009 + partition_id
    randomness = Randomness.from_seed(seed, device=next(ws.model.parameters()).device)
    result = train_local(
        ws.model,
        ws.shard,
        steps=fed.local_steps,
        batch_size=fed.batch_size,
        learning_rate=fed.learning_rate,
        randomness=randomness,
        privacy=privacy,
    )
    end = trainable_arrays(ws.model)
    if cfg.privacy.update_clip_norm > 0:
        end = clipped_update(start, end, cfg.privacy.update_clip_norm)
    report = TrainReport(
        # weight by the assigned batch count, not the Poisson draw, so the weight says nothing about the data
        num_examples=fed.local_steps * fed.batch_size,
        samples=result.examples,
        tokens=result.tokens,
        train_loss=result.train_loss,
        wall_s=result.wall_s,
        steps=result.steps,
        epsilon=float(result.privacy["epsilon_spent"]) if result.privacy else None,
    )
    record_round(
        context,
        {
            "round": server_round,
            "examples": result.examples,
            "tokens": result.tokens,
            "train_loss": result.train_loss,
            "wall_s": result.wall_s,
            "epsilon": result.privacy.get("epsilon_spent"),
        },
    )
    return LocalUpdate(cfg, start, end, report, who)


def handle_train(trainer: Trainer, message: Message, context: Context) -> Message:
    """A plain round's ``train`` message: train and send the new adapter, or decline."""
    update = trainer(message, TrainRequest.read(message.content), context)
    if isinstance(update, Message):
        return update
    reply = TrainReply(arrays_to_record(update.end), update.report, update.who)
    return Message(content=reply.content(), reply_to=message)


def register_handlers(client_app: ClientApp, trainer: Trainer) -> None:
    """Register the plain ``train`` handler and the SecAgg+ stage handlers; ``trainer`` runs the local round."""
    client_app.train()(functools.partial(handle_train, trainer))
    register_secagg_handlers(client_app, trainer)


register_handlers(app, local_update)
