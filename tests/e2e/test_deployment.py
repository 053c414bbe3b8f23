"""The deployment path: `fedtune coordinate` and `fedtune join` on Flower's deployment engine, on loopback.

The integration test runs a coordinator and three contributors as separate processes with TLS and
SuperNode authentication, kills one contributor in the middle of round 2 and checks that the round
completes with the two survivors. Sibling tests check that an unenrolled contributor is refused and that
a contributor refuses an app bundle whose code differs from the installed fedtune. The module-scoped
:class:`Federation` keeps the processes and helpers, so coordinator restart/resume, DP, secure
aggregation and credit checks can be added as further tests on the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w

from fedtune.deploy.home import approve, ensure_home
from fedtune.deploy.keys import ensure_keys

from ..bundles import pyproject_text
from ..conftest import DATA, small_campaign
from .conftest import launch_env, telemetry_on

ROUND_TIMEOUT_S = 240.0
KILL_VICTIM = 2


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to port 0 and let the kernel choose)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace_s: float = 15.0) -> int | None:
    """Signal a process started in its own session, wait, then SIGKILL its whole group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return proc.returncode


def clientapps_in_group(pgid: int) -> list[int]:
    """Pids of the live ``flwr-clientapp`` processes in process group ``pgid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if b"flwr-clientapp" in cmdline and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def worker_stats(c: Contributor) -> dict[str, Any]:
    """The contributor's resident worker's ``worker.json`` (:mod:`fedtune.clients.worker`), or ``{}``."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((c.state_dir / "worker.json").read_text())
    return {}


def contributor_rounds(c: Contributor) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (c.state_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]


def assert_one_resident_process(c: Contributor, stages: tuple[str, ...] = ("train",), rounds: int = 2) -> None:
    """Every round of ``c`` was served by one process that built the model once, and so was every stage."""
    rows = [r for r in contributor_rounds(c) if not r.get("declined")]
    stats = worker_stats(c)
    assert len(rows) >= rounds and {r["pid"] for r in rows} == {stats["pid"]}, (rows, stats)
    assert {r["model_loads"] for r in rows} == {1} and stats["model_loads"] == 1, (rows, stats)
    for stage in stages:
        assert stats["by_type"].get(stage, 0) >= rounds, (stage, stats)
    assert stats["refused_bundles"] == 0


def _env(flwr_home: Path) -> dict[str, str]:
    env = launch_env()
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Contributor:
    name: str
    state_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Federation:
    """A coordinator and its contributors, each a process in its own session (killed in teardown)."""

    root: Path
    port: int
    run_dir: Path
    campaign: Path
    coordinator: subprocess.Popen[bytes] | None = None
    coordinator_log: Path | None = None
    contributors: list[Contributor] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def home(self) -> Path:
        """The coordinator home (CA, approved contributors), shared by every campaign of this coordinator."""
        return self.root / "coordinator-home"

    @property
    def ca(self) -> Path:
        return self.home / "tls" / "ca.pem"

    def spawn(self, args: list[str], log: Path, flwr_home: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedtune.cli", *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=_env(flwr_home),
                cwd=self.root,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start_coordinator(self) -> None:
        self.coordinator_log = self.root / "coordinator.log"
        self.coordinator = self.spawn(
            [
                "coordinate",
                str(self.campaign),
                "--run-dir",
                str(self.run_dir),
                "--address",
                self.address,
                "--home",
                str(self.home),
            ],
            self.coordinator_log,
            self.root / "flwr-coord",
        )

    def contributor(self, name: str, enrol: bool = True) -> Contributor:
        """A contributor's state dir with keys; ``enrol`` adds its key to the coordinator's allow-list."""
        state = self.root / name
        keys = ensure_keys(state, name)
        if enrol:
            approve(keys.auth_public, self.home, name)
        return Contributor(name, state, self.root / f"{name}.log")

    def join(self, c: Contributor, partition: int, partitions: int, *extra: str) -> Contributor:
        c.proc = self.spawn(
            [
                "join",
                "--coordinator",
                self.address,
                "--root-cert",
                str(self.ca),
                "--state-dir",
                str(c.state_dir),
                "--name",
                c.name,
                "--port",
                str(free_port()),
                "--data",  # its own data: a deployed contributor never reads a local path the coordinator names
                str(DATA),
                "--partition-id",
                str(partition),
                "--num-partitions",
                str(partitions),
                "--benchmark-seconds",
                "0.2",
                "--connect-timeout",  # the coordinator may take minutes to listen on a busy test machine
                "900",
                *extra,
            ],
            c.log,
            c.state_dir / "flwr-home",
        )
        return c

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def row(self, server_round: int) -> dict[str, Any] | None:
        return next((r for r in self.metrics() if r["round"] == server_round), None)

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc)


