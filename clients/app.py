"""The fedtune ClientApp: what runs on a contributor for each round (Flower Message API).

The coordinator's train message (:class:`fedtune.wire.TrainRequest`) carries the campaign config, the base
fingerprint and the current shared adapter tensors. The contributor checks the fingerprint, then the campaign
against its own policy and the parameters it pinned (:mod:`fedtune.clients.policy`), its shard and its lifetime
privacy budget, all before training; trains on its own shard with batches and noise drawn from OS randomness;
and replies with its new adapter tensors plus values that are assigned or coarse (:class:`~fedtune.wire.TrainReply`).
A contributor that will not train this round replies with a :class:`~fedtune.wire.Decline` and a reason that
names no private number; a request that is not well-formed is refused (the handler raises
:class:`~fedtune.wire.WireError`, the coordinator sees an error reply). Every message is built and read by
:mod:`fedtune.wire`.

Threat: the coordinator is the adversary of the contributor's data (DESIGN.md). Nothing it sends decides what
protects the contributor: the policy and the state dir are the contributor's own, the sampling and noise seeds
never leave the process, and the exact loss, token and sample counts, shard size, ε and wall time stay in the
contributor's own ``rounds.jsonl``.

Pitfall: a check that runs after training has already spent ε; keep every check in :func:`local_update` before
:func:`~fedtune.clients.trainer.train_local` (the SecAgg+ stage passes its own as ``refuse``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.config import CampaignConfig
from fedtune.identity import simulated_identity
from fedtune.ml.model import check_fingerprint, load_trainable, trainable_arrays
from fedtune.privacy import (
    ContributorPrivacy,
    PrivacyParams,
    clip_update,
    coarse_epsilon,
    coarse_loss,
    resolve_delta,
    trainable_parameters,
)
from fedtune.wire import (
    SECAGG_ADVERTISE,
    WORK,
    ContributorInfo,
    Decline,
    TrainReply,
    TrainReport,
    TrainRequest,
    Work,
    secagg_message_type,
)

from .errors import private_errors
from .optimizer_state import OptimizerState
from .policy import (
    CampaignPins,
    ContributorPolicy,
    PolicyError,
    Refusal,
    apply_own_data,
    campaign_refusal,
    contributor_state_dir,
    download_refusal,
    load_policy,
    shard_refusal,
    simulating,
    simulation_seed,
    work_refusal,
)
from .secagg_client import Trainer, register_secagg_handlers
from .trainer import Randomness, train_local
from .workspace import CACHE, local_choice, open_workspace

log = logging.getLogger("fedtune.client")
app = ClientApp()
NO_BASE = "this contributor does not have the coordinator's base model (missing here, or different: see its own log)"
"""The one decline reason for a base model that is missing or differs: which one, and the local fingerprint or
path, stay in the contributor's log (a campaign naming local paths as its model would otherwise probe the disk)."""


def _partition(context: Context) -> tuple[int, int]:
    """Which part of its data this contributor trains on: all of it (``join``'s default, 0 of 1) unless its node
    config says otherwise (virtual contributors; benchmarks that start several contributors on one data file)."""
    node = context.node_config
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
    """Append this contributor's round to ``STATE_DIR/rounds.jsonl`` (its own log, never sent; ``join`` prints it).

    Each row also says which process and thread served it and how many models that process has built so far
    (``pid``, ``thread``, ``model_loads``: a resident worker builds one per campaign and trains SecAgg+ rounds in a
    background thread)."""
    try:
        state = contributor_state_dir(context)
    except PolicyError:
        return  # declined before it was known where this contributor keeps its state
    state.mkdir(parents=True, exist_ok=True)
    with (state / "rounds.jsonl").open("a", encoding="utf-8") as fh:
        meta = {
            "pid": os.getpid(),
            "thread": threading.current_thread().name,
            "model_loads": int(CACHE.counts["build_model"]),
            "time": time.time(),
        }
        fh.write(json.dumps({**row, **meta}, sort_keys=True) + "\n")


def decline(
    message: Message,
    context: Context,
    server_round: int,
    who: ContributorInfo,
    why: Refusal,
    epsilon: float | None = None,
) -> Message:
    """Reply that this contributor does not train this round: the public reason (and coarse ε) go to the server,
    the detail stays in the contributor's own log and ``rounds.jsonl``."""
    log.warning("declining round %d: %s%s", server_round, why.reason, f" ({why.detail})" if why.detail else "")
    record_round(
        context,
        {"round": server_round, "declined": True, "reason": why.reason, "detail": why.detail, "epsilon": epsilon},
    )
    reply = Decline(why.reason, who, None if epsilon is None else coarse_epsilon(epsilon))
    return Message(content=reply.content(), reply_to=message)


