"""SecAgg+ round overhead: the quickstart campaign with ``secagg+`` against ``none``, side by side.

Each protocol runs as its own ``fedtune simulate`` process on the same campaign (same seeds, same cohorts);
the figure is the median round wall time over rounds 2..N (round 1 also starts the actors and loads the
model), reported as secure ÷ plain (target <= 1.10), plus the upload per trained parameter.

    python bench/bench_secagg_round.py [--rounds 5] [--repeat 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ("none", "secagg+")


def run_campaign(protocol: str, rounds: int, tmp: Path) -> tuple[list[dict[str, Any]], int]:
    """Simulate the quickstart with ``protocol``; returns its metrics rows and trainable parameter count."""
    from fedtune.config import load_config
    from fedtune.ml.model import build_model
    from fedtune.rundir import RunDir

    run = tmp / protocol.replace("+", "plus")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = load_config(
        REPO / "experiments" / "quickstart.toml",
        {
            "federation": {"rounds": rounds},
            "secure_aggregation": {"protocol": protocol},
            "campaign": {"run_dir": str(run)},
        },
    )
    config = tmp / f"{run.name}.toml"
    config.write_text(cfg.to_toml())
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", str(config), "--run-dir", str(run)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"{protocol} run failed:\n{proc.stderr[-3000:]}")
    model, _ = build_model(cfg)
    return RunDir(run).read_metrics(), sum(p.numel() for p in model.parameters() if p.requires_grad)


def summarize(rows: list[dict[str, Any]], n_params: int) -> dict[str, Any]:
    """Median warm-round times and bytes uploaded per participant per trained parameter."""
    warm = [r for r in rows if r["round"] >= 2]  # rows of several runs may be pooled
    if not warm:
        sys.exit("need --rounds >= 2: round 1 includes actor start-up")
    up = sum(r["bytes_up"] for r in warm) / sum(r["participants"] for r in warm)
    return {
        "round_wall_s": statistics.median(r["wall_s"] for r in warm),
        "round_trip_s": statistics.median(r["round_trip_s"] for r in warm),
        "upload_bytes_per_param": up / n_params,
        "eval_loss_final": rows[-1]["eval_loss"],  # of the last run
        "participants": statistics.median(r["participants"] for r in warm),
        "per_round": [{k: r[k] for k in ("round", "wall_s", "round_trip_s", "bytes_up")} for r in warm],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run pairs of campaigns, alternating which protocol goes first (noisy machines)",
    )
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, Any]]] = {p: [] for p in PROTOCOLS}
    pair_ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            pair = {}
            for protocol in PROTOCOLS if i % 2 == 0 else PROTOCOLS[::-1]:
                run_rows, n_params = run_campaign(protocol, args.rounds, Path(tmp) / str(i))
                rows[protocol] += run_rows
                pair[protocol] = summarize(run_rows, n_params)["round_wall_s"]
            pair_ratios.append(pair["secagg+"] / pair["none"])
    results = {p: summarize(r, n_params) for p, r in rows.items()}
    ratio = results["secagg+"]["round_wall_s"] / results["none"]["round_wall_s"]
    print(
        f"quickstart campaign, {args.repeat} x {args.rounds} rounds per protocol, median over rounds "
        f"2..{args.rounds}, {n_params} trained parameters\n"
    )
    print("| protocol | round wall s | round trip s | upload B/param | final eval loss |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['round_wall_s']:.2f} | {r['round_trip_s']:.2f} | {r['upload_bytes_per_param']:.3f} "
            f"| {r['eval_loss_final']:.4f} |"
        )
    print(
        f"\nround-time ratio secagg+ / none: **{ratio:.3f}** (target <= 1.10); per pair: "
        + ", ".join(f"{r:.3f}" for r in pair_ratios)
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "rounds": args.rounds,
                    "repeat": args.repeat,
                    "n_params": n_params,
                    "ratio": ratio,
                    "pair_ratios": pair_ratios,
                    **results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
