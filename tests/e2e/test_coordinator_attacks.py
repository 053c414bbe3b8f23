"""The coordinator on the network: an outsider holding only ``ca.pem`` tries every attack of issue 12.

A real ``fedtune coordinate`` (TLS, SuperNode authentication) runs a 2-round campaign with two contributors on
loopback, started through :class:`Federation`. The outsider has its own Flower CLI home whose only secret is a
copy of the public ``ca.pem``, and dials the public address, as anyone on the internet could:

- it polls ``/v1/runtime/acquire-task`` from before the coordinator starts (the ServerApp takeover);
- it lists runs and reads their logs, stops the campaign, registers its own node key and unregisters a
  contributor through the Control API;
- it submits a code-free bundle whose run config names its own campaign file (learning rate 5.0).

The attacks run while the coordinator's ServerApp is up and waiting for its (approved, registered) contributors;
then the contributors join. Every attack fails, and the real campaign completes with both contributors in every
round, the contributors having trained for nobody else. A local attacker on the coordinator host (who can
reach the SuperLink's loopback port) gets no further: ``acquire-task`` needs the SuperExec secret, and a run it
submits is refused by the ServerApp before any run dir is created. A last test stops ``coordinate`` with SIGINT
and kills it with SIGKILL and checks that no Flower process outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fedtune.deploy.home import ensure_home
from fedtune.deploy.keys import ensure_keys

from ..conftest import small_campaign
from .test_deployment import ROUND_TIMEOUT_S, Federation, deployed_campaign, free_port, stop_group, wait_for

ROUNDS = 2
EVIL = "evil-campaign"


@dataclass
class Outsider:
    """Someone on the network with the coordinator's public ``ca.pem`` and nothing else."""

    root: Path
    address: str
    acquired: list[str] = field(default_factory=list)
    acquire_statuses: list[str] = field(default_factory=list)
    stop_polling: threading.Event = field(default_factory=threading.Event)

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    def flwr(self, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
        """The stock Flower CLI against the coordinator's public address (connection ``evil``)."""
        env = {**os.environ, "FLWR_HOME": str(home or self.root / "flwr")}
        exe = str(Path(sys.executable).parent / "flwr")
        return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=120, cwd=self.root)

    def setup(self, ca: Path) -> None:
        (self.root / "flwr").mkdir(parents=True, exist_ok=True)
        shutil.copy(ca, self.ca)
        (self.root / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "evil"\n\n[superlink.evil]\naddress = "{self.address}"\n'
            f"root-certificates = {json.dumps(str(self.ca))}\n"
        )
        campaign = small_campaign(
            campaign={"name": EVIL, "seed": 1, "run_dir": str(self.root / "evil-run")},
            federation={"rounds": 1, "contributors_per_round": 2, "min_cohort": 1, "learning_rate": 5.0},
        )
        (self.root / "evil.toml").write_text(tomli_w.dumps(campaign))
        app = self.root / "app"
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text(
            '[project]\nname = "not-fedtune"\nversion = "1.0.0"\ndependencies = []\n\n[tool.flwr.app]\n'
            'publisher = "mallory"\n\n[tool.flwr.app.components]\nserverapp = "fedtune.server.app:app"\n'
            'clientapp = "fedtune.clients.app:app"\n\n[tool.flwr.app.config]\ncampaign = ""\nrun-dir = ""\n'
        )

    def evil_run_config(self) -> str:
        return f"campaign={json.dumps(str(self.root / 'evil.toml'))} run-dir={json.dumps(str(self.root / 'evil-run'))}"

    def poll_acquire_task(self, deadline_s: float) -> None:
        """What took the ServerApp task in 2 of 2 tries: Flower's own Runtime client, from before the start."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime.runtime_http_client import RuntimeHttpClient

        request = AcquireTaskRequest(supported_task_types=["flwr-serverapp"])
        deadline = time.monotonic() + deadline_s
        tries = 0
        while not self.stop_polling.is_set() and time.monotonic() < deadline and tries < 2000:
            tries += 1
            try:
                client = RuntimeHttpClient.from_server_address(
                    server_address=self.address,
                    insecure=False,
                    root_certificates=self.ca.read_bytes(),
                    interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
                )
                try:
                    reply = client.AcquireTask(request)
                    self.acquire_statuses.append("200")
                    if reply.HasField("task") and reply.token:
                        self.acquired.append(f"run {reply.task.run_id}")
                finally:
                    client.close()
            except Exception as exc:  # noqa: BLE001 - every failure mode is an answer the test records
                response = getattr(exc, "response", None)
                self.acquire_statuses.append(str(response.status_code) if response is not None else "no answer")
            self.stop_polling.wait(0.3)


@dataclass
class Attacked:
    fed: Federation
    outsider: Outsider
    poller: threading.Thread

    def coordinator_flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The coordinator host's own Flower CLI (its loopback connection ``fedtune``)."""
        return self.outsider.flwr(*args, home=self.fed.run_dir / "flwr")

    def run_id(self) -> int:
        def submitted() -> int | None:
            log = self.fed.coordinator_log.read_text() if self.fed.coordinator_log else ""
            marker = "campaign submitted as Flower run "
            return int(log.split(marker, 1)[1].split(";", 1)[0]) if marker in log else None

        return int(wait_for(submitted, 240, "the coordinator to submit its campaign"))

    def run_status(self, run_id: int) -> str:
        res = self.coordinator_flwr("ls", "fedtune", "--run-id", str(run_id), "--format", "json")
        return str(json.loads(res.stdout)["runs"][0]["status"])

    def nodes(self) -> list[dict[str, Any]]:
        res = self.coordinator_flwr("supernode", "ls", "fedtune", "--format", "json")
        return list(json.loads(res.stdout)["nodes"])


