"""Both sides run only the fedtune they installed: the app-bundle guard.

A Flower SuperNode runs whatever ClientApp code the app bundle (FAB) carries, placed first on the import path,
and a SuperLink's ServerApp runner does the same; Flower 1.42 has no flag that refuses unsigned bundles
(``--trusted-entities`` only knows Flower Hub signatures). So ``join`` and ``coordinate`` put a
``flwr-clientapp``/``flwr-serverapp`` shim first on the runner's PATH. The shim runs Flower's own runner
with one change: each bundle is checked by :func:`verify_fab` before it is installed, and a bundle that names
another app or carries code that differs from the installed fedtune is refused (nothing from it runs).

Threat: a coordinator (or anyone who can submit a run) shipping code to contributors. Pitfall: the check must
happen before ``install_from_fab`` unpacks anything, and must fail closed if Flower's runner changes shape.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import sys
import tomllib
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

COMPONENTS = {"clientapp": "fedtune.clients.app:app", "serverapp": "fedtune.server.app:app"}
"""The only apps fedtune runs: the ones in the installed fedtune (contributors guard ``clientapp``,
the coordinator guards ``serverapp``)."""

CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".pyd", ".pyw", ".so", ".dylib", ".dll", ".pth"})
"""Files in a bundle that Python could import or execute."""


class BundleRefused(Exception):
    """An app bundle that a contributor will not run."""


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
            raise BundleRefused(
                f"app bundle names {role} {component!r}; fedtune only runs the installed {COMPONENTS[role]}"
            )
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


def guarded_serverapp() -> None:
    """Entry point of the coordinator's ``flwr-serverapp`` shim: run only the installed ServerApp, and only
    with the coordinator session's run key in the environment (the ServerApp then runs only the signed run)."""
    import os

    from fedtune.deploy.runkey import RUN_KEY_ENV

    if not os.environ.get(RUN_KEY_ENV):
        sys.exit(f"fedtune: no {RUN_KEY_ENV} in the environment; the coordinator's ServerApp refuses to run")
    from flwr.superlink.cli.flwr_serverapp import flwr_serverapp

    # the package re-exports a function of the same name: take the module itself
    guard_runner(importlib.import_module("flwr.superlink.runtime.run_serverapp"), "serverapp")
    flwr_serverapp()


SHIM_TEMPLATE = """#!{python}
# Written by fedtune: runs Flower's {command}, refusing bundles that carry foreign code.
import sys
from {module} import {entry}
sys.exit({entry}())
"""

SHIM_ENTRIES = {"clientapp": "fedtune.deploy.bundle", "serverapp": "fedtune.deploy.bundle"}


def write_shim(bin_dir: Path, role: str = "clientapp") -> Path:
    """Write the guarded ``flwr-<role>`` into ``bin_dir`` (to be put first on the runner's PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    command = f"flwr-{role}"
    shim = bin_dir / command
    shim.write_text(
        SHIM_TEMPLATE.format(
            python=sys.executable, command=command, module=SHIM_ENTRIES[role], entry=f"guarded_{role}"
        ),
        encoding="utf-8",
    )
    shim.chmod(0o755)
    return shim
