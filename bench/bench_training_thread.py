"""Local training in a background thread vs the main thread, side by side in one process (issue 13).

Not a test. The resident worker trains a SecAgg+ round in a background thread (so it can answer ``view`` and
``share_keys`` meanwhile) and a plain round in its main thread; SecAgg+ training ran slower in the deployment
bench. This alternates the same ``train_local`` call (the quickstart model, 20 steps of batch 16, one torch
thread) in the main thread and in a fresh thread, to see whether the thread itself costs anything.

    OMP_NUM_THREADS=1 python bench/bench_training_thread.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from fedtune.clients.trainer import Randomness, train_local  # noqa: E402
from fedtune.config import load_config  # noqa: E402
from fedtune.ml.data import load_shard  # noqa: E402
from fedtune.ml.model import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(REPO / "experiments" / "quickstart.toml")
    model, tokenizer = build_model(cfg)
    shard = load_shard(cfg, tokenizer, 0, cfg.simulation.contributors)

    def once(seed: int) -> float:
        start = time.perf_counter()
        train_local(
            model,
            shard,
            steps=args.steps,
            batch_size=cfg.federation.batch_size,
            learning_rate=0.001,
            randomness=Randomness.from_seed(seed),
        )
        return time.perf_counter() - start

    def in_thread(seed: int) -> float:
        out: list[float] = []
        thread = threading.Thread(target=lambda: out.append(once(seed)))
        thread.start()
        thread.join()
        return out[0]

    once(0)  # warm-up
    main_s, thread_s = [], []
    for i in range(args.repeats):
        main_s.append(once(i))
        thread_s.append(in_thread(i))
    print(f"main thread s: {[round(x, 2) for x in main_s]}")
    print(f"new thread s:  {[round(x, 2) for x in thread_s]}")
    print(f"thread ÷ main (sums): {sum(thread_s) / sum(main_s):.3f}")


if __name__ == "__main__":
    main()
