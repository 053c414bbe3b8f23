"""Is a round's adapter update signal or noise? The singular values of each module's ΔB, round by round.

Not a test. Reads the checkpoints of a finished run (``RUN/checkpoints/round-N/adapter_model.safetensors``) and,
for every ``lora_B`` tensor and each round, prints the share of ΔB's energy in its largest singular directions and
its smallest ÷ largest singular value. A Gaussian noise matrix of shape m × n (m ≥ n) has that ratio near
(√m − √n) / (√m + √n) (the Marchenko–Pastur edges) and spreads its energy evenly (1/n a direction); a low-rank
signal above the noise shows as a few directions holding most of the energy. Under DP-SGD this says whether a
server-side low-rank denoising of the update (post-processing, free under DP) could help.

    python bench/update_spectrum.py RUN_DIR [--rounds 1,5] [--modules 7]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def lora_b(run: Path, round_: int) -> dict[str, np.ndarray]:
    tensors = load_file(run / "checkpoints" / f"round-{round_}" / "adapter_model.safetensors")
    return {k: v.astype(np.float64) for k, v in tensors.items() if "lora_B" in k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--rounds", default="1,5", help="rounds whose update (round N minus round N-1) to show")
    parser.add_argument("--modules", type=int, default=7, help="how many lora_B tensors (sorted by name)")
    args = parser.parse_args()
    for round_ in (int(r) for r in args.rounds.split(",")):
        before, after = lora_b(args.run, round_ - 1), lora_b(args.run, round_)
        for name in sorted(after)[: args.modules]:
            delta = after[name] - before[name]
            singular = np.linalg.svd(delta, compute_uv=False)
            energy = singular**2 / float(np.sum(singular**2))
            m, n = max(delta.shape), min(delta.shape)
            edge = (math.sqrt(m) - math.sqrt(n)) / (math.sqrt(m) + math.sqrt(n))
            top = " ".join(f"{e:.2f}" for e in energy[:4])
            print(
                f"round {round_} {name.removeprefix('base_model.model.')[:48]:48s} {delta.shape}: energy of the top "
                f"directions {top} (noise: {1 / n:.2f} each); smallest/largest {singular[-1] / singular[0]:.2f} "
                f"(noise: {edge:.2f})"
            )


if __name__ == "__main__":
    main()
