"""What fedtune's processes expose or report beyond the machine: the simulation's Ray cluster takes a token set
before Ray can read it (or nothing starts), and Flower's telemetry is off before Flower can read that.

The adversary tests against running campaigns are end to end: a caller without the token against a simulation's
GCS and raylet, and the environment of every process a simulation, ``coordinate`` or ``join`` starts
(``tests/e2e/test_interrupt_resume.py``, ``tests/e2e/test_deployment.py``).
"""

from __future__ import annotations

import subprocess

import pytest

from ..conftest import run_python

pytestmark = pytest.mark.slow  # each starts a Python that imports fedtune and Ray (≈ 8 s)

SETUP = """
import os
for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
    os.environ.pop(name, None)
{before}
from fedtune.server.simulation import private_ray_cluster
private_ray_cluster()
token = os.environ["RAY_AUTH_TOKEN"]
private_ray_cluster()  # a second call (simulate() after the CLI) keeps the token
assert os.environ["RAY_AUTH_TOKEN"] == token
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
print(os.environ["RAY_AUTH_MODE"], len(token), get_authentication_mode() == AuthenticationMode.TOKEN)
"""


def python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(code, *args, timeout_s=120)


def run(before: str) -> subprocess.CompletedProcess[str]:
    return python(SETUP.format(before=before))


def test_token_authentication_is_on_before_ray_is_imported() -> None:
    proc = run("")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["token", "64", "True"]


def test_ray_imported_first_refuses_to_start_an_open_cluster() -> None:
    """Ray reads its authentication mode at import: a cluster started after that would answer anyone."""
    proc = run("import ray")
    assert proc.returncode != 0
    assert "RuntimeError: ray was imported before fedtune set the simulation's token" in proc.stderr, proc.stderr


TELEMETRY = """
import os, sys
os.environ.pop("FLWR_TELEMETRY_ENABLED", None)
os.environ.update(dict(a.split("=", 1) for a in sys.argv[1:]))
import {first}
import flwr.supercore.telemetry as telemetry
print(telemetry.FLWR_TELEMETRY_ENABLED)
"""


def telemetry_flag(first: str, *env: str) -> str:
    proc = python(TELEMETRY.format(first=first), *env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_flower_telemetry_is_off_in_every_fedtune_entry_point() -> None:
    """The CLI and the contributor's worker/SuperNode entry (``python -m fedtune.clients.worker supernode``) import
    the fedtune package first, which turns it off before Flower's telemetry module reads it; a user who sets the
    variable keeps their choice."""
    assert telemetry_flag("flwr") == "1"  # Flower's default, what fedtune must change
    assert telemetry_flag("fedtune.cli") == "0"
    assert telemetry_flag("fedtune.clients.worker") == "0"
    assert telemetry_flag("fedtune.cli", "FLWR_TELEMETRY_ENABLED=1") == "1"
