"""``fedtune doctor``: check that this machine can coordinate or contribute, with a fix for each failure.

Contributors are community members on home PCs; a failed join should end with a line that says what to
do, not a traceback. Each check prints ``ok`` or ``FAIL`` plus a ``fix:`` line; the exit status is 1 if
any check failed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

FLWR_VERSION = "1.42.0"
MODULES = (
    "fedtune.config",
    "fedtune.clients.app",
    "fedtune.server.app",
    "fedtune.clients.join",
    "fedtune.server.coordinator",
    "flwr",
    "torch",
    "transformers",
    "peft",
    "opacus",
    "cryptography",
)
EXECUTABLES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr", "flwr-clientapp")


@dataclass
class Check:
    """One check's outcome: ``fix`` says what to do when it failed."""

    name: str
    ok: bool
    detail: str = ""
    fix: str = ""


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", ok, sys.version.split()[0], "" if ok else "install Python 3.11 or newer")


def check_imports() -> list[Check]:
    out = []
    for name in MODULES:
        try:
            importlib.import_module(name)
            out.append(Check(f"import {name}", True))
        except Exception as exc:  # noqa: BLE001 - any import failure is a finding, not a crash
            out.append(
                Check(
                    f"import {name}",
                    False,
                    f"{type(exc).__name__}: {exc}",
                    "pip install -e . (from the fedtune checkout) or pip install fedtune",
                )
            )
    return out


def check_versions() -> list[Check]:
    out = []
    try:
        flwr = importlib.metadata.version("flwr")
        out.append(
            Check(
                "flwr version",
                flwr == FLWR_VERSION,
                flwr,
                ""
                if flwr == FLWR_VERSION
                else f"pip install 'flwr[simulation]=={FLWR_VERSION}' (the contributor's code guard is written for it)",
            )
        )
    except importlib.metadata.PackageNotFoundError:
        out.append(Check("flwr version", False, "not installed", f"pip install 'flwr[simulation]=={FLWR_VERSION}'"))
    try:
        out.append(Check("fedtune version", True, importlib.metadata.version("fedtune")))
    except importlib.metadata.PackageNotFoundError:
        out.append(Check("fedtune version", False, "not installed as a distribution", "pip install -e ."))
    return out


def check_executables() -> list[Check]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return [
        Check(
            f"executable {exe}",
            shutil.which(exe, path=path) is not None,
            shutil.which(exe, path=path) or "",
            f"reinstall flwr in this environment: pip install --force-reinstall 'flwr=={FLWR_VERSION}'",
        )
        for exe in EXECUTABLES
    ]


def check_torch(gpu: int | None) -> list[Check]:
    try:
        import torch
    except ImportError as exc:
        return [Check("torch", False, str(exc), "pip install torch")]
    out = [Check("torch", True, f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")]
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    if gpu is None:
        out.append(Check("GPU", True, f"{count} CUDA device(s) visible" if cuda else "none visible; join uses the CPU"))
        return out
    if not cuda:
        fix = (
            "install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu124)"
            if not torch.version.cuda
            else "check the NVIDIA driver with nvidia-smi, and CUDA_VISIBLE_DEVICES"
        )
        out.append(Check(f"GPU {gpu}", False, "CUDA not available to torch", fix))
    elif gpu >= count:
        out.append(
            Check(
                f"GPU {gpu}",
                False,
                f"only {count} device(s) visible",
                f"pass --gpu between 0 and {count - 1}, or check CUDA_VISIBLE_DEVICES",
            )
        )
    else:
        props = torch.cuda.get_device_properties(gpu)
        out.append(
            Check(
                f"GPU {gpu}",
                True,
                f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute {props.major}.{props.minor}",
            )
        )
    return out


def check_coordinator(address: str, timeout_s: float = 5.0) -> Check:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return Check("coordinator", False, f"{address!r} is not HOST:PORT", "pass --coordinator HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return Check(f"coordinator {address}", True, "TCP connection accepted")
    except OSError as exc:
        return Check(
            f"coordinator {address}",
            False,
            str(exc),
            "check the address with the coordinator, that `fedtune coordinate` is running, and that "
            "the port is open in their firewall (and not blocked by yours)",
        )


def run_doctor(coordinator: str | None = None, gpu: int | None = None, out: TextIO = sys.stdout) -> int:
    """Run every check, print the results, return 1 if any failed."""
    steps: list[Callable[[], Check | list[Check]]] = [
        check_python,
        check_imports,
        check_versions,
        check_executables,
        lambda: check_torch(gpu),
    ]
    if coordinator:
        steps.append(lambda: check_coordinator(coordinator))
    failed = 0
    for step in steps:
        result = step()
        for check in result if isinstance(result, list) else [result]:
            mark = "ok  " if check.ok else "FAIL"
            print(f"[{mark}] {check.name}" + (f": {check.detail}" if check.detail else ""), file=out)
            if not check.ok:
                failed += 1
                print(f"       fix: {check.fix}", file=out)
    print("all checks passed" if not failed else f"{failed} check(s) failed", file=out)
    return 1 if failed else 0
