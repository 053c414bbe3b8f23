"""End to end: ``fedtune sweep`` over a 2-point grid (with a task metric), resuming an interrupted point and skipping
a finished one, then ``fedtune report`` over the sweep: HTML with embedded PNGs, one figure for both runs."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from fedtune.rundir import RunDir

from ..conftest import small_campaign
from .conftest import Campaigns, group_gone, wait_for_rounds


def fedtune(*args: str, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_sweep_resumes_and_report_compares(campaigns: Campaigns) -> None:
    mc = campaigns.root / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
            for q, c, a in [("1 + 1 =", ["2", "3"], 0), ("def f():", ["return", "zzz"], 0)]
        )
    )
    raw = small_campaign(
        federation={"rounds": 2, "contributors_per_round": 2, "local_steps": 2},
        simulation={"contributors": 2},
        evaluation={"tasks": [{"name": "mc", "kind": "choice", "source": str(mc), "choices_field": "choices"}]},
    )
    config = campaigns.write("sweep-base", raw)
    out = campaigns.root / "sweep"
    first = fedtune("sweep", str(config), "--set", "lora.rank=2,4", "--out", str(out))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    points = ["lora.rank=2", "lora.rank=4"]
    summary = json.loads((out / "summary.json").read_text())
    assert [p["point"] for p in summary["points"]] == points
    for p, rank in zip(summary["points"], (2, 4), strict=True):
        assert p["complete"] and p["rounds_done"] == 2 and p["values"] == {"lora.rank": rank}
        rows = RunDir(out / "points" / p["point"]).read_metrics()
        assert p["eval_loss_final"] == rows[-1]["eval_loss"]
        assert p["loss_drop"] == rows[0]["eval_loss"] - rows[-1]["eval_loss"]
        assert p["bytes_total"] == sum(r["bytes_up"] + r["bytes_down"] for r in rows)
        assert set(p["tasks"]["mc"]) == {"acc", "acc_norm", "n"} and p["tasks"] == rows[-1]["tasks"]
        adapter = json.loads((out / "points" / p["point"] / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == rank
    # FFA moves B only (out_features x r, float32): q, v and down_proj of the tiny model's 2 layers all have 128
    # outputs, so 2 more ranks add 2 layers x 3 modules x 128 x 2 x 4 bytes per transfer; 2 rounds x 2 contributors
    # x (down + up) = 8 transfers (the npy header of each array is the same at both ranks)
    extra = summary["points"][1]["bytes_total"] - summary["points"][0]["bytes_total"]
    assert extra == 8 * (2 * 3 * 128 * 2 * 4)
    table = (out / "summary.txt").read_text()
    assert "lora.rank" in table and "mc/acc" in table and len(table.strip().splitlines()) == 4

    # interrupt point 2 after round 1 (its last metrics line lost): rerun resumes it, skips point 1
    done_before = RunDir(out / "points" / points[0]).read_metrics()
    metrics = out / "points" / points[1] / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:-1]) + "\n")
    again = fedtune("sweep", str(config), "--set", "lora.rank=2,4", "--out", str(out))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(r"lora\.rank=2: done, skipped", again.stdout) and "lora.rank=4: resuming" in again.stdout
    assert RunDir(out / "points" / points[0]).read_metrics() == done_before
    assert [r["round"] for r in RunDir(out / "points" / points[1]).read_metrics()] == [0, 1, 2]

    # another grid into the same folder is refused before anything runs
    other = fedtune("sweep", str(config), "--set", "lora.rank=8", "--out", str(out))
    assert other.returncode == 2 and "sweep" in other.stderr and len(other.stderr.strip().splitlines()) == 1

    report_dir = campaigns.root / "report"
    rep = fedtune("report", str(out), "--out", str(report_dir))
    assert rep.returncode == 0, rep.stderr[-3000:]
    page = (report_dir / "report.html").read_text()
    pngs = {p.stem for p in report_dir.glob("*.png")}
    assert {"loss", "tasks", "participation", "bytes", "credit"} <= pngs and "epsilon" not in pngs  # no DP here
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(pngs)
    assert base64.b64decode(embedded[0]) == (report_dir / "loss.png").read_bytes()
    assert all(f"test-{p}" in page for p in points)  # both runs in one report, labelled
    assert "lora.rank" in page  # the config key in which they differ
    assert "per predicted token" in page  # the loss definition, quoted from metrics.jsonl
    assert Path(report_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_stops_a_sweep_and_its_running_point(campaigns: Campaigns) -> None:
    """``kill`` of the sweep alone (a scheduler's time limit): the running point's ``simulate`` used to train on,
    orphaned, into a run dir the next ``fedtune sweep`` would resume beside it. The sweep passes SIGTERM on to the
    point alone, so this also covers ``kill`` of a ``simulate``: Ray used to take SIGTERM over (a C++ stack dump,
    then a process hung on actors that were gone)."""
    import signal

    config = campaigns.write("sweep-kill", small_campaign(federation={"rounds": 4}))
    out = campaigns.root / "sweep-kill"
    metrics = out / "points" / "federation.local_steps=2" / "metrics.jsonl"
    log = campaigns.root / "sweep-kill.out"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune.cli", "sweep", str(config), "--set", "federation.local_steps=2,3"]
            + ["--out", str(out)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,  # the sweep and its point in one group, which the test can check is empty
        )
        try:
            wait_for_rounds(RunDir(metrics.parent), proc, 2)  # round 0 and round 1 recorded
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert group_gone(proc.pid, 15), "the point's simulate (or Ray) outlived the sweep"
    last = text.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "federation.local_steps=2" in last, last
    point_log = (out / "points" / "federation.local_steps=2.log").read_text()
    assert "interrupted: " in point_log  # the point's own clean stop: SIGTERM to simulate alone, as `kill PID` does
    assert "SIGTERM received" not in point_log and "Traceback" not in point_log, point_log[-3000:]  # Ray's handlers off
    assert len(RunDir(metrics.parent).read_metrics()) >= 2
