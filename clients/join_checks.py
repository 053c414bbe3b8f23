"""``fedtune join`` before and while it starts: every argument checked first, then a watch on the connection.

Job
    :func:`check_join` checks every argument of ``fedtune join`` before anything is written or started (the
    state dir, ``policy.toml``, keys, the SuperNode): the coordinator address, the state dir's usability, the CA
    file (a PEM certificate), the contributor's ``--data`` (records fedtune reads, via
    :func:`fedtune.preflight.check_contributor_data`), the work options, and the device (:func:`plan_device`).
    Each problem is one line naming the flag, what was expected and what was found; ``join`` prints it as
    ``error: ...`` and exits 2.

    :class:`ConnectWatch` reads the SuperNode's log lines as they come and tells ``join``'s console when the
    coordinator cannot be reached (nothing listening, a TLS/CA failure) and when to give up
    (``--connect-timeout``); Flower itself retries forever and logs only to ``supernode.log``.

Pitfalls
    - ``--gpu N`` is an index in *this* process's CUDA numbering, which already honours a
      ``CUDA_VISIBLE_DEVICES`` the user set. The SuperNode sees only that one device, so it trains on ``cuda:0``
      and its ``CUDA_VISIBLE_DEVICES`` must name the N-th entry of the parent's list, not ``N``
      (:func:`visible_devices`).
    - The strings matched in the SuperNode's log are Flower 1.42's (``flwr/supercore/retry/http_retry.py``,
      ``flwr/supernode/start_client_internal.py``); a Flower upgrade must re-check them
      (``tests/unit/test_join_checks.py`` pins them against the installed source).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONNECTED_MARKER = "SuperNode ID:"
"""Logged by ``flower-supernode`` once the SuperLink accepted its connection (and key)."""
RETRY_MARKER = "Connection attempt failed"
"""Logged (WARNING) before every reconnection back-off: the SuperLink did not answer."""
TLS_MARKER = "SSL/TLS handshake error"
"""Logged (ERROR) when the TLS handshake fails: wrong CA, or a certificate that does not cover the address."""
REFUSED_KEY_MARKER = "Failed to activate SuperNode"
"""Logged when the SuperLink refuses the node's key (``Exit Code: 305`` alone is any failed first connection)."""
GAVE_UP_MARKER = "Exit Code: 305"
"""Logged when the SuperNode's first connection failed for good: a TLS failure (after :data:`TLS_MARKER`) or an
HTTP error answer from the SuperLink (it was reached); unreachable addresses are retried forever instead."""
ANNOUNCE_AFTER_S = 3.0
"""A failed attempt is announced once no connection followed it for this long (TLS failures at once)."""
DOCTOR_HINT = "fedtune doctor --coordinator {address}{cert}"


@dataclass(frozen=True)
class DevicePlan:
    """Where a contributor trains: what ``join`` probes, and what the SuperNode is shown and told."""

    probe_gpu: int | None
    """The CUDA index ``join`` probes and benchmarks in its own process (``None``: the CPU)."""
    node_device: str
    """The node config's ``device``: ``cuda:0`` (the SuperNode sees only the chosen GPU) or ``cpu``."""
    visible_devices: str
    """``CUDA_VISIBLE_DEVICES`` for the SuperNode: the chosen GPU, or ``""`` (no GPU at all)."""


