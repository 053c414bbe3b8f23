"""``fedtune join``: turn this machine into a contributor of a coordinator's campaign.

The join agent probes the hardware, benchmarks it, creates or loads the contributor's keys in its state
dir, pins the chosen GPU and starts a Flower SuperNode (``flower-supernode``) that dials the coordinator's
SuperLink over TLS and authenticates with the contributor's ECDSA P-384 key. It then shows each finished
round (from ``STATE_DIR/rounds.jsonl``, written by the ClientApp) until Ctrl-C stops the SuperNode.

Contributors run only code they installed. By default the SuperNode runs with ``--isolation process`` and one
resident worker (:mod:`fedtune.clients.worker`, started and restarted by this agent) serves every task in-process,
checking each bundle with :func:`fedtune.deploy.bundle.verify_fab` first, and keeping the model loaded across
rounds and SecAgg+ stages. Without it (``--no-resident-worker``) the SuperNode starts a ``flwr-clientapp`` per
message, which is fedtune's guarded shim (:mod:`fedtune.deploy.bundle`); both refuse any bundle carrying code that
differs from the installed fedtune. Torch's threads are pinned to ``--threads`` in either case.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fedtune.console import contributor_round_line
from fedtune.deploy.bundle import write_shim
from fedtune.deploy.keys import ContributorKeys, ensure_keys
from fedtune.deploy.processes import preexec, stop_process, stop_requested, venv_path
from fedtune.files import atomic_write_text

from .join_checks import ConnectWatch, DevicePlan, check_join, visible_devices, work_options

ROUNDS_FILE = "rounds.jsonl"
REFUSED_MARKERS = ("Exit Code: 305", "Failed to activate SuperNode")
"""What ``flower-supernode`` logs when the SuperLink refuses its key (its process exit status is 1)."""

EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3
EXIT_SUPERNODE_FAILED = 4
EXIT_UNREACHABLE = 5
EXIT_INTERRUPTED = 130
INTERRUPTED = "interrupted: the SuperNode is stopped; run the same fedtune join again to rejoin"


@dataclass
class JoinOptions:
    """What ``fedtune join`` was asked to do."""

    coordinator: str
    state_dir: Path
    gpu: int | None = None
    cpu: bool = False
    data: Path | None = None
    root_cert: Path | None = None
    name: str = ""
    team: str = ""
    max_epsilon: float | None = None
    insecure: bool = False
    port: int = 9094
    partition_id: int = 0
    num_partitions: int = 1
    benchmark_s: float = 1.0
    enrol_wait_s: float = 300.0
    connect_timeout_s: float = 120.0
    max_rank: int | None = None
    batch_size: int | None = None
    micro_batch: int | None = None
    verbose: bool = False
    threads: int = 0  # torch threads; 0: 4 on a GPU, else cores // 2 (fedtune.clients.worker.default_threads)
    resident: bool = True  # one resident worker serves all tasks (SuperNode --isolation process)


def _toml_str(value: str) -> str:
    if '"' in value or "\n" in value:
        raise ValueError(f"node config values cannot contain quotes or newlines: {value!r}")
    return f'"{value}"'


def node_config(opts: JoinOptions, keys: ContributorKeys, peak_flops: float, device: str) -> str:
    """The ``--node-config`` string the ClientApp reads from ``context.node_config``."""
    items: dict[str, str] = {
        "state-dir": _toml_str(str(opts.state_dir)),
        "data": _toml_str(str(opts.data) if opts.data else ""),
        "name": _toml_str(opts.name),
        "team": _toml_str(opts.team),
        "contributor-id": _toml_str(keys.contributor_id),
        "peak-flops": repr(float(peak_flops)),
        "device": _toml_str(device),
        "partition-id": str(int(opts.partition_id)),
        "num-partitions": str(int(opts.num_partitions)),
    }
    if opts.max_epsilon is not None:
        items["max-epsilon"] = repr(float(opts.max_epsilon))
    for key, value in work_options(opts).items():
        items[key] = str(int(value))
    return " ".join(f"{k}={v}" for k, v in items.items())


WORKER_SECRET = "worker.secret"
"""In the state dir: the secret the SuperNode and the resident worker share (only the worker can claim tasks)."""


def supernode_command(opts: JoinOptions, keys: ContributorKeys, config: str) -> list[str]:
    """``flower-supernode`` with TLS (or ``--insecure``), key authentication and this node's config."""
    exe = shutil.which("flower-supernode", path=venv_path()) or "flower-supernode"
    cmd = [exe, "--superlink", opts.coordinator, "--node-config", config, "--port", str(opts.port)]
    if opts.resident:  # no ClientApp process per message: the resident worker claims the tasks
        # Flower's SuperNode, polling sooner after each message (fedtune.clients.worker.run_supernode)
        cmd = [sys.executable, "-m", "fedtune.clients.worker", "supernode", *cmd[1:]]
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(opts.state_dir / WORKER_SECRET)]
    if opts.insecure:  # Flower refuses key authentication without TLS (exit code 303)
        return [*cmd, "--insecure"]
    if opts.root_cert is not None:
        cmd += ["--root-certificates", str(opts.root_cert)]
    return [*cmd, "--auth-supernode-private-key", str(keys.auth_private)]


