"""The fedtune ClientApp: what runs on a contributor for each round (Flower Message API).

The coordinator's train message carries the campaign config, the base fingerprint and the current
shared adapter tensors. The contributor checks the fingerprint, trains on its own shard, and replies
with its new adapter tensors and what it did. A contributor that will not train this round (a foreign
base, later: a spent privacy budget) replies with ``declined = 1`` and its reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
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
from fedtune.wire import arrays_from_record, arrays_to_record, campaign_from_record

from .secagg_client import register_secagg_handlers
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


def identity_record(cfg: CampaignConfig, context: Context) -> ConfigRecord:
    """Who this contributor is, for the coordinator's credit ledger.

    A deployed contributor's join agent puts its key-derived id, name, team and benchmarked peak FLOP/s
    in the node config; a virtual one gets an id derived from the campaign and its partition.
    """
    node = context.node_config
    if "contributor-id" in node:
        return ConfigRecord(
            {
                "id": str(node["contributor-id"]),
                "name": str(node.get("name", "")),
                "team": str(node.get("team", "")),
                "peak-flops": float(node.get("peak-flops", 0.0)),
            }
        )
    who = simulated_identity(cfg.campaign.name, _partition(context)[0])
    return ConfigRecord({"id": who.id, "name": who.name, "team": who.team or "", "peak-flops": 0.0})


def record_round(context: Context, row: dict) -> None:
    """Append this contributor's round to ``STATE_DIR/rounds.jsonl``, which ``fedtune join`` prints."""
    state = str(context.node_config.get("state-dir", ""))
    if state:
        Path(state).mkdir(parents=True, exist_ok=True)
        with (Path(state) / "rounds.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({**row, "time": time.time()}, sort_keys=True) + "\n")


def decline(
    message: Message, reason: str, who: ConfigRecord, epsilon: float | None = None, context: Context | None = None
) -> Message:
    """Reply that this contributor does not train this round, and why (the server logs it)."""
    log.warning("declining round: %s", reason)
    if context is not None:
        record_round(
            context,
            {
                "round": int(message.content["config"]["server-round"]),
                "declined": True,
                "reason": reason,
                "epsilon": epsilon,
            },
        )
    metrics = MetricRecord({"declined": 1, "num-examples": 0} | ({} if epsilon is None else {"epsilon": epsilon}))
    content = RecordDict({"metrics": metrics, "reason": ConfigRecord({"reason": reason}), "contributor": who})
    return Message(content=content, reply_to=message)


def state_dir(context: Context, round_cfg: ConfigRecord, contributor: str) -> Path:
    """The contributor's own state (privacy accountant): ``--state-dir`` when deployed, in the run dir in
    simulation."""
    node = context.node_config
    if "state-dir" in node:
        return Path(str(node["state-dir"]))
    return Path(str(round_cfg["state-root"])) / contributor


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
    metrics: MetricRecord
    who: ConfigRecord


def local_update(
    message: Message, context: Context, refuse: Callable[[CampaignConfig], str | None] | None = None
) -> LocalUpdate | Message:
    """Every contributor-side check, then local training: a decline reply, or the update to send.

    ``refuse`` adds a reason to decline (checked before the privacy budget and training, so a refused
    round costs neither); the plain and the secure-aggregation handlers share everything else.
    """
    cfg_toml, cfg = campaign_from_record(message.content["config"])
    if str(context.node_config.get("data", "")):  # a deployed contributor trains on its own data
        cfg.data.source = str(context.node_config["data"])
    round_cfg = message.content["config"]
    who = identity_record(cfg, context)
    try:
        check_fingerprint(cfg.model, str(round_cfg["base-fingerprint"]))
    except FingerprintMismatch as exc:
        return decline(message, str(exc), who, context=context)
    if refuse is not None and (reason := refuse(cfg)) is not None:
        return decline(message, reason, who, context=context)
    partition_id, num_partitions = _partition(context)
    ws = _workspace(
        cfg,
        hashlib.sha256(cfg_toml.encode()).hexdigest(),
        partition_id,
        num_partitions,
        str(context.node_config.get("device", "cpu")),
    )
    fed = cfg.federation
    privacy = load_privacy(cfg, context, state_dir(context, round_cfg, str(who["id"])), len(ws.shard))
    if privacy is not None:
        ok, reason = privacy.check_round(fed.local_steps)
        if not ok:
            return decline(message, reason, who, privacy.epsilon_spent(), context=context)
    start = arrays_from_record(message.content["arrays"])
    load_trainable(ws.model, start)
    seed = cfg.campaign.seed * 1_000_003 + int(round_cfg["server-round"]) * 1009 + partition_id
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
    metrics = MetricRecord(
        {
            # weight by the assigned batch count, not the Poisson draw, so the weight says nothing about the data
            "num-examples": fed.local_steps * fed.batch_size,
            "samples": result.examples,
            "tokens": result.tokens,
            "train_loss": result.train_loss,
            "wall_s": result.wall_s,
            "steps": result.steps,
            "declined": 0,
            **({"epsilon": float(result.privacy["epsilon_spent"])} if result.privacy else {}),
        }
    )
    record_round(
        context,
        {
            "round": int(round_cfg["server-round"]),
            "examples": result.examples,
            "tokens": result.tokens,
            "train_loss": result.train_loss,
            "wall_s": result.wall_s,
            "epsilon": result.privacy.get("epsilon_spent"),
        },
    )
    return LocalUpdate(cfg, start, end, metrics, who)


@app.train()
def train(message: Message, context: Context) -> Message:
    update = local_update(message, context)
    if isinstance(update, Message):
        return update
    content = RecordDict({"arrays": arrays_to_record(update.end), "metrics": update.metrics, "contributor": update.who})
    return Message(content=content, reply_to=message)


register_secagg_handlers(app, local_update)