def visible_devices(gpu: int, parent: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` that shows a child only this process's CUDA device ``gpu``.

    With ``parent`` (this process's own ``CUDA_VISIBLE_DEVICES``) set, torch's index ``gpu`` is the ``gpu``-th
    entry of that list (an index or a UUID); without it, the physical index ``gpu`` itself.
    """
    entries = [e.strip() for e in (parent or "").split(",") if e.strip()]
    if parent is not None and parent.strip() and gpu < len(entries):
        return entries[gpu]
    return str(gpu)


def plan_device(gpu: int | None, cpu: bool, cuda_count: int, parent_visible: str | None = None) -> DevicePlan | str:
    """The device plan for ``--gpu``/``--cpu`` on a machine where torch sees ``cuda_count`` GPUs, or an error line."""
    if cpu and gpu is not None:
        return f"--cpu and --gpu {gpu} exclude each other: pass one of them"
    if gpu is None:
        return DevicePlan(None, "cpu", "")
    if gpu < 0:
        return f"--gpu: expected a CUDA device index >= 0, found {gpu}"
    if gpu >= cuda_count:
        seen = "no CUDA GPU" if cuda_count == 0 else f"{cuda_count} CUDA GPU(s), indices 0-{cuda_count - 1}"
        return f"--gpu {gpu}: expected a CUDA device torch can use, found {seen}; pass --cpu to contribute on the CPU"
    return DevicePlan(gpu, "cuda:0", visible_devices(gpu, parent_visible))


def cuda_device_count() -> int:
    """How many CUDA devices torch can use in this process (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_positive(flag: str, value: int | None) -> str | None:
    if value is not None and value < 1:
        return f"{flag}: expected a positive integer, found {value}"
    return None


def check_coordinator(address: str) -> str | None:
    """``HOST:PORT`` with a port in 1-65535."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"--coordinator: expected HOST:PORT (e.g. coord.example.org:9092), found {address!r}"
    return None


def check_state_dir(path: Path) -> str | None:
    """A folder this user can create or write to (nothing is created here)."""
    if path.exists():
        if not path.is_dir():
            return f"--state-dir {path}: expected a folder, found a file"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"--state-dir {path}: expected a folder this user can write to, found no write permission"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"--state-dir {path}: expected a folder, found {parent} in its path, which is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--state-dir {path}: expected a folder this user can create, found {parent} not writable"
    return None


def check_root_cert(path: Path) -> str | None:
    """A readable file holding at least one PEM certificate."""
    from cryptography import x509

    if not path.is_file():
        return f"--root-cert {path}: expected the coordinator's CA file (ca.pem), found {_what(path)}"
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        return f"--root-cert {path}: expected a readable file, found {exc.strerror or exc}"
    except ValueError:
        return f"--root-cert {path}: expected a PEM certificate (-----BEGIN CERTIFICATE-----), found something else"
    if not certs:
        return f"--root-cert {path}: expected a PEM certificate, found none in the file"
    return None


def check_data(path: Path) -> str | None:
    """``--data``: an existing file or folder of records fedtune reads (the campaign names the fields later)."""
    from fedtune.ml.data import DataError
    from fedtune.preflight import check_contributor_data

    if not path.exists():
        return f"--data {path}: expected a file or folder of training records, found {_what(path)}"
    try:
        check_contributor_data(path)
    except DataError as exc:
        return f"--data {exc}"
    return None


def _what(path: Path) -> str:
    if not path.exists():
        return "nothing there"
    return "a folder" if path.is_dir() else "something that is not a regular file"


NODE_MAX_RANK, NODE_BATCH_SIZE, NODE_MICRO_BATCH = "max-rank", "batch-size", "micro-batch"
"""The node-config keys of the work a contributor takes on: written here (``join``), read by
:func:`fedtune.clients.workspace.local_choice`. Defined in this light module so ``join`` does not import the
training stack to name them."""


def work_options(opts: Any) -> dict[str, int]:
    """The node-config keys of the work this contributor takes on (``--max-rank``, ``--batch-size``, ...)."""
    given = {NODE_MAX_RANK: opts.max_rank, NODE_BATCH_SIZE: opts.batch_size, NODE_MICRO_BATCH: opts.micro_batch}
    return {key: int(value) for key, value in given.items() if value is not None}


def check_join(opts: Any, cuda_count: Callable[[], int] = cuda_device_count) -> DevicePlan | str:
    """Every argument of ``fedtune join`` (a :class:`fedtune.clients.join.JoinOptions`), cheap checks first.

    Returns the device plan, or the first problem as one line (without the ``error:`` prefix). Writes nothing.
    """
    if (problem := check_coordinator(opts.coordinator)) is not None:
        return problem
    for flag, value in (
        ("--max-rank", opts.max_rank),
        ("--batch-size", opts.batch_size),
        ("--micro-batch", opts.micro_batch),
    ):
        if (problem := check_positive(flag, value)) is not None:
            return problem
    if opts.threads < 0:
        return f"--threads: expected a positive integer (or no --threads for the default), found {opts.threads}"
    if not 1 <= opts.port <= 65535:
        return f"--port: expected a port in 1-65535, found {opts.port}"
    if not opts.connect_timeout_s > 0:
        return f"--connect-timeout: expected seconds > 0, found {opts.connect_timeout_s:g}"
    if (problem := check_state_dir(opts.state_dir)) is not None:
        return problem
    if opts.root_cert is not None:
        if opts.insecure:
            return "--root-cert and --insecure exclude each other: TLS needs the CA file, --insecure turns TLS off"
        if (problem := check_root_cert(opts.root_cert)) is not None:
            return problem
    elif not opts.insecure:
        return "pass --root-cert CA.pem (the CA file the coordinator gave you) or --insecure"
    if opts.cpu and opts.gpu is not None:
        return plan_device(opts.gpu, opts.cpu, 0)  # the conflict, before torch is imported
    count = cuda_count() if opts.gpu is not None else 0
    plan = plan_device(opts.gpu, opts.cpu, count, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if isinstance(plan, str):
        return plan
    if opts.data is not None and (problem := check_data(opts.data)) is not None:
        return problem
    return plan


# -- the connection ----------------------------------------------------------------------------------------


def tcp_reason(address: str, timeout_s: float = 2.0) -> str:
    """Why ``address`` may not answer, seen from here: refused, unresolved, timed out, or "accepts TCP"."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return "it accepts TCP connections but its Flower API did not answer"
    except ConnectionRefusedError:
        return "connection refused: nothing is listening there"
    except socket.gaierror:
        return f"the name {host!r} does not resolve"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s (a firewall, or the wrong host)"
    except OSError as exc:
        return exc.strerror or str(exc)


class ConnectWatch:
    """Follows the SuperNode's log until it connects; says when the coordinator cannot be reached and when to stop.

    Fed every log line (from the thread that copies the log); read from the supervising loop.
    """

    def __init__(
        self,
        coordinator: str,
        timeout_s: float,
        root_cert: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        reason: Callable[[str], str] = tcp_reason,
    ) -> None:
        self.coordinator, self.timeout_s, self.root_cert = coordinator, timeout_s, root_cert
        self.clock, self.reason = clock, reason
        self.started = clock()
        self.connected = False
        self.failures = 0
        self.first_failure: float | None = None
        self.tls = False
        self._announced = False

    def feed(self, line: str) -> None:
        # reached: connected, or a refused key (it got through TLS), or Flower gave up on an HTTP answer (it gives
        # up on TLS failures and HTTP errors only; an address nobody answers on is retried forever)
        reached = (CONNECTED_MARKER, REFUSED_KEY_MARKER) + (() if self.tls else (GAVE_UP_MARKER,))
        if any(marker in line for marker in reached):
            self.connected = True
        elif TLS_MARKER in line or RETRY_MARKER in line:
            self.tls = self.tls or TLS_MARKER in line
            self.failures += 1
            if self.first_failure is None:
                self.first_failure = self.clock()

    def _cause(self) -> str:
        if self.tls:
            return (
                "the TLS handshake failed: --root-cert is not the CA that signed the coordinator's certificate, "
                "or the certificate does not cover this address"
            )
        return self.reason(self.coordinator)

    def _doctor(self) -> str:
        cert = f" --root-cert {self.root_cert}" if self.root_cert is not None else ""
        return DOCTOR_HINT.format(address=self.coordinator, cert=cert)

    def news(self) -> str | None:
        """The console line to show once, when the first failed attempt is seen; else ``None``."""
        if self.connected or self.first_failure is None or self._announced:
            return None
        if not self.tls and self.clock() - self.first_failure < ANNOUNCE_AFTER_S:
            return None  # the SuperNode's own SuperExec logs the same line while the SuperNode's local API starts
        self._announced = True
        return (
            f"cannot reach the coordinator at {self.coordinator} yet ({self._cause()}); "
            f"retrying for up to {self.timeout_s:g} s (--connect-timeout)"
        )

    def verdict(self) -> str | None:
        """The error line once ``--connect-timeout`` passed without a connection, or at once after a TLS failure
        (the same CA and certificate fail the same way again); else ``None``."""
        if self.connected:
            return None
        if self.tls:
            return self.failure_line("(TLS, not retried)")
        if self.clock() - self.started < self.timeout_s:
            return None
        return self.failure_line(f"within {self.timeout_s:g} s (--connect-timeout)")

    def failure_line(self, when: str) -> str:
        return (
            f"could not reach the coordinator at {self.coordinator} {when}: {self._cause()}; "
            f"check the address and that the coordinator runs, or run: {self._doctor()}"
        )
