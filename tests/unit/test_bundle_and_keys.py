"""The bundle guard accepts only the installed fedtune's code; contributor keys persist and are private."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.deploy.bundle import COMPONENTS, BundleRefused, verify_fab
from fedtune.deploy.home import approve, ensure_home
from fedtune.deploy.keys import ensure_keys, read_allow_list

from ..bundles import fab, installed_source, pyproject_text


def test_verify_fab_accepts_only_installed_code() -> None:
    minimal = fab({"pyproject.toml": pyproject_text(COMPONENTS["serverapp"]).encode()})
    verify_fab(minimal)
    verify_fab(minimal, "serverapp")
    same = fab(
        {
            "pyproject.toml": pyproject_text(COMPONENTS["serverapp"]).encode(),
            "fedtune/clients/app.py": installed_source("app"),
            "README.md": b"docs are fine",
        }
    )
    verify_fab(same)
    cases = {
        "differs": {"fedtune/clients/app.py": installed_source("app") + b"\nprint('extra')\n"},
        "not part of the installed": {"fedtune/clients/helper.py": b"x = 1\n"},
        "compiled": {"fedtune/clients/app.cpython-311-x86_64-linux-gnu.so": b"\x7fELF"},
    }
    for expected, files in cases.items():
        with pytest.raises(BundleRefused, match=expected):
            verify_fab(fab({"pyproject.toml": pyproject_text(COMPONENTS["serverapp"]).encode(), **files}))
    with pytest.raises(BundleRefused, match="names clientapp"):
        verify_fab(fab({"pyproject.toml": pyproject_text("x:app", "evil.client:app").encode()}))
    with pytest.raises(BundleRefused, match="names serverapp"):
        verify_fab(fab({"pyproject.toml": pyproject_text("probe_server:app").encode()}), "serverapp")


def test_keys_survive_a_restart(tmp_path: Path) -> None:
    first = ensure_keys(tmp_path / "state", "alice")
    again = ensure_keys(tmp_path / "state", "alice")
    assert first.contributor_id == again.contributor_id and first.public_line == again.public_line
    assert first.public_line.startswith("ecdsa-sha2-nistp384 ")
    assert oct((tmp_path / "state" / "supernode.key").stat().st_mode & 0o777) == "0o600"
    home = ensure_home(tmp_path / "home", ["127.0.0.1"])
    approve(first.auth_public, home.root, "alice")
    approve(first.auth_public, home.root, "alice")  # idempotent
    assert [e.name for e in read_allow_list(home.allow_file)] == ["alice"]
