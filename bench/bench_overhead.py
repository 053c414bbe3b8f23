"""Federation overhead: a simulated round's wall time ÷ the same local steps run standalone.

The simulated side is ``fedtune simulate`` with one contributor per round (so the comparison is one
process's work against one process's work); the standalone side is the contributor's own loop (``train_local``)
in this process, without Flower, on the same model, the same LoRA config and the same batches. Both use one
torch thread (on a shared 2-core machine, two threads in one process contend with everything else and make the
figure noise).

    python bench/bench_overhead.py [--steps 150] [--rounds 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Collect:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_start(self, cfg: Any, row0: dict[str, Any]) -> None:
        pass

    def on_round(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


def campaign(steps: int, rounds: int, run_dir: str):
    from fedtune.config import load_config

    cpus = 1.0
    return load_config(
        REPO / "experiments" / "quickstart.toml",
        {
            "federation": {"rounds": rounds, "contributors_per_round": 1, "min_cohort": 1, "local_steps": steps},
            "simulation": {"contributors": 1, "cpus_per_contributor": cpus},
            "campaign": {"run_dir": run_dir},
        },
    )


def standalone_seconds(cfg, server_round: int) -> float:
    """The same steps with plain transformers + PEFT and the contributor's loop: no Flower, no records, no Ray."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.clients.trainer import Randomness, train_local
    from fedtune.ml.data import load_shard
    from fedtune.ml.tiny import builtin_path

    path = builtin_path(cfg.model.name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    lora = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_modules))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_B" in name)
    shard = load_shard(cfg, tok, 0, 1)
    fed = cfg.federation
    seed = cfg.campaign.seed * 1_000_003 + server_round * 1009  # what the ClientApp uses for partition 0
    result = train_local(
        model,
        shard,
        steps=fed.local_steps,
        batch_size=fed.batch_size,
        learning_rate=fed.learning_rate,
        randomness=Randomness.from_seed(seed, device=torch.device("cpu")),
    )
    return result.wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()

    import torch

    from fedtune.cli.simulate import quiet_libraries
    from fedtune.rundir import RunDir
    from fedtune.server.simulation import simulate

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = campaign(args.steps, args.rounds, tmp)
        run_dir = RunDir(Path(tmp))
        run_dir.create(cfg.to_toml())
        collect = Collect()
        simulate(cfg, run_dir, collect)
    torch.set_num_threads(1)
    warm = collect.rows[1:]  # round 1 includes starting the actor and loading the model
    standalone = [standalone_seconds(cfg, r["round"]) for r in warm]
    trip = statistics.median(r["round_trip_s"] for r in warm)
    full = statistics.median(r["wall_s"] for r in warm)
    alone = statistics.median(standalone)
    result = {
        "steps": args.steps,
        "batch_size": cfg.federation.batch_size,
        "threads": 1,
        "round_trip_s": trip,
        "round_wall_s": full,
        "standalone_s": alone,
        "cold_first_round_s": collect.rows[0]["round_trip_s"],
        "ratio_round_trip": trip / alone,
        "ratio_full_round": full / alone,
    }
    print("| measure | seconds | ÷ standalone |\n|---|---|---|")
    print(f"| standalone train_local, {args.steps} steps | {alone:.2f} | 1.00 |")
    print(f"| simulated round: send → train → reply | {trip:.2f} | {trip / alone:.3f} |")
    print(f"| simulated round incl. server eval + checkpoint | {full:.2f} | {full / alone:.3f} |")
    print(f"| first round (actor start, model load) | {result['cold_first_round_s']:.2f} | - |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