def deployed_campaign(root: Path, name: str, rounds: int, cohort: int, min_cohort: int, **sections: dict) -> Path:
    """``ROOT/campaign.toml``: a small campaign named ``name`` whose run dir is ``ROOT/run``."""
    campaign = root / "campaign.toml"
    federation = {
        "rounds": rounds,
        "contributors_per_round": cohort,
        "min_cohort": min_cohort,
        "local_steps": 3,
        "round_timeout_s": ROUND_TIMEOUT_S,
    }
    raw = small_campaign(
        campaign={"name": name, "seed": 0, "run_dir": str(root / "run")},
        federation={**federation, **sections.pop("federation", {})},
        **sections,
    )
    campaign.write_text(tomli_w.dumps(raw))
    return campaign


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """Coordinator + three enrolled contributors running a 2-round campaign (min_cohort 2)."""
    root = tmp_path_factory.mktemp("deploy")
    campaign = deployed_campaign(root, "deploy-test", rounds=2, cohort=3, min_cohort=2)
    fed = Federation(root, free_port(), root / "run", campaign)
    ensure_home(fed.home, ["127.0.0.1"])  # the coordinator reuses it; contributors need the CA now
    contributors = [fed.contributor(f"c{i}") for i in range(3)]
    try:
        fed.start_coordinator()
        fed.contributors = [fed.join(c, i, 3, "--allow-no-dp") for i, c in enumerate(contributors)]  # no DP here
        yield fed
    finally:
        fed.close()


def test_unenrolled_contributor_is_refused(federation: Federation) -> None:
    """Runs first, while the coordinator's SuperLink is up: a key nobody approved is turned away."""
    stranger = federation.contributor("stranger", enrol=False)
    federation.join(stranger, 0, 3, "--enrol-wait", "0")
    assert stranger.proc is not None
    assert stranger.proc.wait(300) == 3, stranger.output()  # the coordinator may take minutes to listen
    assert "refused this contributor's key" in stranger.output()
    assert "fedtune approve" in stranger.output()


