"""The server's evaluation of the shared adapter: held-out loss and perplexity every round, task metrics when due.

:class:`Evaluator` is what the round loop calls (``Evaluator.run(model, server_round) -> dict``): it holds the
tokenized eval set (``[evaluation] source``, or the carve-out of ``[data]``) and the loaded tasks, pins torch's
thread count while it works, and returns the metrics for the round's ``metrics.jsonl`` line, including
``eval_loss_def``, the loss definition in words, so a number can be put next to another framework's.

Loss definitions (mean next-token cross-entropy in nats; perplexity = exp(loss)):

- ``token_mean``: summed over every predicted token of the set, divided by their count (what most harnesses
  report as a corpus loss);
- ``sequence_mean``: each sequence's mean token loss, averaged over sequences (the training objective).

Pitfalls: torch defaults to every core; on a coordinator that shares its cores (simulation, or contributors on
the same box) that makes the evaluation time swing by seconds, so threads are pinned (``[evaluation] threads``,
default 1) and restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedtune.config import CampaignConfig
from fedtune.ml.data import TokenizedSet, load_eval
from fedtune.ml.losses import per_sequence_loss, token_counts
from fedtune.ml.tasks import Task


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, data: TokenizedSet, batch_size: int = 32, loss: str = "token_mean"
) -> dict[str, float]:
    """Mean next-token loss over ``data``: per predicted token (``token_mean``) or per sequence (``sequence_mean``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens, seq_sum = 0.0, 0, 0.0
    for start in range(0, len(data), batch_size):
        batch = data.collate(list(range(start, min(start + batch_size, len(data)))))
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits
        counts = token_counts(batch["attention_mask"])
        per_seq = per_sequence_loss(logits, batch["input_ids"], batch["attention_mask"])
        total_loss += float((per_seq * counts).sum())
        seq_sum += float(per_seq.sum())
        total_tokens += int(counts.sum())
    model.train(was_training)
    value = total_loss / max(total_tokens, 1) if loss == "token_mean" else seq_sum / max(len(data), 1)
    return {"eval_loss": value, "perplexity": math.exp(min(value, 50.0)), "eval_tokens": float(total_tokens)}


def loss_definition(cfg: CampaignConfig, sequences: int) -> str:
    """The loss in words, as written to ``metrics.jsonl`` (``eval_loss_def``)."""
    ev = cfg.evaluation
    how = "per predicted token (token_mean)" if ev.loss == "token_mean" else "per sequence (sequence_mean)"
    source = (
        f"{Path(ev.source).name if Path(ev.source).exists() else ev.source} [{ev.split}]"
        if ev.source
        else (f"{cfg.data.eval_fraction:g} carve-out of [data] source")
    )
    return (
        f"mean next-token cross-entropy in nats, {how}; "
        f"{'BOS prepended, first token scored' if ev.bos else 'no BOS, first token not scored'}; "
        f"{'EOS appended and scored' if ev.eos else 'no EOS'}; "
        f"max {cfg.data.max_seq_len} tokens; {sequences} sequences of {source}"
    )


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch pinned to ``n`` threads (0: leave as is), then restore the previous count."""
    if n <= 0:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Evaluator:
    """Held-out loss every round; the ``[[evaluation.tasks]]`` at round 0, every ``every`` rounds and the last."""

    def __init__(self, cfg: CampaignConfig, tokenizer) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.eval_set = load_eval(cfg, tokenizer)
        self.tasks = [Task.load(spec) for spec in cfg.evaluation.tasks]
        self.definition = loss_definition(cfg, len(self.eval_set))

    def tasks_due(self, server_round: int) -> bool:
        every, last = self.cfg.evaluation.every, self.cfg.federation.rounds
        return bool(self.tasks) and (server_round % every == 0 or server_round >= last)

    def run(self, model: torch.nn.Module, server_round: int) -> dict[str, Any]:
        """This round's evaluation metrics (the keys the round's ``metrics.jsonl`` line gets)."""
        ev = self.cfg.evaluation
        with torch_threads(ev.threads):
            start = time.perf_counter()
            row: dict[str, Any] = evaluate_loss(model, self.eval_set, ev.batch_size, ev.loss)
            row["eval_loss_def"] = self.definition
            row["eval_s"] = time.perf_counter() - start
            if self.tasks_due(server_round):
                start = time.perf_counter()
                seed = self.cfg.campaign.seed * 1_000_003 + server_round
                row["tasks"] = {t.spec.name: t.score(model, self.tokenizer, ev.bos, seed) for t in self.tasks}
                row["tasks_s"] = time.perf_counter() - start
        return row
