"""SecAgg+ round overhead: the quickstart campaign with ``secagg+`` against ``none`` (and SecAgg+ before), side by side.

Each protocol runs as its own ``fedtune simulate`` process on the same campaign (same seeds, same cohorts);
the figure is the median round wall time over rounds 2..N (round 1 also starts the actors and loads the
model), reported as secure ÷ plain (target <= 1.10), plus the upload per trained parameter. With ``--before
REV`` (default ``1449ff1``, the SecAgg+ that trusted the coordinator; ``""`` to skip) the same campaign also runs
on the code of that git revision, exported to a temporary folder that goes first on ``PYTHONPATH``, so the cost
of the malicious-coordinator checks (one more stage, signatures, hashes) shows as secure ÷ secure-before.

    python bench/bench_secagg_round.py [--rounds 5] [--repeat 2] [--before 1449ff1] [--out results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ("none", "secagg+")
BEFORE = "secagg+ before"


def export_revision(revision: str, folder: Path) -> Path:
    """The package at ``revision`` as an importable ``fedtune`` (clients/server/strategies folded in) in ``folder``."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", revision], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(folder, filter="data")
    for part in ("clients", "server", "strategies"):  # what pyproject's package-dir maps under fedtune
        shutil.copytree(folder / part, folder / "fedtune" / part)
    return folder


def run_campaign(protocol: str, rounds: int, tmp: Path, code: Path | None = None) -> tuple[list[dict[str, Any]], int]:
    """Simulate the quickstart with ``protocol`` (on the code in ``code`` if given); rows and trainable parameters."""
    from fedtune.config import load_config
    from fedtune.ml.model import build_model
    from fedtune.rundir import RunDir

    run = tmp / protocol.replace("+", "plus").replace(" ", "-")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = load_config(
        REPO / "experiments" / "quickstart.toml",
        {
            "federation": {"rounds": rounds},
            "secure_aggregation": {"protocol": protocol.split()[0]},
            "campaign": {"run_dir": str(run)},
        },
    )
    config = tmp / f"{run.name}.toml"
    config.write_text(cfg.to_toml())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(code or ""), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", str(config), "--run-dir", str(run)],
        capture_output=True,
        text=True,
        cwd=code,
        env=env,
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
    stages = [sum(s for k, s in r.get("secagg_stage_s", {}).items() if k != "advertise") for r in warm]
    return {
        "round_wall_s": statistics.median(r["wall_s"] for r in warm),
        "round_trip_s": statistics.median(r["round_trip_s"] for r in warm),
        "protocol_stages_s": statistics.median(stages),  # SecAgg+ exchanges after training (0 for plain rounds)
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
        help="run sets of campaigns, rotating which protocol goes first (noisy machines)",
    )
    parser.add_argument("--before", default="1449ff1", help="git revision of SecAgg+ before the checks; '' to skip")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    protocols = (*PROTOCOLS, BEFORE) if args.before else PROTOCOLS
    rows: dict[str, list[dict[str, Any]]] = {p: [] for p in protocols}
    pair_ratios: dict[str, list[float]] = {"secagg+ / none": [], "secagg+ / secagg+ before": []}
    with tempfile.TemporaryDirectory() as tmp:
        code = export_revision(args.before, Path(tmp) / "before") if args.before else None
        for i in range(args.repeat):
            walls = {}
            for protocol in protocols[i % len(protocols) :] + protocols[: i % len(protocols)]:
                where = code if protocol == BEFORE else None
                run_rows, n_params = run_campaign(protocol, args.rounds, Path(tmp) / str(i), where)
                rows[protocol] += run_rows
                walls[protocol] = summarize(run_rows, n_params)["round_wall_s"]
            pair_ratios["secagg+ / none"].append(walls["secagg+"] / walls["none"])
            if BEFORE in walls:
                pair_ratios["secagg+ / secagg+ before"].append(walls["secagg+"] / walls[BEFORE])
    results = {p: summarize(r, n_params) for p, r in rows.items()}
    ratios = {"secagg+ / none": results["secagg+"]["round_wall_s"] / results["none"]["round_wall_s"]}
    if BEFORE in results:
        ratios["secagg+ / secagg+ before"] = results["secagg+"]["round_wall_s"] / results[BEFORE]["round_wall_s"]
    print(
        f"quickstart campaign, {args.repeat} x {args.rounds} rounds per protocol, median over rounds "
        f"2..{args.rounds}, {n_params} trained parameters\n"
    )
    print(
        "| protocol | round wall s | round trip s | SecAgg+ stages after training s | upload B/param "
        "| final eval loss |"
        "\n|---|---|---|---|---|---|"
    )
    for name, r in results.items():
        print(
            f"| {name} | {r['round_wall_s']:.2f} | {r['round_trip_s']:.2f} | {r['protocol_stages_s']:.3f} "
            f"| {r['upload_bytes_per_param']:.3f} | {r['eval_loss_final']:.4f} |"
        )
    for name, ratio in ratios.items():
        per = ", ".join(f"{r:.3f}" for r in pair_ratios[name])
        print(f"\nround-time ratio {name}: **{ratio:.3f}**; per set: {per}")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "rounds": args.rounds,
                    "repeat": args.repeat,
                    "before": args.before,
                    "n_params": n_params,
                    "ratios": ratios,
                    "pair_ratios": pair_ratios,
                    **results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
