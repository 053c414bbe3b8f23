"""``fedtune coordinate``: run a campaign across contributors' machines on Flower's deployment engine.

The coordinator starts a Flower SuperLink (``flower-superlink``) with TLS and SuperNode authentication,
registers the contributors' approved public keys from ``RUN_DIR/contributors.allow``, submits the campaign
with ``flwr run`` as a bundle that holds only a ``pyproject.toml`` naming the installed fedtune apps, and
prints each round as the ServerApp appends it to ``RUN_DIR/metrics.jsonl``. Everything it creates lives in
the run dir, so starting it again with the same run dir resumes the campaign::

    RUN_DIR/tls/ca.pem           the CA certificate contributors pass as --root-cert
    RUN_DIR/contributors.allow   approved contributor keys, one OpenSSH ECDSA P-384 key per line (+ name)
    RUN_DIR/app/pyproject.toml   the app bundle submitted with `flwr run`
    RUN_DIR/flwr/                FLWR_HOME of the SuperLink and the flwr CLI (connection `fedtune`)
    RUN_DIR/superlink.db         the SuperLink's state (registered nodes survive a restart)
    RUN_DIR/superlink.log        the SuperLink's and the ServerApp's log
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from fedtune.console import campaign_round_line
from fedtune.deploy.bundle import COMPONENTS, write_shim
from fedtune.deploy.keys import ALLOW_HEADER, read_allow_list
from fedtune.deploy.processes import ProcessError, preexec, stop_process, stop_requested, venv_path, wait_for_port
from fedtune.deploy.tls import ensure_tls
from fedtune.files import atomic_write_text
from fedtune.rundir import RunDir

CONNECTION = "fedtune"
"""Name of the SuperLink connection in ``RUN_DIR/flwr/config.toml``."""

FINISHED = ("finished",)
APP_NAME = "fedtune-campaign"


class CoordinatorError(Exception):
    """Something that stops the coordinator, with a message for the person running it."""


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) into host and port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise CoordinatorError(f"--address must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


# ------------------------------------------------------------------------------------------ enrolment


# ------------------------------------------------------------------------------------------ the link


def app_pyproject(name: str = APP_NAME) -> str:
    """A bundle with no code: its components name the installed fedtune apps, so those run."""
    return f"""[project]
name = "{name}"
version = "1.0.0"
description = "fedtune campaign (runs the installed fedtune ServerApp and ClientApp)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "{COMPONENTS["serverapp"]}"
clientapp = "{COMPONENTS["clientapp"]}"

