"""End to end: Ctrl-C on a running ``fedtune simulate`` (sent to its process group, as a terminal does) and
``--resume`` to the end, with a network caller trying the simulation's Ray servers on the way; ``--resume`` of a
damaged run dir; a campaign whose every contributor fails. SIGTERM to ``simulate`` alone (``kill``, a batch
scheduler) is what a stopped ``fedtune sweep`` sends its running point: ``tests/e2e/test_research.py``."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from fedtune.rundir import RunDir

from ..conftest import small_campaign
from .conftest import Campaigns, group_gone, launch_env, telemetry_on, wait_for_rounds

FLOWER_NOISE = ("DEPRECATED FEATURE", "fraction_evaluate", "Traceback")

RAY_CALLER = r"""
import sys
import grpc
from ray._raylet import GcsClient
from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

gcs, raylets = sys.argv[1], sys.argv[2:]
try:
    nodes = GcsClient(address="127.0.0.1:" + gcs).get_all_node_info(timeout=10)
    print("gcs answered:", len(nodes), "nodes")
except Exception as exc:
    print("gcs refused:", type(exc).__name__)
for port in raylets:
    try:
        stub = node_manager_pb2_grpc.NodeManagerServiceStub(grpc.insecure_channel("127.0.0.1:" + port))
        stats = stub.GetNodeStats(node_manager_pb2.GetNodeStatsRequest(), timeout=10)
        print("raylet answered:", len(stats.core_workers_stats), "workers")
    except grpc.RpcError as exc:
        print("raylet refused:", exc.code().name)
"""


def call_ray_without_the_token(proc: subprocess.Popen[bytes]) -> None:
    """The network as adversary: a caller that reaches the simulation's Ray ports (they listen on every interface;
    here through loopback) without its token must get nothing, from the GCS (the cluster's control plane: nodes,
    jobs, the function table) nor from the raylet (workers, their stats, leases to run code)."""
    listening: dict[str, set[int]] = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            for conn in child.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.setdefault(child.name(), set()).add(conn.laddr.port)
        except psutil.Error:
            continue
    assert listening.get("gcs_server") and listening.get("raylet"), listening
    caller = subprocess.run(
        [sys.executable, "-c", RAY_CALLER, *map(str, [min(listening["gcs_server"]), *sorted(listening["raylet"])])],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
    )
    said = caller.stdout
    assert "answered" not in said, said + caller.stderr[-2000:]
    assert "gcs refused: AuthenticationError" in said, said + caller.stderr[-2000:]
    assert "raylet refused: UNAUTHENTICATED" in said, said + caller.stderr[-2000:]


def outsiders_get_nothing(proc: subprocess.Popen[bytes]) -> None:
    """Ray's servers refuse a caller without the token; no process of the run reports to Flower's telemetry."""
    call_ray_without_the_token(proc)
    assert not telemetry_on(proc.pid), telemetry_on(proc.pid)


def ctrl_c_after_round_1(
    campaigns: Campaigns, name: str, meanwhile: Callable[[subprocess.Popen[bytes]], None]
) -> tuple[RunDir, str]:
    """Start ``fedtune simulate``; once Ray is busy with round 2, run ``meanwhile`` and send SIGINT to its process
    group (a terminal's Ctrl-C); check it stops promptly with status 130 and nothing left running; return its last
    line."""
    config = campaigns.write(name, small_campaign(federation={"rounds": 4}))
    run = RunDir(campaigns.root / name)
    err_file = campaigns.root / f"{name}.err"
    with err_file.open("wb") as err, open(os.devnull, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune.cli", "simulate", str(config), "--run-dir", str(run.root)],
            stdout=out,
            stderr=err,
            env=launch_env(),
            start_new_session=True,  # its own process group, like a terminal's foreground job
        )
        try:
            wait_for_rounds(run, proc, 2)  # round 0 and round 1 recorded, Ray busy with round 2
            meanwhile(proc)
            sent = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=60)
            stopped_s = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert code == 128 + signal.SIGINT, err_file.read_text()[-3000:]
    assert stopped_s < 15, f"Ctrl-C took {stopped_s:.1f} s"
    assert group_gone(proc.pid, 10), "Ray processes outlived fedtune simulate after Ctrl-C"
    text = err_file.read_text()
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-3000:]  # Ray's handlers stayed off
    last = text.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "--resume" in last and str(run.root) in last, last
    return run, last


def test_ctrl_c_stops_the_run_and_resume_finishes_it(campaigns: Campaigns) -> None:
    """Also, while it runs, the outsiders' view (:func:`outsiders_get_nothing`)."""
    run, last = ctrl_c_after_round_1(campaigns, "interrupted", outsiders_get_nothing)
    completed = run.metrics.read_bytes().splitlines(keepends=True)
    assert len(completed) >= 2

    argv = shlex.split(last.split("carry on with: ", 1)[1])
    assert argv[:2] == ["fedtune", "simulate"] and "--resume" in argv
    campaigns.simulate("interrupted", None, *argv[3:], config=Path(argv[2]))
    rows = run.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert run.metrics.read_bytes().splitlines(keepends=True)[: len(completed)] == completed
    proc_out = campaigns.last
    assert proc_out is not None
    assert not any(noise in proc_out.stderr for noise in FLOWER_NOISE), proc_out.stderr[-3000:]
    assert "perplexity" in proc_out.stdout and "…" not in proc_out.stdout  # table not cut at 80 columns


def test_resume_of_a_damaged_run_dir(plain_run: Path, campaigns: Campaigns) -> None:
    """Half-written metrics line and a corrupt checkpoint of round 2: resume from round 1, keep rounds 0-1."""
    run = RunDir(campaigns.root / "damaged")
    shutil.copytree(plain_run, run.root)
    intact = run.metrics.read_bytes().splitlines(keepends=True)[:2]
    with run.metrics.open("ab") as fh:
        fh.write(b'{"round": 3, "eval_l')
    state = run.server_state(2)
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    campaigns.simulate("damaged", None, "--resume", config=run.config, run_dir=run.root)
    err = campaigns.last.stderr if campaigns.last else ""
    assert "resume: checkpoint of round 2 does not load: moved to" in err
    assert "resume: metrics.jsonl after round 1" in err
    assert [r["round"] for r in run.read_metrics()] == [0, 1, 2]
    assert run.metrics.read_bytes().splitlines(keepends=True)[:2] == intact
    assert len(list(run.root.glob("metrics.jsonl.damaged-*"))) == 1
    assert len(list((run.root / "checkpoints").glob("round-2.damaged-*"))) == 1
    assert run.load_server_state(2) is not None


def test_campaign_stops_when_every_contributor_fails_the_same_way(campaigns: Campaigns) -> None:
    """It used to print Ray tracebacks and exit 0 with "down 0.0%"."""
    injector = Path(__file__).with_name("failing_contributors")
    path = os.pathsep.join(p for p in (str(injector), os.environ.get("PYTHONPATH", "")) if p)
    run_dir = campaigns.simulate("hopeless", small_campaign(), env={"PYTHONPATH": path}, expect_rc=1)
    err = campaigns.last.stderr if campaigns.last else ""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    assert "round 1: every contributor (3) failed the same way" in errors[0] and "cannot reach ε=0.001" in errors[0]
    assert "--resume" in errors[0]
    assert "Traceback" not in err and "down 0.0%" not in campaigns.last.stdout
    assert not [line for line in err.splitlines() if line.lstrip().startswith('File "')], err[-3000:]
    assert [r["round"] for r in RunDir(run_dir).read_metrics()] == [0]  # the failed round is not recorded