def supernode_env(opts: JoinOptions, bin_dir: Path, device: str) -> dict[str, str]:
    """The SuperNode's environment: the guard shim first on PATH, its own FLWR_HOME, the pinned GPU."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), venv_path()])
    env["FLWR_HOME"] = str(opts.state_dir / "flwr")
    cuda = device.startswith("cuda") and opts.gpu is not None
    env["CUDA_VISIBLE_DEVICES"] = visible_devices(opts.gpu, os.environ.get("CUDA_VISIBLE_DEVICES")) if cuda else ""
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(opts.threads)  # the shim's ClientApps inherit it too
    return env


def worker_command(opts: JoinOptions) -> list[str]:
    """The resident worker (:mod:`fedtune.clients.worker`) serving this node's SuperNode on loopback."""
    return [
        sys.executable,
        "-m",
        "fedtune.clients.worker",
        "--runtime-api-address",
        f"127.0.0.1:{opts.port}",
        "--state-dir",
        str(opts.state_dir),
        "--threads",
        str(opts.threads),
        "--auth-secret-file",
        str(opts.state_dir / WORKER_SECRET),
    ]


class ResidentWorker:
    """The worker process: started with the SuperNode, restarted if it dies (with a bounded back-off), stopped last."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, echo: bool, out: TextIO, cwd: Path) -> None:
        self.cmd, self.env, self.log_path, self.echo, self.out, self.cwd = cmd, env, log_path, echo, out, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.pump: threading.Thread | None = None
        self.starts = 0
        self.next_start = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec(),
        )
        assert self.proc.stdout is not None
        self.pump = threading.Thread(target=_pump, args=(self.proc.stdout, self.log_path, self.echo, []), daemon=True)
        self.pump.start()
        self.starts += 1

    def check(self) -> None:
        """Restart the worker if it exited (after 1, 2, 4 … 30 s)."""
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if not self.next_start:
            delay = min(30.0, 2.0 ** min(self.starts - 1, 5))
            print(
                f"the worker exited with status {self.proc.returncode}; restarting it in {delay:.0f} s "
                f"(see {self.log_path})",
                file=self.out,
                flush=True,
            )
            self.next_start = now + delay
        elif now >= self.next_start:
            self.next_start = 0.0
            self.start()

    def stop(self) -> None:
        stop_process(self.proc)
        if self.pump is not None:
            self.pump.join(5)


class _Tail:
    """New complete lines of a growing JSONL file."""

    def __init__(self, path: Path, from_end: bool = True) -> None:
        self.path = path
        self.pos = path.stat().st_size if from_end and path.exists() else 0

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.pos)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.pos += end
        out = []
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def _pump(
    stream: io.BufferedReader, log_path: Path, echo: bool, seen: list[str], watch: ConnectWatch | None = None
) -> None:
    """Copy the SuperNode's output to its log file (and the console with --verbose), noting refusals."""
    with log_path.open("ab") as log:
        for raw in iter(stream.readline, b""):
            log.write(raw)
            log.flush()
            line = raw.decode("utf-8", "replace")
            if watch is not None:
                watch.feed(line)
            if any(m in line for m in REFUSED_MARKERS):
                seen.append(line.strip())
            if echo:
                sys.stderr.write(line)


