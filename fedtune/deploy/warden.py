"""A process that runs one command and takes everything it started down with it, whatever kills the supervisor.

``fedtune coordinate`` runs each Flower process (the SuperLink, the SuperExec and the ``flwr-serverapp``
processes the SuperExec launches) under a warden: ``python -m fedtune.deploy.warden GRACE_S -- CMD ...``,
started in a session of its own with a pipe from the supervisor on its stdin. The warden

- starts CMD in its own process group (the warden's), with ``PR_SET_PDEATHSIG`` so CMD dies if the warden does;
- is a child subreaper (``PR_SET_CHILD_SUBREAPER``): a grandchild whose parent dies is re-parented to the
  warden, not to init, so nothing CMD started can slip out of its reach, even in another session;
- stops when the supervisor asks (SIGTERM/SIGINT), when the supervisor dies (its stdin reaches end of file:
  the kernel closes the pipe whatever killed the supervisor, SIGKILL included), or when CMD exits;
- then sends SIGTERM to its process group and every descendant, waits up to GRACE_S for them to go, sends
  SIGKILL to whatever is left, reaps, and exits with CMD's status.

Threat: none from outside; the adversary is a stopped or killed coordinator leaving a SuperLink that keeps
serving, or a ServerApp that keeps sending a campaign. Pitfalls: Flower's processes detach (own session,
``--parent-pid`` polling that takes seconds), so a process-group kill from the supervisor misses them; the
warden must never hold the pipe's write end (only the supervisor does) or it would never see end of file; it
imports nothing beyond the standard library, so it starts in milliseconds. Linux only (``/proc``, ``prctl``);
elsewhere it falls back to stopping its process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def _process_table() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live, non-zombie process (Linux ``/proc``; empty elsewhere)."""
    table = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            table.append((int(entry.name), int(fields[1]), int(fields[2])))
    return table


def descendants(*roots: int) -> set[int]:
    """Pids of every live process below any of ``roots`` (one read of the process table)."""
    children: dict[int, list[int]] = {}
    for pid, ppid, _group in _process_table():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _others() -> set[int]:
    """Every live process the warden answers for: its descendants and its process group, itself excluded."""
    me, group = os.getpid(), os.getpgrp()
    return (descendants(me) | {pid for pid, _ppid, g in _process_table() if g == group}) - {me}


def _signal_all(sig: int) -> None:
    for pid in _others():
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _reap() -> dict[int, int]:
    """Collect every exited child (re-parented orphans included); pid -> exit status."""
    done: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done[pid] = os.waitstatus_to_exitcode(status)


def run(grace_s: float, cmd: list[str]) -> int:
    """Run ``cmd`` until it exits or the supervisor goes; stop everything it started; return its status."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    stop = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, request_stop)

    def child_setup() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)

    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=child_setup)
    except OSError as exc:
        print(f"error: cannot start {cmd[0]}: {exc}", file=sys.stderr)
        return 127
    status: int | None = None
    watch = sys.stdin.fileno()
    while not stop and status is None:
        try:
            readable, _, _ = select.select([watch], [], [], 0.2)
        except InterruptedError:
            readable = []
        if readable and not os.read(watch, 4096):
            break  # the supervisor is gone
        status = _reap().get(proc.pid, status)
    _signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _others() and time.monotonic() < deadline:
        status = _reap().get(proc.pid, status)
        time.sleep(0.1)
    deadline = time.monotonic() + 5.0
    while _others() and time.monotonic() < deadline:
        _signal_all(signal.SIGKILL)
        time.sleep(0.05)
        status = _reap().get(proc.pid, status)
    status = _reap().get(proc.pid, status)
    if status is None:
        return 0
    return 128 - status if status < 0 else status


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m fedtune.deploy.warden GRACE_S -- CMD [ARG ...]", file=sys.stderr)
        return 2
    return run(float(args[0]), args[2:])


if __name__ == "__main__":
    sys.exit(main())
