"""The simulation's Ray cluster and the network: its token is set before Ray can read it, or nothing starts.

The adversary test (a caller without the token against a running simulation's GCS and raylet) is end to end:
``tests/e2e/test_interrupt_resume.py::test_ctrl_c_stops_the_run_and_resume_finishes_it``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

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


def run(before: str) -> subprocess.CompletedProcess[str]:
    code = SETUP.format(before=before)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_token_authentication_is_on_before_ray_is_imported() -> None:
    proc = run("")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["token", "64", "True"]


def test_ray_imported_first_refuses_to_start_an_open_cluster() -> None:
    """Ray reads its authentication mode at import: a cluster started after that would answer anyone."""
    proc = run("import ray")
    assert proc.returncode != 0
    assert "RuntimeError: ray was imported before fedtune set the simulation's token" in proc.stderr, proc.stderr
