"""The coordinator asks its own SuperLink in-process (``fedtune.deploy.control``), against a real one.

A real coordinator (TLS SuperLink, SuperExec, guarded ServerApp) is started on loopback: a submitted run reads
as the ``flwr`` CLI prints it, ``stop_stale_runs`` stops it, and a client that does not hold the coordinator's CA
(an impostor on the SuperLink's port looks the same from here) or a closed port gets ``None``, not an answer.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from fedtune.deploy.control import ControlClient
from fedtune.deploy.home import ensure_home

from ..conftest import small_campaign

pytestmark = pytest.mark.slow


def _closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_status_and_stale_runs_through_the_control_api(tmp_path: Path) -> None:
    import tomli_w

    from fedtune.server.coordinator import CONNECTION, FINISHED, Coordinator

    config = tmp_path / "campaign.toml"
    config.write_text(tomli_w.dumps(small_campaign(campaign={"name": "c", "seed": 0, "run_dir": str(tmp_path)})))
    co = Coordinator(config, tmp_path / "run", f"127.0.0.1:{_closed_loopback_port()}", home_dir=tmp_path / "home")
    resolved = co.prepare(co.validate())
    co.start()
    try:
        assert co.control is not None and co.control.runs() == [] and co.stop_stale_runs() == []
        run_id = co.submit(resolved)
        status = co.run_status()
        assert status in {"pending", "starting", "running"}, status
        cli = co.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout_s=60.0)
        cli_status = json.loads(cli.stdout)["runs"][0]["status"]
        assert cli_status in {"pending", "starting", "running"}, cli_status  # the CLI's reading of the same run

        other_ca = ensure_home(tmp_path / "other-home", ["127.0.0.1"]).tls.ca
        outsider = ControlClient(f"127.0.0.1:{co.private_port}", other_ca)
        assert outsider.runs() is None and outsider.status(run_id) is None and not outsider.stop(run_id)
        outsider.close()
        assert co.run_status() in {"pending", "starting", "running"}  # the outsider stopped nothing

        assert co.stop_stale_runs() == [run_id]  # what a restarted coordinator does with a run left going
        deadline = time.monotonic() + 60
        while not (status := co.run_status() or "").startswith(FINISHED) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert status.startswith(FINISHED), status
        assert co.stop_stale_runs() == []
    finally:
        co.stop()
    assert co.control is None


def test_an_unreachable_superlink_answers_none() -> None:
    client = ControlClient(f"127.0.0.1:{_closed_loopback_port()}", None)
    try:
        assert client.runs() is None and client.status(1) is None and not client.stop(1)
    finally:
        client.close()