def test_campaign_runs_across_contributors_and_survives_a_killed_one(federation: Federation) -> None:
    fed = federation
    victim = fed.contributors[KILL_VICTIM]
    wait_for(lambda: fed.row(1), 300, "round 1 in metrics.jsonl")
    round1 = fed.row(1)
    assert round1 is not None and round1["participants"] == 3 and round1["applied"]
    assert victim.proc is not None and fed.coordinator is not None
    for proc in (fed.coordinator, *(c.proc for c in fed.contributors)):  # SuperLink, SuperNodes, workers, ServerApp
        assert proc is not None
        assert not telemetry_on(proc.pid), telemetry_on(proc.pid)  # nothing reports to telemetry.flower.ai
    for c in fed.contributors:  # a relative path a campaign names resolves in the state dir, not the user's folder
        assert c.proc is not None
        assert {p.cwd() for p in psutil.Process(c.proc.pid).children(recursive=True)} == {str(c.state_dir)}
    # the resident worker says which task it is serving: after round 1, any task in progress is round 2's
    wait_for(lambda: worker_stats(victim).get("serving"), 120, "the victim's round-2 task", interval_s=0.05)
    assert not clientapps_in_group(victim.proc.pid)  # no flwr-clientapp process per message
    os.killpg(victim.proc.pid, signal.SIGKILL)  # the join agent, its SuperNode and the worker mid-training
    row2 = wait_for(lambda: fed.row(2), ROUND_TIMEOUT_S + 60, "round 2 in metrics.jsonl")
    assert row2["applied"] and row2["participants"] == 2 and row2["failed"] == 1, row2
    assert fed.coordinator is not None
    assert fed.coordinator.wait(120) == 0, fed.coordinator_log.read_text() if fed.coordinator_log else ""
    out = fed.coordinator_log.read_text() if fed.coordinator_log else ""
    assert "round 1:" in out and "round 2:" in out and "campaign complete" in out
    assert (fed.run_dir / "adapter").is_dir()
    survivors = [c for c in fed.contributors if c is not victim]
    for c in survivors:
        rows = contributor_rounds(c)
        assert {r["round"] for r in rows} >= {1, 2}
        assert "round 2:" in c.output()
        assert_one_resident_process(c)  # the model was built once per contributor process, not once a round
    for c in survivors:  # Ctrl-C stops a contributor cleanly, worker included
        assert c.proc is not None
        worker_pid = worker_stats(c)["pid"]
        os.kill(c.proc.pid, signal.SIGINT)
        assert c.proc.wait(60) == 130, c.output()
        assert "stopping the SuperNode" in c.output() and "interrupted: the SuperNode is stopped" in c.output()
        assert not Path(f"/proc/{worker_pid}").exists(), "the resident worker outlived its join agent"


def test_private_secure_campaign_survives_a_coordinator_restart(tmp_path: Path) -> None:
    """DP-SGD and SecAgg+ across three contributor processes; the coordinator is SIGKILLed after round 1 and
    started again on the same run dir: round 2 completes and no round is credited twice."""
    from fedtune.credit.ledger import Ledger, default_url

    campaign = deployed_campaign(
        tmp_path,
        "deploy-secure",
        rounds=2,
        cohort=3,
        min_cohort=3,
        # room for one round more than planned: training done for a round the crash cut short stays spent
        privacy={"mechanism": "dp-sgd", "target_epsilon": 8.0, "planned_rounds": 4},
        secure_aggregation={"protocol": "secagg+", "min_cohort": 2, "stage_timeout_s": 120.0},
    )
    fed = Federation(tmp_path, free_port(), tmp_path / "run", campaign)
    ensure_home(fed.home, ["127.0.0.1"])
    try:
        fed.contributors = [fed.join(fed.contributor(f"s{i}"), i, 3) for i in range(3)]
        fed.start_coordinator()
        wait_for(lambda: fed.row(1), 2 * ROUND_TIMEOUT_S, "round 1 in metrics.jsonl")
        assert fed.coordinator is not None
        os.killpg(fed.coordinator.pid, signal.SIGKILL)  # coordinator, SuperLink and ServerApp, no goodbye
        fed.coordinator.wait(30)
        assert fed.row(2) is None
        fed.start_coordinator()
        row2 = wait_for(lambda: fed.row(2), 2 * ROUND_TIMEOUT_S, "round 2 after the restart")
        assert fed.coordinator.wait(120) == 0, fed.coordinator_log.read_text() if fed.coordinator_log else ""
        assert "resuming" in (fed.coordinator_log.read_text() if fed.coordinator_log else "")
    finally:
        fed.close()
    rows = fed.metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["applied"] and r["secure_aggregation"] and r["participants"] == 3, r
        assert 0 < r["epsilon_max"] <= 8.0
    assert row2["epsilon_max"] > rows[1]["epsilon_max"]
    with Ledger.open(default_url(fed.run_dir)) as ledger:
        board = ledger.leaderboard("deploy-secure")
        assert sorted(r.name for r in board) == ["s0", "s1", "s2"]
        assert all(r.rounds == 2 for r in board), board  # round 1 not credited again after the restart
        assert len({e.credit for e in ledger.round_entries("deploy-secure", 2)}) == 1
    for c in fed.contributors:
        privacy = json.loads((c.state_dir / "privacy.json").read_text())
        assert privacy["rounds"] in (2, 3) and privacy["epsilon_spent"] <= 8.0  # 3: trained in the cut round
    from fedtune.secagg import STAGES
    from fedtune.wire import secagg_message_type

    stages = tuple(secagg_message_type(stage) for stage in STAGES)
    for c in fed.contributors:  # every SecAgg+ stage of every round served by the one process that built the model
        assert_one_resident_process(c, stages=stages, rounds=2)
        trained = [r for r in contributor_rounds(c) if not r.get("declined")]  # trained in the background, while
        assert all(r["thread"].startswith("secagg-train-") for r in trained), trained  # it answered view, share_keys


