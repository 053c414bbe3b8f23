"""End-to-end tier: whole campaigns, run the way a user runs them (``python -m fedtune.cli simulate``).

:class:`Campaigns` is the one way these tests start a simulated campaign; ``plain_run`` is the session's shared
2-round, 3-contributor plain FedAvg campaign that several files read (run once per session). Every simulated
campaign here sets the local-only reproducibility switch (``FEDTUNE_SIMULATION_SEED``), so that a secure and a
plain run of the same campaign draw the same batches and can be compared round for round.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import tomli_w

from fedtune import TELEMETRY_ENV
from fedtune.clients.policy import SIMULATION_SEED_ENV
from fedtune.rundir import RunDir

from ..conftest import small_campaign


def launch_env() -> dict[str, str]:
    """This process's environment for a fedtune command, less what fedtune must decide for itself (under test):
    Flower's telemetry switch, which this process got from importing fedtune."""
    return {k: v for k, v in os.environ.items() if k != TELEMETRY_ENV}


def telemetry_on(pid: int) -> list[str]:
    """The processes ``pid`` started (all descendants) that run with Flower's telemetry on (the variable not "0").

    ``pid`` itself is left out: ``/proc`` shows a process's environment as it started, not what the process set
    (fedtune sets the variable when its package is imported, before any of its modules can import Flower; a unit
    test checks that order).
    """
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    on = []
    for proc in procs:
        try:
            env = proc.environ()
            if "PATH" in env and env.get(TELEMETRY_ENV) != "0":  # no PATH: a process title written over it (Ray's)
                on.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.Error:  # gone meanwhile
            continue
    return on


@dataclass
class Campaigns:
    """Runs ``fedtune simulate`` on campaign dicts in a session-wide temporary folder."""

    root: Path
    last: subprocess.CompletedProcess[str] | None = None  # the latest run, for tests that read its output

    def write(self, name: str, raw: Mapping) -> Path:
        config = self.root / f"{name}.toml"
        config.write_text(tomli_w.dumps(dict(raw)))
        return config

    def simulate(
        self,
        name: str,
        raw: Mapping | None = None,
        *extra: str,
        config: Path | None = None,
        run_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        expect_rc: int = 0,
        timeout_s: float = 600,
    ) -> Path:
        """Run a campaign (``raw`` written as ``NAME.toml``, or an existing ``config``) into ``run_dir``."""
        config = config or self.write(name, raw if raw is not None else small_campaign())
        run_dir = run_dir or self.root / name
        proc = subprocess.run(
            [sys.executable, "-m", "fedtune.cli", "simulate", str(config), "--run-dir", str(run_dir), *extra],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**launch_env(), SIMULATION_SEED_ENV: "0", **(env or {})},
        )
        self.last = proc
        assert proc.returncode == expect_rc, proc.stdout[-2000:] + proc.stderr[-4000:]
        return run_dir


@pytest.fixture(scope="session")
def campaigns(tmp_path_factory: pytest.TempPathFactory) -> Campaigns:
    return Campaigns(tmp_path_factory.mktemp("campaigns"))


@pytest.fixture(scope="session")
def plain_run(campaigns: Campaigns) -> Path:
    """The reference campaign: ``small_campaign()`` as it is, plain FedAvg, 2 rounds, 3 contributors."""
    return campaigns.simulate("plain")


def wait_for_rounds(run_dir: RunDir, proc: subprocess.Popen[bytes], rounds: int, timeout_s: float = 600) -> None:
    """Until ``run_dir`` has ``rounds`` metrics lines, while ``proc`` (simulate or a sweep) keeps running."""
    deadline = time.monotonic() + timeout_s
    while len(run_dir.read_metrics()) < rounds:
        assert proc.poll() is None, f"simulate ended early with {proc.returncode}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.5)


def group_gone(pgid: int, timeout_s: float) -> bool:
    """Whether process group ``pgid`` empties within ``timeout_s`` (Ray's processes included)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
