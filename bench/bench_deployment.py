"""Deployed rounds against simulated ones: ``fedtune coordinate`` + ``fedtune join`` on loopback vs ``simulate``.

One campaign (the quickstart model, ``--contributors`` contributors, each trains ``--steps`` local steps a round),
three runs side by side:

1. ``fedtune simulate`` (one Ray actor per contributor, one CPU each);
2. deployed, plain: ``fedtune coordinate`` (TLS, contributor keys) + ``--contributors`` × ``fedtune join --threads 1``
   on loopback, one contributor per core, each with its resident worker (:mod:`fedtune.clients.worker`);
3. deployed, SecAgg+: the same with ``[secure_aggregation] protocol = "secagg+"``.

``--before`` adds the deployed plain run with Flower's process per message (``join --no-resident-worker``), the
path fedtune had before the resident worker. Round figures are medians over rounds 2..N of ``metrics.jsonl``
(``wall_s``: the whole round at the coordinator, evaluation and checkpoint included; ``round_trip_s``: sending
the round to the last reply). Round 1 also waits for contributors to connect and builds their models: the cold start,
reported once per campaign, with each contributor's ``model_loads`` and its worker's model build time
(``STATE_DIR/worker.json``). Every wait is bounded (``--timeout``). Each deployed run also reports the CPU seconds
its processes used, by role (``cpu_s``: SuperLink, ServerApp, the ``coordinate`` process with its TLS front,
SuperNodes, workers, ``join`` agents; sampled from ``/proc`` every 0.5 s, so a process that lived less than that
may be missed): on a host where the protocol shares the cores with the trainers, that is where the time goes.

    python bench/bench_deployment.py [--contributors 2] [--rounds 4] [--steps 20] [--before] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lower_priority(pid: int, nice: int) -> None:
    """Process ``pid`` (0: this one) and its session's scheduling group at niceness ``nice``.

    With the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``) every session is a group,
    groups share the CPU equally whatever their processes' niceness, and a process's nice value only ranks it
    inside its own group: ``os.nice`` alone leaves each of the coordinator's sessions (``coordinate``, and the
    SuperLink and SuperExec it starts in sessions of their own) an equal share beside each contributor's. The
    group's own nice value (``/proc/PID/autogroup``) is what ranks it against the others.
    """
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    with contextlib.suppress(OSError):  # no autogroup: the process nice value is the whole story
        Path(f"/proc/{pid or 'self'}/autogroup").write_text(str(nice))


def campaign(root: Path, name: str, contributors: int, rounds: int, steps: int, secagg: bool) -> Path:
    raw = tomllib.loads((REPO / "experiments" / "quickstart.toml").read_text())
    raw["campaign"] = {"name": name, "seed": 0, "run_dir": str(root / name)}
    raw["data"]["source"] = str(REPO / "experiments" / raw["data"]["source"])
    raw["federation"].update(
        rounds=rounds, contributors_per_round=contributors, min_cohort=contributors, local_steps=steps
    )
    raw["simulation"] = {"contributors": contributors, "cpus_per_contributor": 1.0}
    if secagg:
        raw["secure_aggregation"] = {"protocol": "secagg+", "min_cohort": contributors}
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def env(flwr_home: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        FLWR_HOME=str(flwr_home),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")]),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return e


def rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and line.startswith("{")]


def summary(name: str, metrics: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    trained = [r for r in metrics if r["round"] >= 1]
    warm = [r for r in trained if r["round"] >= 2] or trained
    return {
        "run": name,
        "rounds": len(trained),
        "participants": [r.get("participants") for r in trained],
        "wall_s": statistics.median(r["wall_s"] for r in warm),
        "round_trip_s": statistics.median(r["round_trip_s"] for r in warm),
        "first_round_wall_s": trained[0]["wall_s"] if trained else None,
        "train_loss": [r.get("train_loss") for r in trained],
        **(extra or {}),
    }


def run_simulated(root: Path, config: Path, timeout_s: float) -> dict[str, Any]:
    run_dir = root / "sim-run"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", str(config), "--run-dir", str(run_dir)],
        env=env(root / "flwr-sim"),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=root,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"simulate failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return summary("simulated", rows(run_dir), {"campaign_s": time.perf_counter() - start})


ROLES = (
    ("fedtune.deploy.warden", "warden"),
    ("flower-superlink", "superlink"),
    ("flwr-serverapp", "serverapp"),
    ("flower-superexec", "superexec"),
    ("fedtune.clients.worker supernode", "supernode"),
    ("fedtune.clients.worker", "worker"),
    ("fedtune.cli coordinate", "coordinate"),
    ("fedtune.cli join", "join"),
)


class CpuSampler:
    """Cumulative CPU seconds of the bench's processes and all their descendants, by role."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.roots: set[int] = set()
        self.seen: dict[int, tuple[str, float, str]] = {}
        self.lowered: dict[int, int] = {}  # root pid -> niceness for it and every descendant (see lower_priority)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, interval_s: float) -> None:
        from fedtune.deploy.warden import descendants

        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.wait(interval_s):
            roots = set(self.roots)
            for pid in roots | descendants(*roots):
                with contextlib.suppress(OSError, IndexError):
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if not cmd and pid in self.seen:  # exited since the table was read: keep what it was
                        cmd = self.seen[pid][2]
                    role = next((r for key, r in ROLES if key in cmd), "other")
                    self.seen[pid] = (role, (int(fields[11]) + int(fields[12])) / tick, cmd[:160])
            for root, nice in list(self.lowered.items()):  # descendants that started sessions of their own
                for pid in {root} | descendants(root):
                    lower_priority(pid, nice)

    def by_role(self) -> dict[str, float]:
        total: Counter[str] = Counter()
        for role, cpu, _ in self.seen.values():
            total[role] += cpu
        return {role: round(cpu, 1) for role, cpu in sorted(total.items())}


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def run_deployed(
    root: Path,
    name: str,
    config: Path,
    contributors: int,
    timeout_s: float,
    *join_extra: str,
    coordinator_nice: int = 0,
) -> dict[str, Any]:
    from fedtune.deploy.home import approve, ensure_home
    from fedtune.deploy.keys import ensure_keys

    base = root / name
    base.mkdir()
    home, run_dir, port = base / "home", base / "run", free_port()
    data = tomllib.loads(config.read_text())["data"]["source"]  # each contributor's own --data: partition i of it
    ensure_home(home, ["127.0.0.1"])
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], log: Path, flwr_home: Path, nice: int = 0) -> subprocess.Popen[bytes]:
        with log.open("ab") as fh:
            p = subprocess.Popen(
                [sys.executable, "-m", "fedtune.cli", *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env(flwr_home),
                cwd=base,
                start_new_session=True,
                preexec_fn=functools.partial(lower_priority, 0, nice) if nice else None,
            )
        procs.append(p)
        if nice:
            sampler.lowered[p.pid] = nice
        sampler.roots.add(p.pid)
        return p

    states = []
    start = time.perf_counter()
    sampler = CpuSampler()
    sampler.start()
    try:
        for i in range(contributors):
            state = base / f"c{i}"
            approve(ensure_keys(state, f"c{i}").auth_public, home, f"c{i}")
            states.append(state)
            spawn(
                ["join", "--coordinator", f"127.0.0.1:{port}", "--root-cert", str(home / "tls" / "ca.pem"),
                 "--state-dir", str(state), "--name", f"c{i}", "--port", str(free_port()), "--data", data,
                 "--partition-id", str(i), "--num-partitions", str(contributors), "--benchmark-seconds", "0.2",
                 "--threads", "1", "--allow-no-dp", "--secagg-min-cohort", str(contributors), *join_extra],
                base / f"c{i}.log",
                state / "flwr-home",
            )  # fmt: skip
        coordinator = spawn(
            ["coordinate", str(config), "--run-dir", str(run_dir), "--address", f"127.0.0.1:{port}",
             "--home", str(home)],
            base / "coordinator.log",
            base / "flwr-coord",
            coordinator_nice,
        )  # fmt: skip
        try:
            rc = coordinator.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        campaign_s = time.perf_counter() - start
        if rc != 0:
            tail = (base / "coordinator.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name}: the coordinator exited with {rc}:\n{tail}")
    finally:
        for p in reversed(procs):
            stop_group(p)
        sampler.stop()
    workers = []
    for state in states:
        with contextlib.suppress(OSError, ValueError):
            workers.append(json.loads((state / "worker.json").read_text()))
    pids = set()
    loads = []
    for state in states:
        contributor_rows = [json.loads(x) for x in (state / "rounds.jsonl").read_text().splitlines() if x.strip()]
        pids |= {(state.name, r.get("pid")) for r in contributor_rows}
        loads.append(max((r.get("model_loads", 0) for r in contributor_rows), default=0))
    return summary(
        name,
        rows(run_dir),
        {
            "campaign_s": campaign_s,
            "processes_serving_rounds": len(pids),
            "model_loads_per_contributor": loads,
            "worker_model_build_s": [w.get("build_model_s") for w in workers],
            "worker_tasks": [w.get("tasks") for w in workers],
            "cpu_s": sampler.by_role(),
            "cpu_processes": sorted(([round(c, 1), cmd] for _, c, cmd in sampler.seen.values()), reverse=True),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contributors", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--before", action="store_true", help="also the process-per-message deployment")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds per campaign")
    parser.add_argument("--out")
    parser.add_argument("--secagg-only", action="store_true", help="only the deployed SecAgg+ run")
    parser.add_argument("--plain-only", action="store_true", help="only the simulated and deployed plain runs")
    parser.add_argument("--keep", help="work in this (new) folder and keep its logs and run dirs")
    parser.add_argument(
        "--coordinator-nice",
        type=int,
        default=0,
        help="run `coordinate` (SuperLink, SuperExec, ServerApp) at this niceness, process and scheduling group, "
        "in the deployed runs: the contributors' trainers get the cores first",
    )
    parser.add_argument(
        "--simulated-json", help="reuse the simulated figures of an earlier --out instead of simulating again"
    )
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if args.keep:
            root = Path(args.keep).resolve()
            root.mkdir(parents=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-deploy-")))
        n, r, s = args.contributors, args.rounds, args.steps
        plain = campaign(root, "bench-plain", n, r, s, secagg=False)
        secure = campaign(root, "bench-secagg", n, r, s, secagg=True)
        if args.simulated_json:
            results["simulated"] = json.loads(Path(args.simulated_json).read_text())["results"]["simulated"]
        else:
            results["simulated"] = run_simulated(root, plain, args.timeout)
        print(json.dumps(results["simulated"]), flush=True)
        nice = {"coordinator_nice": args.coordinator_nice}
        if args.secagg_only:
            results["deployed-secagg"] = run_deployed(root, "deployed-secagg", secure, n, args.timeout, **nice)
            print(json.dumps(results["deployed-secagg"]), flush=True)
            write_out(args, results)
            return
        results["deployed"] = run_deployed(root, "deployed", plain, n, args.timeout, **nice)
        print(json.dumps(results["deployed"]), flush=True)
        if not args.plain_only:
            results["deployed-secagg"] = run_deployed(root, "deployed-secagg", secure, n, args.timeout, **nice)
            print(json.dumps(results["deployed-secagg"]), flush=True)
        if args.before:
            results["deployed-before"] = run_deployed(
                root, "deployed-before", plain, n, args.timeout, "--no-resident-worker"
            )
            print(json.dumps(results["deployed-before"]), flush=True)
    sim, dep = results["simulated"], results["deployed"]
    ratios = {
        "deployed_over_simulated_wall": dep["wall_s"] / sim["wall_s"],
        "deployed_over_simulated_round_trip": dep["round_trip_s"] / sim["round_trip_s"],
    }
    if "deployed-secagg" in results:
        sec = results["deployed-secagg"]
        ratios["secagg_over_plain_wall"] = sec["wall_s"] / dep["wall_s"]
        ratios["secagg_over_plain_round_trip"] = sec["round_trip_s"] / dep["round_trip_s"]
    print(f"\n{n} contributors, {s} local steps, rounds 2..{r} (median); one torch thread each\n")
    if args.coordinator_nice:
        print(f"coordinator at nice {args.coordinator_nice}: deployed ÷ simulated is not like for like\n")
    print("| run | round wall s | round trip s | first round s | model loads / contributor |\n|---|---|---|---|---|")
    for key, res in results.items():
        loads = res.get("model_loads_per_contributor", "-")
        print(
            f"| {key} | {res['wall_s']:.2f} | {res['round_trip_s']:.2f} | {res['first_round_wall_s']:.2f} | {loads} |"
        )
    print()
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    for key, res in results.items():
        if "cpu_s" in res:
            print(f"{key} CPU s by role (whole campaign): {res['cpu_s']} = {sum(res['cpu_s'].values()):.1f}")
    if "deployed-before" in results:
        print(f"before_over_resident_wall: {results['deployed-before']['wall_s'] / dep['wall_s']:.3f}")
    write_out(args, results, ratios)


def write_out(
    args: argparse.Namespace, results: dict[str, dict[str, Any]], ratios: dict[str, float] | None = None
) -> None:
    """``--out``: every run's figures (and the ratios, when there are any) with the settings that change them."""
    if args.out:
        out = {"results": results, "coordinator_nice": args.coordinator_nice}
        Path(args.out).write_text(json.dumps(out if ratios is None else {**out, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