# ------------------------------------------------------------------------------ foreign app bundles

PROBE_SERVER = """
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.time() + 120
    while not (nodes := list(grid.get_node_ids())) and time.time() < deadline:
        time.sleep(1)
    msgs = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    out = [{"error": r.error.reason if r.has_error() else None} for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps(out))
"""

EVIL_CLIENT = """
from pathlib import Path
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    Path(MARKER).write_text("foreign code ran")
    return Message(RecordDict({"m": MetricRecord({"x": 1})}), reply_to=message)
"""


@pytest.mark.parametrize("runner", ["resident-worker", "shim"])
def test_contributor_refuses_a_bundle_with_foreign_code(tmp_path: Path, runner: str) -> None:
    """A SuperLink (plain Flower, no fedtune guard) sends a bundle that shadows fedtune.clients.app: refused by the
    resident worker (the default) and by the guarded ``flwr-clientapp`` of ``--no-resident-worker``."""
    port = free_port()
    link_home, marker, out = tmp_path / "flwr-link", tmp_path / "foreign-code-ran", tmp_path / "replies.json"
    env = _env(link_home)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (tmp_path / "superlink.log").open("ab") as fh:
            procs.append(
                subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "flower-superlink"),
                        "--insecure",
                        "--port",
                        str(port),
                        "--disable-runtime-dependency-installation",
                    ],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=tmp_path,
                    start_new_session=True,
                )
            )
        wait_for(lambda: _listening(port), 60, "the SuperLink")
        state = tmp_path / "contributor"
        with (tmp_path / "join.log").open("ab") as fh:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fedtune.cli",
                        "join",
                        "--coordinator",
                        f"127.0.0.1:{port}",
                        "--insecure",
                        "--state-dir",
                        str(state),
                        "--port",
                        str(free_port()),
                        "--benchmark-seconds",
                        "0.1",
                        *(["--no-resident-worker"] if runner == "shim" else []),
                    ],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=_env(tmp_path / "flwr-join"),
                    cwd=tmp_path,
                    start_new_session=True,
                )
            )
        app = tmp_path / "app"
        (app / "fedtune" / "clients").mkdir(parents=True)
        (app / "pyproject.toml").write_text(pyproject_text("probe_server:app"))
        (app / "probe_server.py").write_text(PROBE_SERVER)
        (app / "fedtune" / "clients" / "__init__.py").write_text("")
        (app / "fedtune" / "clients" / "app.py").write_text(f"MARKER = {str(marker)!r}\n" + EVIL_CLIENT)
        link_home.mkdir(exist_ok=True)
        (link_home / "config.toml").write_text(
            f'[superlink]\ndefault = "t"\n\n[superlink.t]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        res = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "run", str(app), "t", "--run-config", f'out="{out}"'],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        join = procs[1]

        def replies_or_dead_join() -> Any:
            assert join.poll() is None, (tmp_path / "join.log").read_text()
            return out.exists() and json.loads(out.read_text())

        replies = wait_for(replies_or_dead_join, 240, "the probe's replies")
        assert len(replies) == 1
        assert replies[0]["error"] and "differs from the installed fedtune" in replies[0]["error"], replies
        assert not marker.exists()
        stats = json.loads((state / "worker.json").read_text()) if runner == "resident-worker" else {}
        assert stats.get("refused_bundles", 1) == 1 and not stats.get("by_type"), stats
    finally:
        for proc in reversed(procs):
            stop_group(proc)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