def open_privacy(
    cfg: CampaignConfig,
    policy: ContributorPolicy,
    pins: CampaignPins | None,
    folder: Path,
    shard_size: int,
    batch_size: int,
) -> tuple[ContributorPrivacy | None, Refusal | None]:
    """The contributor's lifetime accountant for this round, or why the round is declined.

    The budget is min(policy ``max_epsilon``, the pinned first campaign's target, this campaign's target): it
    never grows. δ is the campaign's (or fedtune's public default), never derived from the shard; the shard must
    fit the policy and δ; the calibrated noise multiplier must reach the policy's minimum. A round without DP
    (which the policy allowed) still steps the accountant, with no noise: its ε is then infinite for good.
    """
    priv, fed = cfg.privacy, cfg.federation
    private = priv.mechanism == "dp-sgd"
    delta = resolve_delta(priv.delta or None)
    refusal = shard_refusal(policy, shard_size, delta if private else None)
    if refusal is not None:
        return None, refusal
    cap = min(policy.max_epsilon, pins.target_epsilon) if pins is not None else policy.max_epsilon
    params = PrivacyParams.from_campaign(
        priv, campaign_rounds=fed.rounds, personal_max_epsilon=cap if private else None
    )
    try:
        privacy = ContributorPrivacy.load(  # this contributor's batch (a small GPU may take less) sets q
            folder, params, shard_size=shard_size, batch_size=batch_size, local_steps=fed.local_steps
        )
    except ValueError as exc:  # calibration impossible; the message holds the sampling rate batch_size / n
        return None, Refusal(
            "cannot calibrate DP-SGD noise for the campaign's ε and δ on this contributor's shard", str(exc)
        )
    if private and privacy.noise_multiplier < policy.min_noise_multiplier:
        return None, Refusal(
            f"the campaign's ε and planned participation give a noise multiplier below this contributor's minimum "
            f"{policy.min_noise_multiplier:g}",
            f"σ = {privacy.noise_multiplier:.4f}",
        )
    ok, reason = privacy.check_round(fed.local_steps)
    if not ok:
        return privacy, Refusal("the round would take this contributor past its lifetime ε budget", reason)
    return privacy, None


def round_randomness(
    context: Context, policy: ContributorPolicy, server_round: int, device: torch.device
) -> Randomness:
    """Where this round's batches and noise come from: OS randomness (a CSPRNG in secure mode), never a public seed.

    Only a simulated contributor with the local switch :data:`~fedtune.clients.policy.SIMULATION_SEED_ENV` set
    draws reproducibly (from that seed, the round and its partition), so a secure and a plain simulation can be
    compared run for run.
    """
    if policy.secure_mode:
        return Randomness.csprng(device)
    seed = simulation_seed(context)
    if seed is None:
        return Randomness.secret(device)
    material = f"fedtune/simulation-seed/v1:{seed}:{server_round}:{_partition(context)[0]}".encode()
    return Randomness.from_seed(int.from_bytes(hashlib.sha256(material).digest()[:8], "big"), device=device)


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
    work: Work | None = None  # the rank and batch this contributor took on (sent with its reply, plain or masked)


