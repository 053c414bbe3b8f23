"""Ctrl-C (and SIGTERM) for long-running commands: stop within seconds, children included, and say how to carry on.

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
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RAY_FAILURE_HANDLER_ENV = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"


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
    """While inside: on SIGINT or SIGTERM print ``farewell()``, stop every descendant, exit 128 + the signal.

    SIGTERM is what a batch scheduler, ``systemd`` or ``kill`` sends; it gets the same clean stop as Ctrl-C. Ray
    would otherwise take it over: ``ray.init`` replaces the SIGTERM handler of the process that starts it with one
    that raises ``SystemExit``, which unwinds the main thread while Flower's ServerApp thread waits on for replies
    from actors that are gone (the process hangs at interpreter shutdown), and its C++ failure-signal handler dumps
    a stack trace. So, inside, Ray's ``set_sigterm_handler`` does nothing and ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER``
    is set.
    """
    become_subreaper()

    def handler(signum: int, _frame: object) -> None:
        for sig in STOP_SIGNALS:  # a second signal must not interrupt the stopping
            signal.signal(sig, signal.SIG_IGN)
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

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    with _ray_keeps_off_sigterm():
        try:
            yield
        finally:
            for sig, before in previous.items():
                signal.signal(sig, before)


@contextlib.contextmanager
def _ray_keeps_off_sigterm() -> Iterator[None]:
    """Ray's ``set_sigterm_handler`` a no-op and its failure-signal handler off while inside (if Ray is installed)."""
    env_before = os.environ.get(RAY_FAILURE_HANDLER_ENV)
    os.environ[RAY_FAILURE_HANDLER_ENV] = "1"
    try:
        import ray._private.utils as ray_utils
    except ImportError:
        ray_utils = None
    setter = getattr(ray_utils, "set_sigterm_handler", None)
    if setter is not None:
        ray_utils.set_sigterm_handler = lambda _handler: None
    try:
        yield
    finally:
        if setter is not None:
            ray_utils.set_sigterm_handler = setter
        if env_before is None:
            os.environ.pop(RAY_FAILURE_HANDLER_ENV, None)
        else:
            os.environ[RAY_FAILURE_HANDLER_ENV] = env_before
