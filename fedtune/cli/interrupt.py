"""Ctrl-C for long-running commands: stop within seconds, children included, and say how to carry on.

A terminal sends SIGINT to the whole foreground process group: the fedtune process, and Ray's GCS server,
raylet, agents and workers that ``fedtune simulate`` started. Left to themselves, Flower's simulation engine
keeps the ServerApp thread running rounds, Ray's processes die in some arbitrary order (its agents outlive
the raylet that started them), and a second Ctrl-C ends in a ``KeyboardInterrupt`` traceback.
:func:`stop_on_interrupt` replaces that with: one line telling the user how to continue, every descendant
process terminated (then killed), exit status 130.

Why a hard exit is safe: everything fedtune writes goes through :mod:`fedtune.files` (temporary name, then
rename) or an SQLite transaction, so a process that stops between two instructions leaves the last complete
round on disk, which ``--resume`` continues from.

Pitfalls: orphans are only found if this process is their subreaper (``PR_SET_CHILD_SUBREAPER``, Linux), so
it becomes one before it starts children; the handler must not take locks the interrupted thread may hold
(no logging, no rich), hence plain writes to stderr and ``os._exit``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterator

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux), so they can still be found and stopped; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def stop_descendants(grace_s: float = 2.0, rounds: int = 3) -> None:
    """SIGTERM every descendant process, SIGKILL those still there after ``grace_s``; repeat for adopted orphans."""
    import psutil

    me = psutil.Process()
    for _ in range(rounds):
        try:
            procs = me.children(recursive=True)
        except psutil.Error:
            return
        if not procs:
            return
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=1.0)


@contextlib.contextmanager
def stop_on_interrupt(farewell: Callable[[], str]) -> Iterator[None]:
    """While inside: on SIGINT print ``farewell()``, stop every descendant, exit 130.

    SIGTERM is left alone: ``ray.init`` installs its own handler for it in the driver.
    """
    become_subreaper()

    def handler(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the stopping
        try:
            line = farewell()
        except Exception as exc:  # the farewell reads the run dir; never let it hide the exit
            line = f"interrupted ({exc})"
        try:
            stop_descendants()
        finally:
            show_cursor = "\x1b[?25h" if sys.stderr.isatty() else ""
            os.write(sys.stderr.fileno(), f"{show_cursor}\n{line}\n".encode())
            os._exit(128 + signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
