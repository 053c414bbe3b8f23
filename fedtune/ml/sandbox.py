"""Run one generated program in a child process with resource limits: what pass@k executes model code with.

The child is ``python -I -S`` (isolated: no user site, no ``PYTHON*`` variables, no ``site`` import) started in a
fresh temporary directory with an almost empty environment and no stdin. Before the program runs, the child
itself sets its limits with ``resource.setrlimit``: address space (``memory_mb``), CPU seconds, file size
(1 MB), open files (64) and no core dumps. The parent kills the child's whole process group when the wall
clock passes ``timeout_s``. The temporary directory is removed afterwards.

Pitfalls: this bounds runaway or careless code (infinite loops, memory bombs, stray files); it is not a security
boundary against hostile code (no network, filesystem or syscall isolation). Run code evaluation of models you
do not trust inside a container or VM. ``RLIMIT_AS`` counts virtual memory, so too small a limit stops the
interpreter itself from starting (keep ``memory_mb`` ≥ 64).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FILE_SIZE_LIMIT = 1 << 20
OPEN_FILES_LIMIT = 64
_LAUNCHER = """\
import resource, runpy, sys
mem, cpu, fsize, nofile = (int(a) for a in sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
"""


@dataclass(frozen=True)
class RunResult:
    """How one program ended: ``passed`` (exit 0), ``failed`` (non-zero exit) or ``timeout`` (killed)."""

    status: str
    returncode: int | None
    wall_s: float
    stderr_tail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(code: str, timeout_s: float = 5.0, memory_mb: int = 512) -> RunResult:
    """Execute ``code`` as ``__main__`` in a limited child process; exit status 0 means it passed."""
    with tempfile.TemporaryDirectory(prefix="fedtune-sandbox-") as tmp:
        Path(tmp, "program.py").write_text(code, encoding="utf-8")
        Path(tmp, "launcher.py").write_text(_LAUNCHER, encoding="utf-8")
        limits = [memory_mb << 20, math.ceil(timeout_s) + 1, FILE_SIZE_LIMIT, OPEN_FILES_LIMIT]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "launcher.py", *map(str, limits)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills whatever it forked too
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            _, err = proc.communicate()
            status = "timeout"
        tail = err.decode("utf-8", "replace")[-500:] if err else ""
        return RunResult(status, proc.returncode, time.perf_counter() - start, tail)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