def _failed(res: subprocess.CompletedProcess[str]) -> bool:
    """A Flower CLI call that did not succeed (non-zero exit, or a JSON reply without success)."""
    if res.returncode != 0:
        return True
    try:
        return not json.loads(res.stdout).get("success", False)
    except (json.JSONDecodeError, AttributeError):
        return True


def _refused(res: subprocess.CompletedProcess[str]) -> bool:
    """Failed because the public port answered 404 (not because the coordinator was unreachable)."""
    return _failed(res) and "404 Not Found" in res.stdout + res.stderr


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attacked]:
    root = tmp_path_factory.mktemp("attacked")
    campaign = deployed_campaign(root, "attacked", ROUNDS, cohort=2, min_cohort=2, federation={"local_steps": 2})
    fed = Federation(root, free_port(), root / "run", campaign)
    ensure_home(fed.home, ["127.0.0.1"])
    outsider = Outsider(root / "outsider", fed.address)
    outsider.setup(fed.ca)
    fed.contributors = [fed.contributor(f"c{i}") for i in range(2)]  # approved; they join after the attacks
    poller = threading.Thread(target=outsider.poll_acquire_task, args=(ROUNDS * ROUND_TIMEOUT_S,), daemon=True)
    poller.start()
    try:
        fed.start_coordinator()
        yield Attacked(fed, outsider, poller)
    finally:
        outsider.stop_polling.set()
        poller.join(30)
        fed.close()


def test_outsider_cannot_take_the_serverapp_task(attacked: Attacked) -> None:
    """Polling ``acquire-task`` since before the coordinator started: never an answer, let alone the task."""
    outsider = attacked.outsider
    run_id = attacked.run_id()
    wait_for(
        lambda: outsider.acquired or attacked.run_status(run_id) == "running",
        240,
        "the coordinator's ServerApp to be running (or taken)",
        interval_s=2,
    )
    assert outsider.acquire_statuses, "the poller never ran"
    assert not outsider.acquired, f"the outsider took the ServerApp task of {outsider.acquired}"
    assert "200" not in outsider.acquire_statuses, sorted(set(outsider.acquire_statuses))
    assert set(outsider.acquire_statuses) <= {"404", "no answer"}, sorted(set(outsider.acquire_statuses))


