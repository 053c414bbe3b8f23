"""Simulation round trip with more virtual contributors than Ray actors: per-actor workspace cache vs before.

The same campaign (the quickstart, 4 contributors on 2 Ray actors) runs with ``[simulation] workspace_cache``
on (fedtune now: each actor keeps its model and the shards it served, LRU-bounded) and off (fedtune before: one
contributor's model and shard per actor, rebuilt whenever the actor serves another contributor), alternately in
one process, so both see the same machine load. Reported: the median send → last reply time of a round (all
rounds, and rounds 2.. without Ray's start), the final eval loss (the cache must not change it) and how often the
actors built a model or loaded a shard (their own counters, ``RUN/contributors/workspaces/``).

    nice python bench/bench_workspace_cache.py [--rounds 5] [--steps 20] [--repeat 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_overhead import REPO, Collect  # noqa: E402


def run(cached: bool, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    from fedtune.config import load_config
    from fedtune.rundir import RunDir
    from fedtune.server.simulation import simulate

    run_dir = Path(tmp) / ("cached" if cached else "rebuilt")
    cfg = load_config(
        REPO / "experiments" / "quickstart.toml",
        {
            "federation": {
                "rounds": args.rounds,
                "local_steps": args.steps,
                "contributors_per_round": args.contributors,
            },
            "simulation": {
                "contributors": args.contributors,
                "cpus_per_contributor": (os.cpu_count() or 2) / args.actors,
                "workspace_cache": cached,
            },
            "campaign": {"run_dir": str(run_dir)},
        },
    )
    rd = RunDir(run_dir)
    rd.create(cfg.to_toml())
    collect = Collect()
    simulate(cfg, rd, collect)
    stats = [json.loads(p.read_text()) for p in (run_dir / "contributors" / "workspaces").glob("*.json")]
    from fedtune.credit.ledger import Ledger, default_url

    with Ledger.open(default_url(run_dir)) as ledger:  # the contributors' own training wall time, per round
        entries = [e for r in range(1, args.rounds + 1) for e in ledger.round_entries(cfg.campaign.name, r)]
    walls = [e.reported_wall_s for e in entries]
    trips = [r["round_trip_s"] for r in collect.rows]
    return {
        "workspace_cache": cached,
        "actors": len(stats),
        "trainings": sum(s["rounds"] for s in stats),
        "build_model": sum(s["build_model"] for s in stats),
        "load_shard": sum(s["load_shard"] for s in stats),
        "build_and_load_s": sum(s.get("build_model_s", 0) + s.get("load_shard_s", 0) for s in stats),
        "round_trip_s": trips,
        "median_round_trip_s": statistics.median(trips),
        "median_train_wall_s": statistics.median(w for w in walls if w is not None),
        "median_warm_round_trip_s": statistics.median(trips[1:]),
        "final_eval_loss": collect.rows[-1]["eval_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--contributors", type=int, default=4)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()

    from fedtune.cli.simulate import quiet_libraries

    quiet_libraries()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for cached in (False, True) if i % 2 == 0 else (True, False):
                results.append(run(cached, args, f"{tmp}/{i}"))
                print(json.dumps({k: v for k, v in results[-1].items() if k != "round_trip_s"}), flush=True)
    by = {c: [r for r in results if r["workspace_cache"] is c] for c in (False, True)}
    old = statistics.median(t for r in by[False] for t in r["round_trip_s"])
    new = statistics.median(t for r in by[True] for t in r["round_trip_s"])
    old_w = statistics.median(t for r in by[False] for t in r["round_trip_s"][1:])
    new_w = statistics.median(t for r in by[True] for t in r["round_trip_s"][1:])
    n, a = args.contributors, args.actors
    print(f"\n{n} contributors on {a} actors, {args.rounds} rounds x {args.steps} steps, {args.repeat} pair(s)")
    print("| measure | rebuilt (before) | cached (now) | ratio |\n|---|---|---|---|")
    print(f"| median round trip, all rounds | {old:.2f} s | {new:.2f} s | {new / old:.2f} |")
    print(f"| median round trip, rounds 2.. | {old_w:.2f} s | {new_w:.2f} s | {new_w / old_w:.2f} |")
    for key in ("build_model", "load_shard", "trainings"):
        print(f"| {key} calls | {by[False][0][key]} | {by[True][0][key]} | |")
    spent = {c: statistics.median(r["build_and_load_s"] for r in by[c]) for c in (False, True)}
    print(f"| actors' seconds in build_model + load_shard | {spent[False]:.1f} | {spent[True]:.1f} | |")
    print(f"| final eval loss | {by[False][0]['final_eval_loss']:.6f} | {by[True][0]['final_eval_loss']:.6f} | |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
