"""Held-out evaluation: token-weighted mean next-token loss and perplexity."""

from __future__ import annotations

import math

import torch

from fedtune.ml.data import TokenizedSet
from fedtune.ml.losses import per_sequence_loss, token_counts


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: TokenizedSet, batch_size: int = 32) -> dict[str, float]:
    """Mean loss per predicted token over ``data`` (sequence means re-weighted by their token counts)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = data.collate(list(range(start, min(start + batch_size, len(data)))))
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits
        counts = token_counts(batch["attention_mask"])
        total_loss += float((per_sequence_loss(logits, batch["input_ids"], batch["attention_mask"]) * counts).sum())
        total_tokens += int(counts.sum())
    model.train(was_training)
    loss = total_loss / max(total_tokens, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": float(total_tokens)}