def test_outsider_cannot_list_runs_or_read_logs(attacked: Attacked) -> None:
    run_id = attacked.run_id()
    listed = attacked.outsider.flwr("ls", "evil", "--format", "json")
    assert _refused(listed), listed.stdout
    assert str(run_id) not in listed.stdout + listed.stderr
    logs = attacked.outsider.flwr("log", str(run_id), "evil", "--show")
    assert _refused(logs), logs.stdout
    assert str(attacked.fed.run_dir) not in logs.stdout + logs.stderr
    assert "Starting Flower ServerApp" not in logs.stdout and "round" not in logs.stdout.lower()


def test_outsider_cannot_register_its_own_node(attacked: Attacked) -> None:
    wait_for(lambda: len(attacked.nodes()) >= 2, 120, "the two approved contributors to be registered")
    before = {n["node-id"] for n in attacked.nodes()}
    mallory = ensure_keys(attacked.outsider.root / "mallory", "mallory")
    registered = attacked.outsider.flwr("supernode", "register", str(mallory.auth_public), "evil", "--name", "mallory")
    assert _refused(registered), registered.stdout
    assert {n["node-id"] for n in attacked.nodes()} == before  # mallory's key is not enrolled


def test_outsider_cannot_unregister_a_contributor(attacked: Attacked) -> None:
    wait_for(lambda: len(attacked.nodes()) >= 2, 120, "the two approved contributors to be registered")
    before = {n["node-id"] for n in attacked.nodes()}
    victim = sorted(before)[0]
    kicked = attacked.outsider.flwr("supernode", "unregister", victim, "evil")
    assert _refused(kicked), kicked.stdout
    after = {n["node-id"]: n["status"] for n in attacked.nodes()}
    assert victim in after and after[victim] not in ("unregistered", "deleted"), after


def test_outsider_cannot_run_its_own_campaign(attacked: Attacked) -> None:
    """A code-free bundle (it passes every bundle guard) whose run config names the outsider's campaign file."""
    outsider = attacked.outsider
    attacked.run_id()  # the coordinator is up
    res = outsider.flwr(
        "run", str(outsider.root / "app"), "evil", "--run-config", outsider.evil_run_config(), "--format", "json"
    )
    assert _refused(res), res.stdout
    time.sleep(20)  # what the coordinator would need to pick the run up and create its run dir
    assert not (outsider.root / "evil-run").exists()


