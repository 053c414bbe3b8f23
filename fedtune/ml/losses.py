"""Per-sequence language-model loss.

Hugging Face's ``labels=`` loss averages token losses over the whole batch, so one sample's gradient
depends on how many tokens the others have. DP-SGD needs a loss that is a sum or mean of independent
per-sample terms, so fedtune computes each sequence's mean token loss itself and averages those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sequence_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, shape ``(batch,)``.

    Padding (``attention_mask == 0``) is excluded; a sequence with no target token gets loss 0.
    """
    shift_logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:]
    mask = attention_mask[:, 1:].to(shift_logits.dtype)
    token_loss = F.cross_entropy(shift_logits.transpose(1, 2), targets, reduction="none")
    counts = mask.sum(dim=1)
    return (token_loss * mask).sum(dim=1) / counts.clamp(min=1.0)


def token_counts(attention_mask: torch.Tensor) -> torch.Tensor:
    """Number of predicted tokens per sequence (the first token has no target)."""
    return attention_mask[:, 1:].sum(dim=1)
