"""App bundles (FABs) for tests of the bundle guard: a pyproject naming the apps, a zip of files, installed code."""

from __future__ import annotations

import zipfile
from pathlib import Path

from fedtune.deploy.bundle import COMPONENTS


def pyproject_text(serverapp: str, clientapp: str = COMPONENTS["clientapp"]) -> str:
    return (
        f'[project]\nname = "probe"\nversion = "1.0.0"\ndependencies = []\n\n[tool.flwr.app]\n'
        f'publisher = "test"\n\n[tool.flwr.app.components]\nserverapp = "{serverapp}"\n'
        f'clientapp = "{clientapp}"\n\n[tool.flwr.app.config]\nout = ""\n'
    )


def fab(files: dict[str, bytes]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(".info/CONTENT", "")
    return buf.getvalue()


def installed_source(module_file: str) -> bytes:
    import fedtune.clients.app as client_app

    return Path(client_app.__file__).read_bytes() if module_file == "app" else b""
