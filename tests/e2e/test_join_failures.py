"""``fedtune join`` when the coordinator cannot be reached, and on Ctrl-C: a real ``flower-supernode`` on loopback.

Flower retries an unreachable SuperLink forever and logs only to ``supernode.log``; ``join`` must say so on its
console, give up after ``--connect-timeout`` with a non-zero exit, stop at once on a TLS/CA failure, and on Ctrl-C
stop the SuperNode and everything it started, exit 130. Each test is bounded (< 2 min on a busy 2-core machine).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedtune.clients.join import EXIT_INTERRUPTED, EXIT_UNREACHABLE
from fedtune.deploy.home import ensure_home
from fedtune.deploy.tls import ensure_tls

from .test_coordinator_attacks import _processes_mentioning
from .test_deployment import _env, free_port, stop_group, wait_for

JOIN_TIMEOUT_S = 150


def start_join(tmp_path: Path, coordinator: str, *flags: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``fedtune join`` in a session of its own; (process, its console log, its state dir)."""
    state, log = tmp_path / "state", tmp_path / "join.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedtune.cli",
                "join",
                "--coordinator",
                coordinator,
                "--state-dir",
                str(state),
                "--port",
                str(free_port()),
                "--benchmark-seconds",
                "0.1",
                *flags,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=_env(tmp_path / "flwr-home"),
            cwd=tmp_path,
            start_new_session=True,
        )
    return proc, log, state


@contextlib.contextmanager
def tls_listener(cert: Path, key: Path) -> Iterator[int]:
    """A TLS server on loopback that completes handshakes and nothing else (a coordinator with its certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(2)
                tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        done.set()
        thread.join(5)
        server.close()


def test_join_gives_up_when_nothing_listens(tmp_path: Path) -> None:
    """TLS with the right CA, but no coordinator at the address: a console line, then exit 5 after the timeout."""
    home = ensure_home(tmp_path / "coordinator-home", ["127.0.0.1"])
    address = f"127.0.0.1:{free_port()}"  # closed: nothing listens there
    proc, log, _ = start_join(tmp_path, address, "--root-cert", str(home.tls.ca), "--connect-timeout", "8")
    try:
        status = proc.wait(JOIN_TIMEOUT_S)
    finally:
        stop_group(proc)
    out = log.read_text(errors="replace")
    assert status == EXIT_UNREACHABLE, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert f"could not reach the coordinator at {address} within 8 s (--connect-timeout)" in errors[0]
    assert "connection refused" in errors[0] and f"fedtune doctor --coordinator {address}" in errors[0]


def test_join_reports_a_wrong_ca_at_once(tmp_path: Path) -> None:
    """The coordinator's certificate is signed by another CA than --root-cert: a TLS line and exit 5, no waiting."""
    coordinator = ensure_tls(tmp_path / "coordinator-tls", ["127.0.0.1"])
    other = ensure_tls(tmp_path / "other-tls", ["127.0.0.1"])
    with tls_listener(coordinator.cert, coordinator.key) as port:
        proc, log, _ = start_join(tmp_path, f"127.0.0.1:{port}", "--root-cert", str(other.ca))
        try:
            status = proc.wait(JOIN_TIMEOUT_S)  # the default --connect-timeout (120 s) is not waited for
        finally:
            stop_group(proc)
    out = log.read_text(errors="replace")
    assert status == EXIT_UNREACHABLE, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "TLS handshake failed" in errors[0] and "--root-cert" in errors[0], out
    assert "not accepted by the coordinator" not in out  # Flower's exit code 305 is not a refused key here


def test_ctrl_c_stops_join_and_its_supernode(tmp_path: Path) -> None:
    """SIGINT to join alone (not its group): the SuperNode and the resident worker are stopped, exit 130, a line
    says so."""
    proc, log, state = start_join(tmp_path, f"127.0.0.1:{free_port()}", "--insecure", "--connect-timeout", "600")
    try:
        supernode_log, worker_log = state / "supernode.log", state / "worker.log"
        wait_for(
            lambda: (
                supernode_log.exists()
                and "Starting Flower SuperNode" in supernode_log.read_text(errors="replace")
                and worker_log.exists()
                and " ready in " in worker_log.read_text(errors="replace")
            ),
            JOIN_TIMEOUT_S,
            "the SuperNode and the resident worker",
        )
        started = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "fedtune.clients.worker supernode" in names and "--runtime-api-address" in names, names
        os.kill(proc.pid, signal.SIGINT)
        status = proc.wait(60)
    finally:
        stop_group(proc)
    out = log.read_text(errors="replace")
    assert status == EXIT_INTERRUPTED, out
    assert "interrupted: the SuperNode is stopped" in out
    left = [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left
    assert not _processes_mentioning(str(state)), "a flower-supernode outlived join"


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path) -> Iterator[None]:
    yield
    for pid in _processes_mentioning(str(tmp_path)):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
