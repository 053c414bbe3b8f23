"""The fedtune ClientApp: what runs on a contributor for each round (Flower Message API).

The coordinator's train message carries the campaign config, the base fingerprint and the current
shared adapter tensors. The contributor checks the fingerprint, trains on its own shard, and replies
with its new adapter tensors and what it did. A contributor that will not train this round (a foreign
base, later: a spent privacy budget) replies with ``declined = 1`` and its reason.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.config import CampaignConfig
from fedtune.data import TokenizedSet, load_shard
from fedtune.identity import simulated_identity
from fedtune.modeling import (
    FingerprintMismatch,
    build_model,
    check_fingerprint,
    load_trainable,
    trainable_arrays,
)
from fedtune.records import arrays_from_record, arrays_to_record, campaign_from_record

from .trainer import train_local

log = logging.getLogger("fedtune.client")
app = ClientApp()


@dataclass
class _Workspace:
    """Model and shard kept between rounds in a long-lived contributor process."""

    model: object
    shard: TokenizedSet


_WORKSPACES: dict[tuple[str, int, int], _Workspace] = {}


def _workspace(cfg: CampaignConfig, cfg_key: str, partition_id: int, num_partitions: int) -> _Workspace:
    key = (cfg_key, partition_id, num_partitions)
    if key not in _WORKSPACES:
        _WORKSPACES.clear()  # one campaign per process at a time: free the previous model
        model, tokenizer = build_model(cfg)
        _WORKSPACES[key] = _Workspace(model, load_shard(cfg, tokenizer, partition_id, num_partitions))
    return _WORKSPACES[key]


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))


def identity_record(cfg: CampaignConfig, context: Context) -> ConfigRecord:
    """Who this contributor is, for the coordinator's credit ledger.

    A deployed contributor's join agent puts its key-derived id, name, team and benchmarked peak FLOP/s
    in the node config; a virtual one gets an id derived from the campaign and its partition.
    """
    node = context.node_config
    if "contributor-id" in node:
        return ConfigRecord({"id": str(node["contributor-id"]), "name": str(node.get("name", "")),
                             "team": str(node.get("team", "")), "peak-flops": float(node.get("peak-flops", 0.0))})
    who = simulated_identity(cfg.campaign.name, _partition(context)[0])
    return ConfigRecord({"id": who.id, "name": who.name, "team": who.team or "", "peak-flops": 0.0})


def decline(message: Message, reason: str, who: ConfigRecord) -> Message:
    """Reply that this contributor does not train this round, and why (the server logs it)."""
    log.warning("declining round: %s", reason)
    content = RecordDict({"metrics": MetricRecord({"declined": 1, "num-examples": 0}),
                          "reason": ConfigRecord({"reason": reason}), "contributor": who})
    return Message(content=content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    cfg_toml, cfg = campaign_from_record(message.content["config"])
    round_cfg = message.content["config"]
    who = identity_record(cfg, context)
    try:
        check_fingerprint(cfg.model, str(round_cfg["base-fingerprint"]))
    except FingerprintMismatch as exc:
        return decline(message, str(exc), who)
    partition_id, num_partitions = _partition(context)
    ws = _workspace(cfg, hashlib.sha256(cfg_toml.encode()).hexdigest(), partition_id, num_partitions)
    load_trainable(ws.model, arrays_from_record(message.content["arrays"]))
    server_round = int(round_cfg["server-round"])
    fed = cfg.federation
    result = train_local(ws.model, ws.shard, steps=fed.local_steps, batch_size=fed.batch_size,
                         learning_rate=fed.learning_rate,
                         seed=cfg.campaign.seed * 1_000_003 + server_round * 1009 + partition_id)
    metrics = MetricRecord({
        "num-examples": result.examples, "tokens": result.tokens, "train_loss": result.train_loss,
        "wall_s": result.wall_s, "steps": result.steps, "declined": 0,
    })
    content = RecordDict({"arrays": arrays_to_record(trainable_arrays(ws.model)), "metrics": metrics,
                          "contributor": who})
    return Message(content=content, reply_to=message)
