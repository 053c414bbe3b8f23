"""``fedtune coordinate``: run a campaign across contributors' machines on Flower's deployment engine.

What runs, and who can reach it::

    public ADDRESS (TLS)  -> the Fleet front (a thread of this process, :mod:`fedtune.deploy.front`): passes the
                             Fleet API's 12 routes, answers 404 to everything else
    127.0.0.1:PORT (TLS)  -> flower-superlink --isolation process: Fleet, Control and Runtime APIs, loopback only
                             flower-superexec: acquires the ServerApp task with the SuperExec shared secret
                             (``--superexec-auth-secret-file``; without it ``acquire-task`` answers 401)
                             flwr-serverapp (fedtune's guarded shim): runs only the installed ServerApp, and
                             only the run this session signed (:mod:`fedtune.deploy.runkey`)

The coordinator's identity (CA, server certificate, contributor allow-list) lives in its home
(:mod:`fedtune.deploy.home`, ``~/.fedtune/coordinator``) and is shared by every campaign, so contributors fetch
``ca.pem`` once and are approved once. It registers the approved keys with the SuperLink, submits the campaign
with ``flwr run`` as a bundle that holds only a ``pyproject.toml`` naming the installed fedtune apps, and
prints each round as the ServerApp appends it to ``RUN_DIR/metrics.jsonl``. Starting it again with the same
run dir resumes the campaign::

    RUN_DIR/app/pyproject.toml   the app bundle submitted with `flwr run`
    RUN_DIR/flwr/                FLWR_HOME of the SuperLink and the flwr CLI (connection `fedtune`)
    RUN_DIR/superlink.db         the SuperLink's state (registered nodes survive a restart)
    RUN_DIR/superlink.log        the SuperLink's, SuperExec's and ServerApp's log

Threat: the network (see README, "Run a real campaign"): only the Fleet API faces it. Every Flower process
runs under a warden (:mod:`fedtune.deploy.warden`), so Ctrl-C (exit 130), SIGTERM or SIGKILL of this process
leaves none behind. Pitfall: everything the command is given (campaign, address, home) is checked before the
first file is written.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from fedtune.config import CampaignConfig, ConfigError, looks_local
from fedtune.console import campaign_round_line
from fedtune.deploy.bundle import COMPONENTS, write_shim
from fedtune.deploy.control import ControlClient
from fedtune.deploy.front import FrontServer
from fedtune.deploy.home import CoordinatorHome, HomeError, ensure_home, home_path
from fedtune.deploy.keys import read_allow_list
from fedtune.deploy.processes import ProcessError, start_warded, stop_requested, stop_warded, venv_path, wait_for_port
from fedtune.deploy.runkey import RUN_KEY_ENV, TOKEN, new_run_key, sign_run_config
from fedtune.files import atomic_write_bytes, atomic_write_text
from fedtune.rundir import RunDir

CONNECTION = "fedtune"
"""Name of the SuperLink connection in ``RUN_DIR/flwr/config.toml``."""

FINISHED = ("finished",)
APP_NAME = "fedtune-campaign"
LOOPBACK = "127.0.0.1"
EXIT_BAD_INPUT = 2
SUPERLINK_GRACE_S = 20.0
SUPEREXEC_GRACE_S = 3.0


class CoordinatorError(Exception):
    """Something that stops the coordinator, with a message for the person running it."""


class BadInput(CoordinatorError):
    """A command-line value that is wrong; reported before anything is written (exit 2)."""


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) into host and port."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"--address must be HOST:PORT with a port between 1 and 65535, got {address!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def free_loopback_port() -> int:
    """A loopback TCP port nobody listens on right now (the SuperLink's private port)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


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
{TOKEN} = ""
"""


def flwr_config(address: str, ca: Path | None) -> str:
    """``$FLWR_HOME/config.toml`` with the one connection the coordinator uses."""
    security = f"root-certificates = {json.dumps(str(ca))}" if ca is not None else "insecure = true"
    return f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'


def run_config_arg(run_config: dict[str, str]) -> str:
    """``--run-config`` for ``flwr run``: TOML ``key="value"`` pairs (JSON string escapes are valid TOML)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())