[tool.flwr.app.config]
campaign = ""
run-dir = ""
"""


def flwr_config(address: str, ca: Path | None) -> str:
    """``$FLWR_HOME/config.toml`` with the one connection the coordinator uses."""
    security = f'root-certificates = "{ca}"' if ca is not None else "insecure = true"
    return f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'


@dataclass
class Coordinator:
    """One coordinator session over a run dir (fresh or resumed)."""

    config_path: Path
    run_dir: Path
    address: str = "127.0.0.1:9092"
    bind: str | None = None
    insecure: bool = False
    out: TextIO = field(default=sys.stdout)
    proc: subprocess.Popen[bytes] | None = None
    run_id: int | None = None
    _registered: set[str] = field(default_factory=set)
    _allow_mtime: float = -1.0

    # paths
    @property
    def flwr_home(self) -> Path:
        return self.run_dir / "flwr"

    @property
    def allow_file(self) -> Path:
        return self.run_dir / "contributors.allow"

    @property
    def layout(self) -> RunDir:
        """The run dir as the ServerApp writes it (config.toml, metrics.jsonl, checkpoints)."""
        return RunDir(self.run_dir)

    def env(self) -> dict[str, str]:
        """Environment of the SuperLink and the flwr CLI: own FLWR_HOME, the serverapp guard first on PATH."""
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.flwr_home)
        env["PATH"] = os.pathsep.join([str(self.run_dir / "bin"), venv_path()])
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this coordinator's SuperLink."""
        exe = shutil.which("flwr", path=self.env()["PATH"]) or "flwr"
        return subprocess.run(
            [exe, *args], env=self.env(), capture_output=True, text=True, timeout=timeout_s, cwd=self.run_dir
        )

    def prepare(self) -> Path:
        """Resolve the campaign into the run dir (or pick up the one there), TLS, bundle and CLI config."""
        from fedtune.preflight import validate_campaign

        self.run_dir = self.run_dir.expanduser().resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = self.layout.config
        cfg = validate_campaign(str(self.config_path))
        cfg.campaign.run_dir = str(self.run_dir)
        if resolved.exists() and self.layout.metrics.exists():
            done = [row["round"] for row in self.layout.read_metrics()]
            print(f"resuming the campaign in {self.run_dir} (rounds recorded: {max(done, default=-1)})", file=self.out)
            if resolved.read_text(encoding="utf-8") != cfg.to_toml():
                print(f"warning: {self.config_path} changed since the run started; keeping {resolved}", file=sys.stderr)
        else:
            self.layout.create(cfg.to_toml())
        host, port = split_address(self.address)
        ca = None
        if not self.insecure:
            tls = ensure_tls(self.run_dir / "tls", [host])
            ca = tls.ca
            print(f"TLS CA certificate for contributors: {tls.ca}", file=self.out)
        if not self.allow_file.exists():
            atomic_write_text(self.allow_file, ALLOW_HEADER)
        dial = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.flwr_home / "config.toml", flwr_config(dial, ca))
        app = self.run_dir / "app"
        app.mkdir(exist_ok=True)
        atomic_write_text(app / "pyproject.toml", app_pyproject())
        write_shim(self.run_dir / "bin", "serverapp")
        return resolved

    def superlink_command(self) -> list[str]:
        host, port = split_address(self.address)
        bind = self.bind or (host if _is_loopback(host) else "0.0.0.0")
        exe = shutil.which("flower-superlink", path=self.env()["PATH"]) or "flower-superlink"
        cmd = [
            exe,
            "--host",
            bind,
            "--port",
            str(port),
            "--database",
            str(self.run_dir / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]
        if self.insecure:
            return [*cmd, "--insecure"]
        tls = self.run_dir / "tls"
        return [
            *cmd,
            "--ssl-ca-certfile",
            str(tls / "ca.pem"),
            "--ssl-certfile",
            str(tls / "server.pem"),
            "--ssl-keyfile",
            str(tls / "server.key"),
            "--enable-supernode-auth",
        ]

    def start_superlink(self, timeout_s: float = 90.0) -> None:
        log = (self.run_dir / "superlink.log").open("ab")
        self.proc = subprocess.Popen(
            self.superlink_command(),
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.run_dir,
            preexec_fn=preexec(),
        )
        log.close()
        host, port = split_address(self.address)
        wait_for_port("127.0.0.1" if not _is_loopback(host) else host, port, timeout_s, self.proc)

    def sync_allow_list(self, force: bool = False) -> None:
        """Register approved keys the SuperLink does not know yet (the allow-list is re-read when it changes)."""
        if self.insecure:
            return
        mtime = self.allow_file.stat().st_mtime if self.allow_file.exists() else 0.0
        if not force and mtime == self._allow_mtime:
            return
        self._allow_mtime = mtime
        keys_dir = self.run_dir / "flwr" / "keys"
        keys_dir.mkdir(parents=True, exist_ok=True)
        for entry in read_allow_list(self.allow_file):
            if entry.key in self._registered:
                continue
            pub = keys_dir / f"{entry.name}.pub"
            atomic_write_text(pub, entry.key + "\n")
            res = self.flwr("supernode", "register", str(pub), CONNECTION, "--name", entry.name)
            if res.returncode == 0 or "already in use" in (res.stdout + res.stderr):
                self._registered.add(entry.key)
                print(f"contributor approved: {entry.name}", file=self.out, flush=True)
            else:
                print(
                    f"warning: could not register {entry.name}: {(res.stdout + res.stderr).strip()[-300:]}",
                    file=sys.stderr,
                )

    def submit(self, resolved: Path) -> int:
        """``flwr run`` the bundle with this campaign and run dir; return the run id."""
        run_config = f'campaign="{resolved}" run-dir="{self.run_dir}"'
        res = self.flwr("run", str(self.run_dir / "app"), CONNECTION, "--run-config", run_config, "--format", "json")
        try:
            reply = json.loads(res.stdout)
        except json.JSONDecodeError:
            reply = {}
        if res.returncode != 0 or not reply.get("success", False):
            raise CoordinatorError(f"flwr run failed: {(res.stdout + res.stderr).strip()[-800:]}")
        self.run_id = int(reply["run-id"])
        return self.run_id

    def stop_stale_runs(self) -> list[int]:
        """Stop campaign runs a previous coordinator left unfinished in the SuperLink's database.

        A restarted coordinator always submits a fresh run, which resumes from the run dir's checkpoints;
        an old run left going would write to the same run dir.
        """
        res = self.flwr("ls", CONNECTION, "--format", "json", timeout_s=60.0)
        try:
            runs = json.loads(res.stdout).get("runs", [])
        except json.JSONDecodeError:
            return []
        stale = [
            int(r["run-id"])
            for r in runs
            if r.get("fab-id") == f"fedtune/{APP_NAME}" and not str(r.get("status", "")).startswith(FINISHED)
        ]
        for run_id in stale:
            self.flwr("stop", str(run_id), CONNECTION, timeout_s=60.0)
            print(f"stopped run {run_id} left over from a previous coordinator", file=self.out)
        return stale

    def run_status(self) -> str | None:
        """The run's status as the SuperLink reports it (``pending``, ``running``, ``finished:completed``…)."""
        if self.run_id is None:
            return None
        res = self.flwr("ls", CONNECTION, "--run-id", str(self.run_id), "--format", "json", timeout_s=60.0)
        with contextlib.suppress(json.JSONDecodeError, KeyError, IndexError, TypeError):
            return str(json.loads(res.stdout)["runs"][0]["status"])
        return None

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the SuperLink with SIGTERM: its database stays consistent and a restart carries on."""
        stop_process(self.proc, grace_s)


def coordinate(
    config_path: Path,
    run_dir: Path,
    address: str = "127.0.0.1:9092",
    insecure: bool = False,
    bind: str | None = None,
    out: TextIO = sys.stdout,
    status_every_s: float = 10.0,
) -> int:
    """Run a campaign to its end; 0 when every round is recorded, 1 when the run ended early, 130 on Ctrl-C."""
    co = Coordinator(Path(config_path), Path(run_dir), address, bind, insecure, out)
    with stop_requested() as stop:
        try:
            return _run(co, stop, status_every_s)
        except (CoordinatorError, ProcessError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            co.stop()


def _run(co: Coordinator, stop: threading.Event, status_every_s: float) -> int:
    from fedtune.config import load_config

    out, address = co.out, co.address
    resolved = co.prepare()
    rounds = load_config(resolved).federation.rounds
    print(f"run dir: {co.run_dir}", file=out)
    co.start_superlink()
    print(
        f"SuperLink listening on {address} ({'insecure' if co.insecure else 'TLS, SuperNode authentication'})", file=out
    )
    co.sync_allow_list(force=True)
    if not co.insecure:
        print(
            f"contributors join with: fedtune join --coordinator {address} --root-cert ca.pem "
            f"(copy {co.run_dir / 'tls' / 'ca.pem'})",
            file=out,
        )
    co.stop_stale_runs()
    run_id = co.submit(resolved)
    print(f"campaign submitted as Flower run {run_id}; waiting for contributors", file=out, flush=True)
    printed: set[int] = set()
    next_status = time.monotonic() + status_every_s
    status: str | None = None
    while not stop.is_set():
        for row in co.layout.read_metrics():
            if row["round"] not in printed:
                printed.add(row["round"])
                print(campaign_round_line(row), file=out, flush=True)
        if rounds in printed:
            break
        co.sync_allow_list()
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + status_every_s
            status = co.run_status()
            if status is not None and status.startswith(FINISHED):
                break
        stop.wait(1.0)
    if stop.is_set():
        print("stopping the SuperLink (restart with the same --run-dir to resume)", file=out)
        return 130
    deadline = time.monotonic() + 60
    while status is None or not status.startswith(FINISHED):  # let the ServerApp finish writing
        if time.monotonic() > deadline:
            break
        time.sleep(2)
        status = co.run_status()
    if rounds not in printed:
        print(
            f"error: run {run_id} ended ({status}) after round {max(printed, default=0)} of {rounds}; "
            f"see {co.run_dir / 'superlink.log'}",
            file=sys.stderr,
        )
        return 1
    print(f"campaign complete: adapter in {co.run_dir / 'adapter'}", file=out)
    return 0
