"""A contributor's AdamW moments carry over between its rounds: two carried rounds are one continuous AdamW run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedtune.clients.optimizer_state import STATE_FILE, OptimizerState
from fedtune.clients.trainer import Randomness, ShuffledBatches, causal_lm_loss, train_local
from fedtune.config import CampaignConfig
from fedtune.ml.data import TokenizedSet, load_raw, partition, split_eval, tokenize
from fedtune.ml.model import build_model, load_trainable, trainable_arrays
from fedtune.privacy import trainable_parameters

from ..conftest import small_campaign

LR, STEPS, BATCH = 0.01, 3, 4


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, TokenizedSet, dict[str, np.ndarray]]:
    cfg = CampaignConfig.from_dict(small_campaign())
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    pool, _ = split_eval(cfg, load_raw(cfg.data))
    return model, tokenize(cfg.data, partition(cfg, pool, 0, 2), tok), trainable_arrays(model)


def rounds(model: torch.nn.Module, shard: TokenizedSet, start: dict, states: list[OptimizerState | None]) -> dict:
    """One local round per entry of ``states`` (seeds 1, 2, …), each from where the last one ended."""
    load_trainable(model, start)
    for seed, state in enumerate(states, 1):
        train_local(
            model,
            shard,
            steps=STEPS,
            batch_size=BATCH,
            learning_rate=LR,
            randomness=Randomness.from_seed(seed),
            optimizer_state=state,
        )
    return trainable_arrays(model)


def continuous_adamw(model: torch.nn.Module, shard: TokenizedSet, start: dict, seeds: tuple[int, ...]) -> dict:
    """The reference: one torch AdamW stepped by hand over the same batches the rounds drew."""
    load_trainable(model, start)
    model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=LR, weight_decay=0.0)
    for seed in seeds:
        sampler = ShuffledBatches(len(shard), BATCH, Randomness.from_seed(seed).sampling)
        batches = iter(DataLoader(shard, batch_sampler=sampler, collate_fn=shard.pad))
        for _ in range(STEPS):
            optimizer.zero_grad()
            causal_lm_loss(model, next(batches)).mean().backward()
            optimizer.step()
    return trainable_arrays(model)


def gap(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def key(model: torch.nn.Module, campaign: str = "campaign") -> str:
    return OptimizerState.key_for(campaign, trainable_parameters(model))


def test_carried_rounds_equal_one_continuous_adamw_run(setup: tuple, tmp_path: Path) -> None:
    model, shard, start = setup
    state = OptimizerState(tmp_path, key(model))
    carried = rounds(model, shard, start, [state, state])
    reference = continuous_adamw(model, shard, start, (1, 2))
    cold = rounds(model, shard, start, [None, None])
    assert gap(carried, reference) < 1e-6
    assert gap(cold, reference) > 1e-4  # starting cold each round is measurably another run
    saved = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert {float(s["step"]) for s in saved["state"].values()} == {2.0 * STEPS}


def test_another_campaign_or_a_damaged_file_starts_cold(
    setup: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, shard, start = setup
    cold = rounds(model, shard, start, [None, None])
    first = OptimizerState(tmp_path, key(model, "campaign A"))
    assert gap(rounds(model, shard, start, [first, OptimizerState(tmp_path, key(model, "campaign B"))]), cold) < 1e-7
    (tmp_path / STATE_FILE).write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="fedtune.optimizer_state"):
        assert gap(rounds(model, shard, start, [None, first]), cold) < 1e-7
    assert "starts cold" in caplog.text
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["key"] == first.key  # overwritten by a valid one


def test_a_cosine_campaign_trains_each_round_at_its_annealed_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round r of a cosine campaign is the same local run as a constant campaign at the rate computed here by hand,
    lr_min + (lr - lr_min)(1 + cos(π (r - 1)/R))/2, through fedtune's ClientApp (same reproducible draws)."""
    import math

    from flwr.app import MessageType

    from fedtune.clients.app import app
    from fedtune.clients.policy import SIMULATION_SEED_ENV, SIMULATION_STATE_ROOT_ENV, prepare_simulated_contributors
    from fedtune.ml.model import base_fingerprint
    from fedtune.wire import Layout, TrainRequest

    from .inprocess_grid import InProcessGrid

    rounds, server_round, high, low = 8, 5, 0.02, 0.002
    monkeypatch.setenv(SIMULATION_SEED_ENV, "7")

    def trained(name: str, **federation: object) -> dict:
        fed = {"rounds": rounds, "local_steps": STEPS, "batch_size": BATCH, "keep_optimizer_state": False}
        cfg = CampaignConfig.from_dict(small_campaign(federation=fed | federation))
        start = trainable_arrays(build_model(cfg)[0])
        monkeypatch.setenv(SIMULATION_STATE_ROOT_ENV, str(tmp_path / name))
        prepare_simulated_contributors(cfg, tmp_path / name)
        grid = InProcessGrid(app, {1: {"partition-id": 0, "num-partitions": 3}})
        request = TrainRequest.of(cfg, base_fingerprint(cfg.model), server_round, start)
        (reply,) = grid.send_and_receive([grid.create_message(request.content(), MessageType.TRAIN, 1, "1")])
        assert not reply.has_error(), reply.error.reason
        return Layout.of(start).unpack(reply.content.array_records["arrays"])

    by_hand = low + (high - low) * (1 + math.cos(math.pi * (server_round - 1) / rounds)) / 2
    cosine = trained("cosine", learning_rate=high, min_learning_rate=low, lr_schedule="cosine")
    assert gap(cosine, trained("constant", learning_rate=by_hand)) < 1e-6
    assert gap(cosine, trained("peak", learning_rate=high)) > 1e-3  # the schedule did change this round
