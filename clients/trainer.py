"""Local training on a contributor's shard: the steps the coordinator assigned, nothing more."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedtune.data import TokenizedSet
from fedtune.losses import per_sequence_loss, token_counts


@dataclass
class TrainResult:
    """What a contributor reports about its local run (the update itself travels separately)."""

    examples: int
    tokens: int
    train_loss: float
    wall_s: float
    steps: int


def train_local(model: torch.nn.Module, shard: TokenizedSet, steps: int, batch_size: int,
                learning_rate: float, seed: int) -> TrainResult:
    """Run ``steps`` AdamW steps on the trainable adapter with the per-sequence mean loss.

    The loss is the mean of each sequence's mean token loss (not HF's batch-wide token mean), so each
    sample's gradient is independent of the others' lengths, as DP-SGD requires.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
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
    return TrainResult(examples=examples, tokens=tokens, train_loss=loss_sum / max(steps, 1),
                       wall_s=time.perf_counter() - start, steps=steps)
