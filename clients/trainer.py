"""Local training on a contributor's shard: the steps the coordinator assigned, nothing more."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedtune.ml.data import TokenizedSet
from fedtune.ml.losses import per_sequence_loss, token_counts
from fedtune.privacy import ContributorPrivacy, causal_lm_loss


@dataclass
class TrainResult:
    """What a contributor reports about its local run (the update itself travels separately)."""

    examples: int
    tokens: int
    train_loss: float
    wall_s: float
    steps: int
    privacy: dict[str, Any] = field(default_factory=dict)


def _optimizer(model: torch.nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)


def train_local(
    model: torch.nn.Module, shard: TokenizedSet, steps: int, batch_size: int, learning_rate: float, seed: int
) -> TrainResult:
    """Run ``steps`` AdamW steps on the trainable adapter with the per-sequence mean loss.

    The loss is the mean of each sequence's mean token loss (not HF's batch-wide token mean), so each
    sample's gradient is independent of the others' lengths, as DP-SGD requires.
    """
    device = next(model.parameters()).device
    optimizer = _optimizer(model, learning_rate)
    model.train()
    start = time.perf_counter()
    examples = tokens = 0
    loss_sum = 0.0
    for batch in shard.batches(batch_size, steps, seed):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits
        loss = per_sequence_loss(logits, batch["input_ids"], batch["attention_mask"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach())
        examples += batch["input_ids"].shape[0]
        tokens += int(token_counts(batch["attention_mask"]).sum())
    return TrainResult(
        examples=examples,
        tokens=tokens,
        train_loss=loss_sum / max(steps, 1),
        wall_s=time.perf_counter() - start,
        steps=steps,
    )


def train_local_private(
    model: torch.nn.Module,
    shard: TokenizedSet,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    privacy: ContributorPrivacy,
) -> TrainResult:
    """DP-SGD (DP-AdamW) for ``steps`` Poisson-sampled batches, accounted in the contributor's lifetime budget.

    The accountant's history is saved to the contributor's state dir before this returns, so the ε
    spent is on disk before the update leaves the machine.
    """
    loader = DataLoader(range(len(shard)), batch_size=batch_size, collate_fn=shard.collate)
    tokens = 0

    def counting_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nonlocal tokens
        tokens += int(token_counts(batch["attention_mask"]).sum())
        return causal_lm_loss(module, batch)

    start = time.perf_counter()
    sample_gen = torch.Generator().manual_seed(seed)
    with privacy.make_private(model, _optimizer(model, learning_rate), loader, sample_generator=sample_gen) as run:
        metrics = run.train_steps(steps, counting_loss)
    privacy.save()
    loss = float(metrics["loss"])
    return TrainResult(
        examples=int(metrics["samples"]),
        tokens=tokens,
        train_loss=loss if loss == loss else 0.0,
        wall_s=time.perf_counter() - start,
        steps=int(metrics["steps"]),
        privacy=privacy.summary(),
    )