@dataclass
class Coordinator:
    """One coordinator session over a run dir (fresh or resumed)."""

    config_path: Path
    run_dir: Path | None = None
    address: str = "127.0.0.1:9092"
    bind: str | None = None
    insecure: bool = False
    home_dir: Path | None = None
    out: TextIO = field(default_factory=lambda: sys.stdout)  # the stdout of the call, not of the import
    home: CoordinatorHome | None = None
    link: subprocess.Popen[bytes] | None = None
    superexec: subprocess.Popen[bytes] | None = None
    front: FrontServer | None = None
    control: ControlClient | None = None
    private_port: int = 0
    run_id: int | None = None
    run_key: str = field(default_factory=new_run_key, repr=False)
    _registered: set[str] = field(default_factory=set)
    _allow_mtime: float = -1.0

    # -------------------------------------------------------------------------------------------- paths
    @property
    def root(self) -> Path:
        assert self.run_dir is not None, "validate() first"
        return self.run_dir

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def secret_file(self) -> Path:
        return self.flwr_home / "superexec.secret"

    @property
    def layout(self) -> RunDir:
        """The run dir as the ServerApp writes it (config.toml, metrics.jsonl, checkpoints)."""
        return RunDir(self.root)

    @property
    def ca(self) -> Path | None:
        return None if self.insecure or self.home is None else self.home.tls.ca

    @property
    def listen(self) -> tuple[str, int]:
        """Where the public front listens: ``--bind`` or, by default, HOST if loopback, else every interface."""
        host, port = split_address(self.address)
        if self.bind:
            return self.bind.strip("[]"), port
        return (host if is_loopback(host) else ("::" if ":" in host else "0.0.0.0")), port

    def env(self, run_key: bool = False) -> dict[str, str]:
        """Environment of the Flower processes and the flwr CLI: own FLWR_HOME, the serverapp guard first on PATH.

        Only the SuperExec (and the ServerApps it launches) gets the run key.
        """
        env = {k: v for k, v in os.environ.items() if k != RUN_KEY_ENV}
        env["FLWR_HOME"] = str(self.flwr_home)
        env["PATH"] = os.pathsep.join([str(self.root / "bin"), venv_path()])
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        if run_key:
            env[RUN_KEY_ENV] = self.run_key
        return env

    def _exe(self, name: str) -> str:
        return shutil.which(name, path=self.env()["PATH"]) or name

    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this coordinator's SuperLink (its private loopback port)."""
        return subprocess.run(
            [self._exe("flwr"), *args], env=self.env(), capture_output=True, text=True, timeout=timeout_s, cwd=self.root
        )

    # ------------------------------------------------------------------------------------- before writing
    def validate(self) -> CampaignConfig:
        """Check the campaign, the address and the home; write nothing. BadInput / ConfigError on a problem."""
        from fedtune.clients.policy import ContributorPolicy, campaign_refusal, work_refusal
        from fedtune.preflight import validate_campaign

        split_address(self.address)
        listen_host, _ = self.listen
        if not listen_host or any(c.isspace() for c in listen_host):
            raise BadInput(f"--bind must be an interface address, got {self.bind!r}")
        cfg = validate_campaign(str(self.config_path))
        if self.run_dir is None:
            self.run_dir = Path(cfg.campaign.run_dir)
        self.run_dir = self.run_dir.expanduser().resolve()
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise BadInput(f"--run-dir {self.run_dir} exists and is not a folder")
        home = home_path(self.home_dir)
        if home.exists() and not home.is_dir():
            raise BadInput(f"--home {home} exists and is not a folder")
        default, secure = ContributorPolicy(), cfg.secure_aggregation.protocol != "none"
        default_refusal = campaign_refusal(default, cfg, secure) or work_refusal(default, cfg)
        if default_refusal is not None:  # their own choice to change; the campaign still starts
            print(
                f"warning: contributors with the default policy will decline every round: {default_refusal.reason} "
                "(a contributor accepts it only with `fedtune join` flags that say so)",
                file=sys.stderr,
            )
        if looks_local(cfg.data.source):
            print(
                f"contributors train on their own data (fedtune join --data); {cfg.data.source} stays here (one "
                "without --data declines: a contributor never reads a local path a campaign names)",
                file=self.out,
            )
        if self.insecure and not is_loopback(listen_host):
            print(
                f"warning: --insecure on {listen_host}: no TLS and no contributor authentication; anyone who "
                "reaches this port can join the campaign (the Control and Runtime APIs stay on loopback)",
                file=sys.stderr,
            )
        return cfg

    # ------------------------------------------------------------------------------------------- writing
    def prepare(self, cfg: CampaignConfig) -> Path:
        """Home (CA, allow-list), run dir (resolved campaign or the one there), bundle, CLI config, secret."""
        host, _port = split_address(self.address)
        self.home = ensure_home(self.home_dir, [host])
        self.root.mkdir(parents=True, exist_ok=True)
        resolved = self.layout.config
        cfg.campaign.run_dir = str(self.root)
        if resolved.exists() and self.layout.metrics.exists():
            done = [row["round"] for row in self.layout.read_metrics()]
            print(f"resuming the campaign in {self.root} (rounds recorded: {max(done, default=-1)})", file=self.out)
            if resolved.read_text(encoding="utf-8") != cfg.to_toml():
                print(f"warning: {self.config_path} changed since the run started; keeping {resolved}", file=sys.stderr)
        else:
            self.layout.create(cfg.to_toml())
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.secret_file, secrets.token_hex(32).encode(), mode=0o600)
        app = self.root / "app"
        app.mkdir(exist_ok=True)
        atomic_write_text(app / "pyproject.toml", app_pyproject())
        write_shim(self.root / "bin", "serverapp")
        return resolved

    # --------------------------------------------------------------------------------------- processes
    def superlink_command(self) -> list[str]:
        cmd = [
            self._exe("flower-superlink"),
            "--host",
            LOOPBACK,
            "--port",
            str(self.private_port),
            "--database",
            str(self.root / "superlink.db"),
            "--disable-runtime-dependency-installation",
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(self.secret_file),
        ]
        if self.insecure or self.home is None:
            return [*cmd, "--insecure"]
        tls = self.home.tls
        return [
            *cmd,
            "--ssl-ca-certfile",
            str(tls.ca),
            "--ssl-certfile",
            str(tls.cert),
            "--ssl-keyfile",
            str(tls.key),
            "--enable-supernode-auth",
        ]

    def superexec_command(self) -> list[str]:
        cmd = [
            self._exe("flower-superexec"),
            "--runtime-api-address",
            f"{LOOPBACK}:{self.private_port}",
            "--superexec-auth-secret-file",
            str(self.secret_file),
        ]
        return [*cmd, "--insecure"] if self.ca is None else [*cmd, "--root-certificates", str(self.ca)]

    def start(self, timeout_s: float = 90.0) -> None:
        """SuperLink on a private loopback port, SuperExec, then the public Fleet front."""
        self.private_port = free_loopback_port()
        atomic_write_text(self.flwr_home / "config.toml", flwr_config(f"{LOOPBACK}:{self.private_port}", self.ca))
        log = self.root / "superlink.log"
        self.link = start_warded(self.superlink_command(), self.env(), log, self.root, SUPERLINK_GRACE_S)
        wait_for_port(LOOPBACK, self.private_port, timeout_s, self.link)
        self.control = ControlClient(f"{LOOPBACK}:{self.private_port}", self.ca)
        self.superexec = start_warded(
            self.superexec_command(), self.env(run_key=True), log, self.root, SUPEREXEC_GRACE_S
        )
        scheme = "http" if self.ca is None else "https"
        host, port = self.listen
        tls = None if self.ca is None or self.home is None else self.home.tls
        self.front = FrontServer(
            host,
            port,
            f"{scheme}://{LOOPBACK}:{self.private_port}",
            self.ca,
            cert=tls.cert if tls else None,
            key=tls.key if tls else None,
        )
        try:
            self.front.start()
        except OSError as exc:
            raise CoordinatorError(f"cannot listen on {host}:{port}: {exc}") from None

    def check_alive(self) -> None:
        for name, proc in (("flower-superlink", self.link), ("flower-superexec", self.superexec)):
            if proc is not None and proc.poll() is not None:
                raise CoordinatorError(
                    f"{name} exited with status {proc.returncode}; see {self.root / 'superlink.log'}"
                )

    def stop(self) -> None:
        """Front first (no new Fleet traffic), then SuperExec and its ServerApp, then the SuperLink (SIGTERM:
        its database stays consistent and a restart carries on)."""
        if self.front is not None:
            self.front.stop()
            refused = self.front.refusals
            if refused.count:
                print(
                    f"the public port refused {refused.count} request(s) outside the Fleet API "
                    f"(first: {refused.first})",
                    file=self.out,
                )
        if self.control is not None:
            self.control.close()
            self.control = None
        stop_warded(self.superexec, SUPEREXEC_GRACE_S)
        stop_warded(self.link, SUPERLINK_GRACE_S)

    # ---------------------------------------------------------------------------------------- the run
    def sync_allow_list(self, force: bool = False) -> None:
        """Register approved keys the SuperLink does not know yet (the allow-list is re-read when it changes)."""
        if self.insecure or self.home is None:
            return
        allow = self.home.allow_file
        mtime = allow.stat().st_mtime if allow.exists() else 0.0
        if not force and mtime == self._allow_mtime:
            return
        self._allow_mtime = mtime
        keys_dir = self.flwr_home / "keys"
        keys_dir.mkdir(parents=True, exist_ok=True)
        for entry in read_allow_list(allow):
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
        """``flwr run`` the bundle with this campaign and run dir, signed with the session's run key."""
        run_config = {"campaign": str(resolved), "run-dir": str(self.root)}
        run_config[TOKEN] = sign_run_config(self.run_key, run_config)
        res = self.flwr(
            "run", str(self.root / "app"), CONNECTION, "--run-config", run_config_arg(run_config), "--format", "json"
        )
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
        an old run left going would write to the same run dir (and could not pass this session's run key).
        """
        assert self.control is not None, "start() first"
        stale = [
            run.run_id
            for run in self.control.runs() or []
            if run.fab_id == f"fedtune/{APP_NAME}" and not run.status.startswith(FINISHED)
        ]
        for run_id in stale:
            self.control.stop(run_id)
            print(f"stopped run {run_id} left over from a previous coordinator", file=self.out)
        return stale

    def run_status(self) -> str | None:
        """The run's status as the SuperLink reports it (``pending``, ``running``, ``finished:completed``…)."""
        if self.run_id is None or self.control is None:
            return None
        return self.control.status(self.run_id)


def coordinate(
    config_path: Path,
    run_dir: Path | None = None,
    address: str = "127.0.0.1:9092",
    insecure: bool = False,
    bind: str | None = None,
    home: Path | None = None,
    out: TextIO | None = None,
    status_every_s: float = 10.0,
) -> int:
    """Run a campaign to its end: 0 when every round is recorded, 1 when the run ended early, 2 on bad input
    (nothing written), 130 on Ctrl-C or SIGTERM."""
    out = out or sys.stdout  # resolved per call: a default bound at import would outlive a replaced stdout
    co = Coordinator(Path(config_path), Path(run_dir) if run_dir else None, address, bind, insecure, home, out)
    try:
        cfg = co.validate()
    except (BadInput, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with stop_requested() as stop:
        try:
            return _run(co, cfg, stop, status_every_s)
        except HomeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except (CoordinatorError, ProcessError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            co.stop()


def _run(co: Coordinator, cfg: CampaignConfig, stop: threading.Event, status_every_s: float) -> int:
    from fedtune.config import load_config

    out, address = co.out, co.address
    resolved = co.prepare(cfg)
    rounds = load_config(resolved).federation.rounds
    print(f"run dir: {co.root}", file=out)
    print(f"coordinator home: {co.home.root if co.home else '-'}", file=out)
    co.start()
    host, port = co.listen
    security = "insecure" if co.ca is None else "TLS, SuperNode authentication"
    print(
        f"listening on {host}:{port} for {address}: the Fleet API only ({security}); the SuperLink's Control and "
        f"Runtime APIs stay on {LOOPBACK}:{co.private_port}",
        file=out,
    )
    co.sync_allow_list(force=True)
    if co.ca is not None:
        print(
            f"contributors join with: fedtune join --coordinator {address} --root-cert ca.pem "
            f"(copy {co.ca} once: it stays valid for every campaign of this coordinator)",
            file=out,
        )
    co.stop_stale_runs()
    run_id = co.submit(resolved)
    print(f"campaign submitted as Flower run {run_id}; waiting for contributors", file=out, flush=True)
    printed: set[int] = set()

    def print_new_rounds() -> None:
        for row in co.layout.read_metrics():
            if row["round"] not in printed:
                printed.add(row["round"])
                print(campaign_round_line(row), file=out, flush=True)

    next_status = time.monotonic() + status_every_s
    status: str | None = None
    while not stop.is_set():
        print_new_rounds()
        if rounds in printed:
            break
        co.check_alive()
        co.sync_allow_list()
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + status_every_s
            status = co.run_status()
            if status is not None and status.startswith(FINISHED):
                break
        stop.wait(1.0)
    if stop.is_set():
        print("stopping the SuperLink (restart with the same --run-dir to resume)", file=out, flush=True)
        return 130
    deadline = time.monotonic() + 60
    while status is None or not status.startswith(FINISHED):  # let the ServerApp finish writing
        if time.monotonic() > deadline:
            break
        time.sleep(2)
        status = co.run_status()
    print_new_rounds()  # the last round may land between a read and the run's end
    if rounds not in printed:
        print(
            f"error: run {run_id} ended ({status}) after round {max(printed, default=0)} of {rounds}; "
            f"see {co.root / 'superlink.log'}",
            file=sys.stderr,
        )
        return 1
    print(f"campaign complete: adapter in {co.root / 'adapter'}", file=out)
    return 0
