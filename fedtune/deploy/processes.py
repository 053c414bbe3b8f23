"""Child processes of ``coordinate`` and ``join`` (SuperLink, SuperNode): start, watch, stop, leave nothing behind.

Both commands supervise a Flower process for hours and must stop it on Ctrl-C or SIGTERM without leaving it
(or its children) running. One implementation here, so both sides stop the same way: SIGTERM first (Flower
shuts down cleanly and keeps its database consistent), SIGKILL after a grace period; on Linux the child also
gets SIGTERM if its supervisor dies (``PR_SET_PDEATHSIG``).

Flower processes that start processes of their own (the SuperLink's SuperExec and its ``flwr-serverapp``
detach into sessions of their own) run under a warden instead (:func:`start_warded`, :mod:`fedtune.deploy.warden`):
it outlives a SIGKILLed supervisor just long enough to stop everything below it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class ProcessError(RuntimeError):
    """A supervised process failed to start or to come up; the message is for the person at the console."""


def venv_path() -> str:
    """PATH with this interpreter's scripts folder first (the ``flower-*`` executables live there)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def die_with_parent() -> None:
    """``preexec_fn`` of a child (Linux): get SIGTERM when the supervisor dies, so no orphan is left."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def preexec() -> object | None:
    """The ``preexec_fn`` to pass to :class:`subprocess.Popen` on this platform."""
    return die_with_parent if sys.platform.startswith("linux") else None


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 15.0) -> int | None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns the exit status (None if never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def stop_requested() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while the block runs; the previous handlers come back afterwards."""
    stop = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda _signum, _frame: stop.set())
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections; :class:`ProcessError` if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ProcessError(f"{Path(str(proc.args[0])).name} exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.3)
    raise ProcessError(f"nothing is listening on {host}:{port} after {timeout_s:.0f} s")


def start_warded(
    cmd: list[str], env: dict[str, str], log: Path, cwd: Path, grace_s: float = 20.0
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` under a warden (:mod:`fedtune.deploy.warden`) in a session of its own; output goes to ``log``.

    The returned process is the warden; this process keeps the write end of its stdin, so the warden stops
    ``cmd`` and everything it started when this process exits, however it exits. Stop it with :func:`stop_warded`.
    """
    with Path(log).open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedtune.deploy.warden", str(grace_s), "--", *cmd],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def stop_warded(proc: subprocess.Popen[bytes] | None, grace_s: float = 20.0) -> int | None:
    """Ask a warden to stop its command (SIGTERM); if it has not exited after ``grace_s`` + 10 s, kill its group."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s + 10.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    return proc.returncode
