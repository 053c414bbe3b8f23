"""``fedtune join``: turn this machine into a contributor of a coordinator's campaign.

The join agent probes the hardware, benchmarks it, creates or loads the contributor's keys in its state
dir, pins the chosen GPU and starts a Flower SuperNode (``flower-supernode``) that dials the coordinator's
SuperLink over TLS and authenticates with the contributor's ECDSA P-384 key. It then shows each finished
round (from ``STATE_DIR/rounds.jsonl``, written by the ClientApp) until Ctrl-C stops the SuperNode.

Contributors run only code they installed. A Flower SuperNode runs whatever ClientApp code the app bundle
(FAB) carries, placed first on the import path, and 1.42 has no flag that refuses unsigned bundles
(``--trusted-entities`` only knows Flower Hub signatures). So the join agent puts a ``flwr-clientapp``
shim first on the SuperNode's PATH; the shim runs Flower's own ``flwr-clientapp`` with one change: the
bundle is checked by :func:`verify_fab` before it is installed, and a bundle that names another ClientApp
or carries code that differs from the installed fedtune is refused (the round gets an error reply,
nothing from the bundle runs).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedtune.identity import contributor_id

COMPONENTS = {"clientapp": "fedtune.clients.app:app", "serverapp": "fedtune.server.app:app"}
"""The only apps fedtune runs: the ones in the installed fedtune (contributors guard ``clientapp``,
the coordinator guards ``serverapp``)."""

CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".pyd", ".pyw", ".so", ".dylib", ".dll", ".pth"})
"""Files in a bundle that Python could import or execute."""

ROUNDS_FILE = "rounds.jsonl"
REFUSED_MARKERS = ("Exit Code: 305", "Failed to activate SuperNode")
"""What ``flower-supernode`` logs when the SuperLink refuses its key (its process exit status is 1)."""

EXIT_REFUSED = 3
EXIT_SUPERNODE_FAILED = 4


class BundleRefused(Exception):
    """An app bundle that a contributor will not run."""


# --------------------------------------------------------------------------------------------- bundles


def _module_name(path: PurePosixPath) -> str:
    parts = list(path.with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _installed_source(module: str) -> bytes | None:
    """Bytes of the installed module ``module`` (only modules of the fedtune distribution count)."""
    if module != "fedtune" and not module.startswith("fedtune."):
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return None
    return Path(spec.origin).read_bytes()


def verify_fab(fab: bytes, role: str = "clientapp") -> dict[str, Any]:
    """Check an app bundle before anything in it is installed or imported; return its pyproject.

    Accepted: a bundle whose ``role`` component is the installed one (:data:`COMPONENTS`) and whose
    code files, if any, are byte-identical to the installed fedtune modules at the same import path.
    Everything else raises :class:`BundleRefused`.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile as exc:
        raise BundleRefused(f"not a valid app bundle: {exc}") from None
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        if "pyproject.toml" not in names:
            raise BundleRefused("app bundle has no pyproject.toml")
        try:
            pyproject = tomllib.loads(zf.read("pyproject.toml").decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise BundleRefused(f"app bundle's pyproject.toml is invalid: {exc}") from None
        component = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get(role)
        if component != COMPONENTS[role]:
            raise BundleRefused(f"app bundle names {role} {component!r}; fedtune only runs the installed "
                                f"{COMPONENTS[role]}")
        for name in names:
            path = PurePosixPath(name)
            if path.parts[0] == ".info" or path.suffix.lower() not in CODE_SUFFIXES:
                continue
            if path.suffix != ".py":
                raise BundleRefused(f"app bundle carries compiled or startup code: {name}")
            installed = _installed_source(_module_name(path))
            if installed is None:
                raise BundleRefused(f"app bundle carries code that is not part of the installed fedtune: {name}")
            if zf.read(name) != installed:
                raise BundleRefused(f"app bundle's {name} differs from the installed fedtune")
    return pyproject


def guard_runner(runner: Any, role: str) -> None:
    """Make ``runner`` (Flower's app runner module) verify each bundle before installing it.

    Fails closed: if the runner no longer looks the way this guard expects, the process exits
    without running anything.
    """
    original = getattr(runner, "install_from_fab", None)
    if original is None:
        sys.exit(f"fedtune: this flwr version's {role} runner cannot be guarded; refusing to run bundles")

    def install_verified(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Path:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        verify_fab(content, role)
        return original(fab_file, *args, **kwargs)

    runner.install_from_fab = install_verified


def guarded_clientapp() -> None:
    """Entry point of the ``flwr-clientapp`` shim: Flower's ClientApp runner with bundle verification."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    # the package re-exports a function of the same name: take the module itself
    guard_runner(importlib.import_module("flwr.supernode.runtime.run_clientapp"), "clientapp")
    flwr_clientapp()


SHIM_TEMPLATE = """#!{python}
# Written by fedtune: runs Flower's {command}, refusing bundles that carry foreign code.
import sys
from {module} import {entry}
sys.exit({entry}())
"""

SHIM_ENTRIES = {"clientapp": "fedtune.clients.join", "serverapp": "fedtune.server.coordinator"}


def write_shim(bin_dir: Path, role: str = "clientapp") -> Path:
    """Write the guarded ``flwr-<role>`` into ``bin_dir`` (to be put first on the runner's PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    command = f"flwr-{role}"
    shim = bin_dir / command
    shim.write_text(SHIM_TEMPLATE.format(python=sys.executable, command=command, module=SHIM_ENTRIES[role],
                                         entry=f"guarded_{role}"), encoding="utf-8")
    shim.chmod(0o755)
    return shim


# ------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class ContributorKeys:
    """A contributor's keys: the SuperNode auth key pair (P-384) and the long-term identity (Ed25519)."""

    auth_private: Path
    auth_public: Path
    identity_private: Path
    public_line: str
    contributor_id: str


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def load_identity_key(state_dir: Path) -> ed25519.Ed25519PrivateKey:
    """The contributor's long-term Ed25519 identity key (signs its secure-aggregation keys)."""
    key = serialization.load_pem_private_key((Path(state_dir) / "identity.key").read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{state_dir / 'identity.key'}: not an Ed25519 key")
    return key


def ensure_keys(state_dir: Path, name: str = "") -> ContributorKeys:
    """Create the contributor's keys on first use, load them afterwards (a restart keeps its identity).

    ``supernode.key`` (OpenSSH ECDSA P-384) authenticates the SuperNode to the SuperLink, and its public
    half ``supernode.pub`` is what the coordinator approves. ``identity.key`` (Ed25519) is the key whose
    fingerprint is the contributor id in the credit ledger.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    auth_private, auth_public = state_dir / "supernode.key", state_dir / "supernode.pub"
    ident = state_dir / "identity.key"
    if not auth_private.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        _write_secret(auth_private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()))
    loaded = serialization.load_ssh_private_key(auth_private.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp384r1":
        raise ValueError(f"{auth_private}: expected an ECDSA P-384 key in OpenSSH format")
    line = loaded.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    comment = "".join(c for c in name if c.isalnum() or c in "-_.@") or "contributor"
    auth_public.write_text(f"{line} {comment}\n", encoding="ascii")
    if not ident.exists():
        _write_secret(ident, ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    identity = load_identity_key(state_dir)
    return ContributorKeys(auth_private, auth_public, ident, f"{line} {comment}", contributor_id(identity.public_key()))


# ---------------------------------------------------------------------------------------------- agent


@dataclass
class JoinOptions:
    """What ``fedtune join`` was asked to do."""

    coordinator: str
    state_dir: Path
    gpu: int | None = None
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
    verbose: bool = False


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
    return " ".join(f"{k}={v}" for k, v in items.items())


def supernode_command(opts: JoinOptions, keys: ContributorKeys, config: str) -> list[str]:
    """``flower-supernode`` with TLS (or ``--insecure``), key authentication and this node's config."""
    exe = shutil.which("flower-supernode", path=_venv_path()) or "flower-supernode"
    cmd = [exe, "--superlink", opts.coordinator, "--node-config", config, "--port", str(opts.port)]
    if opts.insecure:  # Flower refuses key authentication without TLS (exit code 303)
        return [*cmd, "--insecure"]
    if opts.root_cert is not None:
        cmd += ["--root-certificates", str(opts.root_cert)]
    return [*cmd, "--auth-supernode-private-key", str(keys.auth_private)]


def _venv_path() -> str:
    """PATH with this interpreter's scripts folder first (flower-* executables live there)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def supernode_env(opts: JoinOptions, bin_dir: Path, device: str) -> dict[str, str]:
    """The SuperNode's environment: the guard shim first on PATH, its own FLWR_HOME, the pinned GPU."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), _venv_path()])
    env["FLWR_HOME"] = str(opts.state_dir / "flwr")
    env["CUDA_VISIBLE_DEVICES"] = str(opts.gpu) if device.startswith("cuda") else ""
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _die_with_parent() -> None:
    """In the SuperNode child (Linux): get SIGTERM if the join agent dies, so no SuperNode is left behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def format_round(row: dict[str, Any]) -> str:
    """One console line for a finished round of this contributor."""
    if row.get("declined"):
        return f"round {row.get('round')}: declined ({row.get('reason', 'no reason given')})"
    parts = [f"round {row.get('round')}: trained {row.get('examples', 0)} examples, {row.get('tokens', 0)} tokens"]
    if row.get("train_loss") is not None:
        parts.append(f"loss {float(row['train_loss']):.4f}")
    if row.get("epsilon") is not None:
        parts.append(f"ε {float(row['epsilon']):.2f}")
    if row.get("wall_s") is not None:
        parts.append(f"{float(row['wall_s']):.1f} s")
    return ", ".join(parts)


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


def _pump(stream: io.BufferedReader, log_path: Path, echo: bool, seen: list[str]) -> None:
    """Copy the SuperNode's output to its log file (and the console with --verbose), noting refusals."""
    with log_path.open("ab") as log:
        for raw in iter(stream.readline, b""):
            log.write(raw)
            log.flush()
            line = raw.decode("utf-8", "replace")
            if any(m in line for m in REFUSED_MARKERS):
                seen.append(line.strip())
            if echo:
                sys.stderr.write(line)


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """Ask the SuperNode to stop (SIGTERM, which it handles gracefully), then insist."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_join(opts: JoinOptions, out: TextIO = sys.stdout) -> int:
    """Run the join agent until Ctrl-C or a fatal SuperNode error; the return value is the exit status."""
    from .hardware import benchmark_flops, probe

    opts.state_dir = opts.state_dir.expanduser().resolve()
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    if opts.data is not None:
        opts.data = opts.data.expanduser().resolve()
    if opts.root_cert is not None:
        opts.root_cert = opts.root_cert.expanduser().resolve()
        if not opts.root_cert.is_file():
            print(f"error: --root-cert {opts.root_cert} is not a file", file=sys.stderr)
            return 2
    elif not opts.insecure:
        print("error: pass --root-cert CA.pem (the CA file the coordinator gave you) or --insecure",
              file=sys.stderr)
        return 2

    hw = probe(opts.gpu)
    if opts.gpu is not None and not hw.device.startswith("cuda"):
        print(f"warning: GPU {opts.gpu} is not visible to torch; contributing on the CPU", file=sys.stderr)
    print(f"hardware: {hw.summary()}", file=out)
    peak = benchmark_flops(hw.device, opts.benchmark_s)
    print(f"benchmark: {peak / 1e12:.3f} TFLOP/s (matmul, declared peak)", file=out)
    (opts.state_dir / "hardware.json").write_text(json.dumps({**hw.as_dict(), "peak_flops": peak}, indent=2))

    keys = ensure_keys(opts.state_dir, opts.name)
    print(f"contributor id: {keys.contributor_id}", file=out)
    print(f"public key ({keys.auth_public}):\n  {keys.public_line}", file=out)
    print("the coordinator approves it with:\n"
          f"  fedtune approve {keys.auth_public.name} --run-dir RUN_DIR --name {opts.name or 'NAME'}", file=out)

    bin_dir = opts.state_dir / "bin"
    shim = write_shim(bin_dir)
    env = supernode_env(opts, bin_dir, hw.device)
    if shutil.which("flwr-clientapp", path=env["PATH"]) != str(shim):
        print("error: could not put fedtune's guarded flwr-clientapp first on the SuperNode's PATH", file=sys.stderr)
        return EXIT_SUPERNODE_FAILED
    cmd = supernode_command(opts, keys, node_config(opts, keys, peak, "cuda:0" if hw.device.startswith("cuda")
                                                    else "cpu"))
    return _supervise(opts, cmd, env, out)


def _supervise(opts: JoinOptions, cmd: list[str], env: dict[str, str], out: TextIO) -> int:
    """Run the SuperNode, restart it while the coordinator has not (yet) accepted the key, show rounds."""
    stop = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    for s in previous:
        signal.signal(s, on_signal)
    tail = _Tail(opts.state_dir / ROUNDS_FILE)
    log_path = opts.state_dir / "supernode.log"
    deadline = time.monotonic() + opts.enrol_wait_s
    print(f"joining {opts.coordinator} (SuperNode log: {log_path}); Ctrl-C to stop", file=out)
    try:
        while not stop.is_set():
            refused: list[str] = []
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            assert proc.stdout is not None
            pump = threading.Thread(target=_pump, args=(proc.stdout, log_path, opts.verbose, refused), daemon=True)
            pump.start()
            while proc.poll() is None and not stop.is_set():
                for row in tail.rows():
                    print(format_round(row), file=out, flush=True)
                stop.wait(0.5)
            if stop.is_set():
                print("stopping the SuperNode…", file=out, flush=True)
                _stop(proc)
                pump.join(5)
                return 0
            pump.join(5)
            for row in tail.rows():
                print(format_round(row), file=out, flush=True)
            if not refused:
                print(f"error: the SuperNode exited with status {proc.returncode}; see {log_path}", file=sys.stderr)
                return EXIT_SUPERNODE_FAILED
            if time.monotonic() >= deadline:
                print(f"error: the coordinator at {opts.coordinator} refused this contributor's key; "
                      f"ask them to approve {opts.state_dir / 'supernode.pub'}", file=sys.stderr)
                return EXIT_REFUSED
            print("not accepted by the coordinator (yet): waiting for approval, retrying in 5 s", file=out,
                  flush=True)
            stop.wait(5.0)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
