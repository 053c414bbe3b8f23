"""Local learning rate × carried AdamW moments on the quickstart, in one process (FedAvg emulated, no Flower).

Not a test. Four contributors (the quickstart's IID shards) each run ``local_steps`` from the shared adapter per
round, their adapters are averaged with equal weights (their shards and batches are equal), and the server's
evaluator scores the average after every round; each contributor's moments live in its own
:class:`~fedtune.clients.optimizer_state.OptimizerState` when carried. Batches come from fixed seeds, so the
figures repeat; the real campaign draws from OS randomness (its final loss at 0.005 cold: 4.625, here 4.624).
``--grad-norms`` also prints the per-sample gradient norms at the base (what ``[privacy] max_grad_norm`` clips).

    python bench/bench_local_optimizer.py --lrs 0.005,0.01,0.015,0.02     # both modes; ≈ 1.5 min a run, 1 thread
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from fedtune.clients.optimizer_state import OptimizerState
from fedtune.clients.trainer import Randomness, causal_lm_loss, train_local
from fedtune.config import load_config
from fedtune.ml.data import load_shard
from fedtune.ml.evaluation import Evaluator
from fedtune.ml.model import build_model
from fedtune.privacy import trainable_parameters

REPO = Path(__file__).resolve().parents[1]


def campaign(config: str, lr: float, carry: bool) -> list[float]:
    """Eval loss after rounds 0..R of an emulated FedAvg campaign at local learning rate ``lr``."""
    cfg = load_config(config)
    fed, n = cfg.federation, cfg.simulation.contributors
    model, tokenizer = build_model(cfg)
    evaluator, params = Evaluator(cfg, tokenizer), trainable_parameters(model)
    shards = [load_shard(cfg, tokenizer, i, n) for i in range(n)]
    losses = [evaluator.run(model, 0)["eval_loss"]]
    with tempfile.TemporaryDirectory() as tmp:
        key = OptimizerState.key_for(config, params)
        states = [OptimizerState(Path(tmp) / str(i), key) if carry else None for i in range(n)]
        for rnd in range(1, fed.rounds + 1):
            shared = [p.detach().clone() for p in params]
            mean = [torch.zeros_like(p) for p in params]
            for i in range(n):
                with torch.no_grad():
                    for p, s in zip(params, shared, strict=True):
                        p.copy_(s)
                randomness = Randomness.from_seed(1000 * rnd + i)
                train_local(
                    model,
                    shards[i],
                    steps=fed.local_steps,
                    batch_size=fed.batch_size,
                    learning_rate=lr,
                    randomness=randomness,
                    optimizer_state=states[i],
                )
                for m, p in zip(mean, params, strict=True):
                    m += p.detach() / n
            with torch.no_grad():
                for p, m in zip(params, mean, strict=True):
                    p.copy_(m)
            losses.append(evaluator.run(model, rnd)["eval_loss"])
    return losses


def grad_norms(config: str, count: int = 24) -> list[float]:
    """Per-sample gradient L2 norms of the trainable adapter at the base, on contributor 0's first examples."""
    cfg = load_config(config)
    model, tokenizer = build_model(cfg)
    shard, params = load_shard(cfg, tokenizer, 0, cfg.simulation.contributors), trainable_parameters(model)
    norms = []
    for i in range(min(count, len(shard))):
        model.zero_grad()
        causal_lm_loss(model, shard.pad([shard[i]])).mean().backward()
        norms.append(float(torch.sqrt(sum((p.grad**2).sum() for p in params))))
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "experiments" / "quickstart.toml"))
    parser.add_argument("--lrs", default="0.005,0.01,0.015,0.02")
    parser.add_argument("--modes", default="cold,carried")
    parser.add_argument("--grad-norms", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.grad_norms:
        norms = grad_norms(args.config)
        print(f"per-sample grad norm: median {statistics.median(norms):.3f}, {min(norms):.3f}-{max(norms):.3f}")
    print(f"{'lr':>8} {'mode':>8} {'round 0':>8} {'final':>8}")
    for lr in (float(x) for x in args.lrs.split(",")):
        for mode in args.modes.split(","):
            losses = campaign(args.config, lr, mode == "carried")
            print(f"{lr:>8g} {mode:>8} {losses[0]:>8.4f} {losses[-1]:>8.4f}", flush=True)


if __name__ == "__main__":
    main()