def run_join(opts: JoinOptions, out: TextIO | None = None, policy: Any = None) -> int:
    """Run the join agent until Ctrl-C or a fatal SuperNode error; the return value is the exit status.

    Every argument is checked first (:func:`fedtune.clients.join_checks.check_join`): a problem is one
    ``error:`` line, exit 2, and nothing written. Then the state dir is created and ``policy`` (the
    :class:`~fedtune.clients.policy.ContributorPolicy` ``join``'s flags asked for, already checked) saved in it.
    """
    out = out or sys.stdout  # resolved per call, not bound at import
    opts.state_dir = opts.state_dir.expanduser().resolve()
    if opts.data is not None:
        opts.data = opts.data.expanduser().resolve()
    if opts.root_cert is not None:
        opts.root_cert = opts.root_cert.expanduser().resolve()
    plan = check_join(opts)
    if isinstance(plan, str):
        print(f"error: {plan}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        opts.state_dir.mkdir(parents=True, exist_ok=True)
        if policy is not None:
            policy.save(opts.state_dir)
    except OSError as exc:
        print(f"error: --state-dir {opts.state_dir}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .policy import POLICY_FILE, ContributorPolicy, PolicyError

    try:
        accepted = policy if policy is not None else ContributorPolicy.load(opts.state_dir)  # just saved, or the file
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"policy: {accepted.summary()} ({opts.state_dir / POLICY_FILE})", file=out)
    return _start(opts, plan, out)


def _start(opts: JoinOptions, plan: DevicePlan, out: TextIO) -> int:
    from .hardware import benchmark, probe

    hw = probe(plan.probe_gpu)
    if opts.threads <= 0:
        from .worker import default_threads

        opts.threads = default_threads(plan.node_device.startswith("cuda"))
    print(f"hardware: {hw.summary()}", file=out)
    bench = benchmark(hw.device, opts.benchmark_s)
    peak = bench.declared
    print(f"benchmark: {bench.summary()}", file=out)
    hardware = {**hw.as_dict(), "peak_flops": peak, "benchmark": bench.as_dict()}
    atomic_write_text(opts.state_dir / "hardware.json", json.dumps(hardware, indent=2))

    keys = ensure_keys(opts.state_dir, opts.name)
    print(f"contributor id: {keys.contributor_id}", file=out)
    if opts.data is None:
        print("data: none of your own (--data): taking part only in campaigns on a public hub dataset", file=out)
    print(f"public key ({keys.auth_public}):\n  {keys.public_line}", file=out)
    print(
        f"the coordinator approves it with:\n  fedtune approve {keys.auth_public.name} --name {opts.name or 'NAME'}",
        file=out,
    )

    bin_dir = opts.state_dir / "bin"
    shim = write_shim(bin_dir)
    env = supernode_env(opts, bin_dir, plan.node_device)
    if shutil.which("flwr-clientapp", path=env["PATH"]) != str(shim):
        print("error: could not put fedtune's guarded flwr-clientapp first on the SuperNode's PATH", file=sys.stderr)
        return EXIT_SUPERNODE_FAILED
    cmd = supernode_command(opts, keys, node_config(opts, keys, peak, plan.node_device))
    worker = None
    if opts.resident:
        secret = opts.state_dir / WORKER_SECRET
        atomic_write_text(secret, secrets.token_hex(32))
        secret.chmod(0o600)
        worker = ResidentWorker(
            worker_command(opts), env, opts.state_dir / "worker.log", opts.verbose, out, cwd=opts.state_dir
        )
    return _supervise(opts, cmd, env, out, worker)


def _supervise(
    opts: JoinOptions, cmd: list[str], env: dict[str, str], out: TextIO, worker: ResidentWorker | None = None
) -> int:
    """Run the SuperNode (and the resident worker), restart it while the coordinator has not (yet) accepted the
    key, show rounds."""
    with stop_requested() as stop:
        if worker is None:
            return _supervise_until(opts, cmd, env, out, stop)
        print(f"resident worker: {opts.threads} torch threads (log: {worker.log_path})", file=out)
        worker.start()
        try:
            return _supervise_until(opts, cmd, env, out, stop, worker)
        finally:
            worker.stop()


def _supervise_until(
    opts: JoinOptions,
    cmd: list[str],
    env: dict[str, str],
    out: TextIO,
    stop: threading.Event,
    worker: ResidentWorker | None = None,
) -> int:
    tail = _Tail(opts.state_dir / ROUNDS_FILE)
    log_path = opts.state_dir / "supernode.log"
    deadline = time.monotonic() + opts.enrol_wait_s
    watch = ConnectWatch(opts.coordinator, opts.connect_timeout_s, opts.root_cert)
    print(f"joining {opts.coordinator} (SuperNode log: {log_path}); Ctrl-C to stop", file=out)
    while not stop.is_set():
        refused: list[str] = []
        proc = subprocess.Popen(  # in the state dir: a relative path a campaign names resolves among fedtune's files
            cmd, env=env, cwd=opts.state_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec()
        )
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, log_path, opts.verbose, refused, watch), daemon=True)
        pump.start()
        while proc.poll() is None and not stop.is_set():
            for row in tail.rows():
                print(contributor_round_line(row), file=out, flush=True)
            if (code := _unreachable(watch, proc, out)) is not None:
                pump.join(5)
                return code
            if worker is not None:
                worker.check()
            stop.wait(0.5)
        if stop.is_set():
            return _interrupted(proc, pump, out, worker)
        pump.join(5)
        for row in tail.rows():
            print(contributor_round_line(row), file=out, flush=True)
        if not watch.connected and (watch.tls or (watch.failures and not refused)):  # TLS failures exit with 305 too
            print(
                f"error: {watch.failure_line(f'(the SuperNode exited with status {proc.returncode})')}", file=sys.stderr
            )
            return EXIT_UNREACHABLE
        if not refused:
            print(f"error: the SuperNode exited with status {proc.returncode}; see {log_path}", file=sys.stderr)
            return EXIT_SUPERNODE_FAILED
        if time.monotonic() >= deadline:
            print(
                f"error: the coordinator at {opts.coordinator} refused this contributor's key; "
                f"ask them to approve {opts.state_dir / 'supernode.pub'}",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        print("not accepted by the coordinator (yet): waiting for approval, retrying in 5 s", file=out, flush=True)
        stop.wait(5.0)
    print(INTERRUPTED, file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def _unreachable(watch: ConnectWatch, proc: subprocess.Popen[bytes], out: TextIO) -> int | None:
    """Tell the console when the coordinator cannot be reached; stop the SuperNode once ``--connect-timeout`` passed."""
    if (verdict := watch.verdict()) is None:
        if (news := watch.news()) is not None:
            print(news, file=out, flush=True)
        return None
    stop_process(proc)
    print(f"error: {verdict}", file=sys.stderr, flush=True)
    return EXIT_UNREACHABLE


def _interrupted(
    proc: subprocess.Popen[bytes], pump: threading.Thread, out: TextIO, worker: ResidentWorker | None = None
) -> int:
    """Ctrl-C (or SIGTERM): stop the SuperNode and everything it started, say so, exit status 130."""
    print("stopping the SuperNode…", file=out, flush=True)
    if worker is not None:  # first, so that it can still report a task it was serving
        worker.stop()
    stop_process(proc)
    pump.join(5)
    print(INTERRUPTED, file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