def test_local_attacker_without_the_coordinator_secrets_gets_nothing(attacked: Attacked) -> None:
    """Past the front (a local user of the coordinator host): no ServerApp task without the SuperExec secret, and
    a run it submits through the loopback Control API is refused by the ServerApp before it creates anything."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    fed, outsider = attacked.fed, attacked.outsider
    attacked.run_id()  # the coordinator is up and has submitted its own run
    config = (fed.run_dir / "flwr" / "config.toml").read_text()
    private = config.split('address = "', 1)[1].split('"', 1)[0]
    assert private.startswith("127.0.0.1:") and private != fed.address
    body = AcquireTaskRequest(supported_task_types=["flwr-serverapp"]).SerializeToString()
    with httpx.Client(verify=str(fed.ca), timeout=30) as client:
        reply = client.post(
            f"https://{private}/v1/runtime/acquire-task",
            content=body,
            headers={"content-type": "application/protobuf"},
        )
    assert reply.status_code == 401, reply.text
    submitted = attacked.coordinator_flwr(
        "run", str(outsider.root / "app"), "fedtune", "--run-config", outsider.evil_run_config(), "--format", "json"
    )
    assert not _failed(submitted), submitted.stdout + submitted.stderr  # Flower accepts it; fedtune must not
    evil_run = int(json.loads(submitted.stdout)["run-id"])

    def evil_status() -> str | None:
        res = attacked.coordinator_flwr("ls", "fedtune", "--run-id", str(evil_run), "--format", "json")
        status = str(json.loads(res.stdout)["runs"][0]["status"])
        return status if status.startswith("finished") else None

    status = wait_for(evil_status, 240, "the ServerApp to refuse the foreign run", interval_s=5)
    assert status != "finished:completed", status
    refusal = attacked.coordinator_flwr("log", str(evil_run), "fedtune", "--show")
    assert "did not submit" in refusal.stdout + refusal.stderr, refusal.stdout[-2000:]
    assert not (outsider.root / "evil-run").exists()


def test_outsider_cannot_stop_the_campaign(attacked: Attacked) -> None:
    run_id = attacked.run_id()
    stopped = attacked.outsider.flwr("stop", str(run_id), "evil")
    assert _refused(stopped), stopped.stdout
    status = attacked.coordinator_flwr("ls", "fedtune", "--run-id", str(run_id), "--format", "json")
    assert "stopped" not in json.loads(status.stdout)["runs"][0]["status"], status.stdout


def test_the_real_campaign_completes_unharmed(attacked: Attacked) -> None:
    """The contributors join once every attack was tried (the ServerApp has been waiting for them meanwhile)."""
    fed, outsider = attacked.fed, attacked.outsider
    for i, c in enumerate(fed.contributors):
        fed.join(c, i, 2, "--allow-no-dp")  # no DP in this campaign; the policy declines it otherwise
    row = wait_for(lambda: fed.row(ROUNDS), ROUNDS * ROUND_TIMEOUT_S, f"round {ROUNDS} in metrics.jsonl")
    assert row is not None
    outsider.stop_polling.set()
    attacked.poller.join(30)
    assert not outsider.acquired and "200" not in outsider.acquire_statuses  # polled until the end
    assert fed.coordinator is not None
    assert fed.coordinator.wait(180) == 0, fed.coordinator_log.read_text() if fed.coordinator_log else ""
    rows = fed.metrics()
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for r in rows[1:]:
        assert r["applied"] and r["participants"] == 2, r
    resolved = (fed.run_dir / "config.toml").read_text()
    assert 'name = "attacked"' in resolved and "learning_rate = 0.01" in resolved
    for c in fed.contributors:  # each trained exactly the real campaign's rounds, for nobody else
        trained = [json.loads(line)["round"] for line in (c.state_dir / "rounds.jsonl").read_text().splitlines()]
        assert sorted(trained) == list(range(1, ROUNDS + 1)), (c.name, trained)
    log = fed.coordinator_log.read_text() if fed.coordinator_log else ""
    assert "the public port refused" in log and "campaign complete" in log


# ------------------------------------------------------------------------------------------- orphans


def _processes_mentioning(text: str) -> dict[int, str]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found[int(entry.name)] = cmdline[:160]
    return found


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_no_flower_process_outlives_coordinate(tmp_path: Path, how: signal.Signals) -> None:
    campaign = tmp_path / "campaign.toml"
    campaign.write_text(tomli_w.dumps(small_campaign(campaign={"name": "orphans", "run_dir": str(tmp_path / "run")})))
    fed = Federation(tmp_path, free_port(), tmp_path / "run", campaign)
    run_dir = str(fed.run_dir)
    try:
        fed.start_coordinator()
        assert fed.coordinator is not None
        wait_for(
            lambda: any("flwr-serverapp" in c for c in _processes_mentioning(run_dir).values()),
            240,
            "the coordinator's ServerApp process",
        )
        running = _processes_mentioning(run_dir)
        assert any("flower-superlink" in c for c in running.values()), running
        os.kill(fed.coordinator.pid, how)  # the coordinator alone, not its process group
        status = fed.coordinator.wait(120)
        if how == signal.SIGINT:
            assert status == 130, fed.coordinator_log.read_text() if fed.coordinator_log else ""
            left = _processes_mentioning(run_dir)  # coordinate returns only once they are gone
            assert not left, left
        else:
            deadline = time.monotonic() + 8.0
            while _processes_mentioning(run_dir) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = _processes_mentioning(run_dir)
            assert not left, left
    finally:
        for pid in _processes_mentioning(run_dir):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for proc in fed.procs:
            stop_group(proc)