def local_update(
    message: Message,
    request: TrainRequest,
    context: Context,
    refuse: Callable[[CampaignConfig], str | None] | None = None,
    on_train: Callable[[ContributorInfo], None] | None = None,
) -> LocalUpdate | Message:
    """Every contributor-side check, then local training: a decline reply, or the update to send.

    In order, all before training, so a declined round costs no ε: the base fingerprint; the campaign against the
    contributor's policy (:func:`~fedtune.clients.policy.campaign_refusal`) and against the first campaign it
    accepted (:class:`~fedtune.clients.policy.CampaignPins`); ``refuse`` (the SecAgg+ stage's own checks); the
    shard, the calibrated noise and the lifetime budget (:func:`open_privacy`). The first accepted round's
    parameters are pinned before it trains. The plain and the secure-aggregation handlers share everything else.
    ``on_train`` is called once every check has passed, just before training: from then on the round no longer
    declines (the SecAgg+ stage of a resident worker answers ``advertise`` there and trains in the background).
    """
    cfg, server_round = request.campaign(), request.server_round
    data_refusal = apply_own_data(cfg, context)  # before anything reads the campaign's data section
    who = contributor_info(cfg, context)
    if data_refusal is not None:
        return decline(message, context, server_round, who, data_refusal)
    folder, policy = contributor_state_dir(context), load_policy(context)
    if not simulating(context) and (too_big := download_refusal(policy, cfg)) is not None:
        return decline(message, context, server_round, who, too_big)
    try:
        check_fingerprint(cfg.model, request.base_fingerprint)
    except Exception as exc:  # different, or no such model here: one reason for both, so no probe of the disk
        return decline(message, context, server_round, who, Refusal(NO_BASE, f"{type(exc).__name__}: {exc}"))
    pins = CampaignPins.load(folder)
    secure = message.metadata.message_type == secagg_message_type(SECAGG_ADVERTISE)
    refusal = campaign_refusal(policy, cfg, secure) or (pins.refusal(CampaignPins.of(cfg)) if pins else None)
    if refusal is None and refuse is not None and (reason := refuse(cfg)) is not None:
        refusal = Refusal(reason)
    if refusal is not None:
        return decline(message, context, server_round, who, refusal)
    partition_id, num_partitions = _partition(context)
    choice = local_choice(cfg, context.node_config, partition_id)
    if isinstance(choice, str):  # this contributor's choices do not fit the campaign
        return decline(message, context, server_round, who, Refusal(choice))
    if (over := work_refusal(policy, cfg, choice.rank, choice.batch_size)) is not None:
        return decline(message, context, server_round, who, over)
    ws = open_workspace(cfg, request.campaign_toml, context.node_config, (partition_id, num_partitions), choice)
    if isinstance(ws, str):  # this contributor's hardware does not fit the campaign
        return decline(message, context, server_round, who, Refusal(ws))
    fed, private = cfg.federation, cfg.privacy.mechanism == "dp-sgd"
    privacy, refusal = open_privacy(cfg, policy, pins, folder, len(ws.shard), ws.batch_size)
    if refusal is not None:
        spent = privacy.epsilon_spent() if privacy is not None and private else None
        return decline(message, context, server_round, who, refusal, spent)
    assert privacy is not None
    if pins is None:
        CampaignPins.of(cfg).save(folder)
    start = request.tensors()
    load_trainable(ws.model, ws.to_local(start))
    moments = (
        OptimizerState(folder, OptimizerState.key_for(request.campaign_toml, trainable_parameters(ws.model)))
        if fed.keep_optimizer_state
        else None
    )
    if on_train is not None:
        on_train(who)
    result = train_local(
        ws.model,
        ws.shard,
        steps=fed.local_steps,
        learning_rate=fed.learning_rate_for(server_round),
        randomness=round_randomness(context, policy, server_round, ws.device),
        privacy=privacy,
        secure_mode=policy.secure_mode,
        optimizer_state=moments,
        **ws.train_options(),
    )
    end = ws.to_campaign(start, trainable_arrays(ws.model))
    if cfg.privacy.update_clip_norm > 0:
        end = clipped_update(start, end, cfg.privacy.update_clip_norm)
    spent = float(result.privacy["epsilon_spent"]) if private else None
    report = TrainReport(
        # the assigned work, not the Poisson draw; loss (if the policy sends it) and ε on a coarse public grid
        num_examples=fed.local_steps * ws.batch_size,
        steps=fed.local_steps,
        train_loss=coarse_loss(result.train_loss) if policy.report_train_loss else None,
        epsilon=None if spent is None else coarse_epsilon(spent),
    )
    record_round(
        context,
        {
            "round": server_round,
            "examples": result.examples,
            "tokens": result.tokens,
            "train_loss": result.train_loss,
            "wall_s": result.wall_s,
            "epsilon": spent,
        },
    )
    return LocalUpdate(cfg, start, end, report, who, ws.work())


def handle_train(trainer: Trainer, message: Message, context: Context) -> Message:
    """A plain round's ``train`` message: train and send the new adapter, or decline."""
    request = TrainRequest.read(message.content)
    update = trainer(message, request, context)
    if isinstance(update, Message):
        return update
    content = TrainReply(request.layout.pack(update.end), update.report, update.who).content()
    if update.work is not None:
        content[WORK] = update.work.to_record()
    return Message(content=content, reply_to=message)


def register_handlers(client_app: ClientApp, trainer: Trainer) -> None:
    """Register the plain ``train`` handler and the SecAgg+ stage handlers; ``trainer`` runs the local round."""
    wrap = functools.partial(private_errors, record=record_round)
    client_app.train()(wrap(functools.partial(handle_train, trainer)))
    register_secagg_handlers(client_app, trainer, wrap)


register_handlers(app, local_update)
