"""Empirical privacy audit: how much a campaign memorises a canary planted in one contributor's data.

Carlini et al. 2019 ("The Secret Sharer"): plant a secret of a fixed format ("... PIN is 123456") several
times in virtual contributor 0's shard, run the campaign, then rank the secret's likelihood under the shared
adapter among random candidates of the same format. Exposure = log2(candidates + 1) − log2(rank): about 1 bit
when nothing was learnt, up to log2(candidates + 1) when the secret is the model's top guess. The same
campaign runs without and with DP-SGD, and the base model gives the no-training reference.

    python bench/canary_audit.py [--config experiments/quickstart.toml] [--copies 20] [--candidates 4095]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "Note to self: the PIN of my bank card is {}."


@torch.no_grad()
def sequence_losses(model, tokenizer, texts: list[str], batch_size: int = 256) -> list[float]:
    """Total next-token loss (nats) of each text: the secret's log-perplexity under the model."""
    from fedtune.ml.losses import per_sequence_loss, token_counts

    model.eval()
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        mean = per_sequence_loss(logits, enc.input_ids, enc.attention_mask)
        out += (mean * token_counts(enc.attention_mask)).tolist()
    return out


def exposure(model, tokenizer, secret: str, candidates: list[str]) -> float:
    losses = sequence_losses(model, tokenizer, [TEMPLATE.format(secret)] + [TEMPLATE.format(c) for c in candidates])
    rank = 1 + sum(loss < losses[0] for loss in losses[1:])
    return math.log2(len(candidates) + 1) - math.log2(rank)


def run_campaign(config: Path, extra: Path, run_dir: Path, private: bool, epsilon: float) -> Path:
    patched = run_dir.parent / f"{run_dir.name}.toml"
    from fedtune.config import load_config

    cfg = load_config(
        config,
        {
            "simulation": {"extra_data": {"0": str(extra)}},
            "privacy": {"mechanism": "dp-sgd" if private else "none", "target_epsilon": epsilon},
        },
    )
    patched.write_text(cfg.to_toml())
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", str(patched), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "experiments" / "quickstart.toml"))
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=4095)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.config import load_config
    from fedtune.ml.model import resolve_model_dir

    rng = random.Random(args.seed)
    secret = f"{rng.randrange(10**6):06d}"
    pool = {f"{rng.randrange(10**6):06d}" for _ in range(args.candidates * 2)} - {secret}
    candidates = sorted(pool)[: args.candidates]
    base_dir = resolve_model_dir(load_config(args.config).model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    results = {
        "secret_format": TEMPLATE,
        "copies": args.copies,
        "candidates": len(candidates),
        "max_exposure_bits": math.log2(len(candidates) + 1),
    }
    results["base_model"] = exposure(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer, secret, candidates)
    with tempfile.TemporaryDirectory() as tmp:
        extra = Path(tmp) / "canary.jsonl"
        columns = json.loads(Path(load_config(args.config).data.source).read_text().splitlines()[0])
        row = {k: "canary" for k in columns} | {"text": TEMPLATE.format(secret)}
        extra.write_text("".join(json.dumps(row) + "\n" for _ in range(args.copies)))
        for label, private in (("no_dp", False), (f"dp_eps{args.epsilon:g}", True)):
            run = run_campaign(Path(args.config), extra, Path(tmp) / label, private, args.epsilon)
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(run / "adapter"))
            results[label] = exposure(model, tokenizer, secret, candidates)
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            results[f"{label}_eval_loss"] = [rows[0]["eval_loss"], rows[-1]["eval_loss"]]
    print("| model | canary exposure (bits) |\n|---|---|")
    print(f"| base model, no training | {results['base_model']:.2f} |")
    print(f"| campaign without DP | {results['no_dp']:.2f} |")
    print(f"| campaign with DP-SGD, ε = {args.epsilon:g} | {results[f'dp_eps{args.epsilon:g}']:.2f} |")
    print(f"(max measurable {results['max_exposure_bits']:.1f} bits; {args.copies} copies in contributor 0's shard)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
