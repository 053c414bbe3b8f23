"""README's two commands stay true: CI runs the second one verbatim, the first names the quickstart."""

from __future__ import annotations

import re

from ..conftest import REPO


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text(encoding="utf-8"))[:2]


def test_ci_runs_readme_test_command() -> None:
    quickstart, tests = readme_commands()
    assert tests in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "pytest" in tests


def test_quickstart_command_names_an_existing_campaign() -> None:
    quickstart, _ = readme_commands()
    match = re.search(r"fedtune simulate (\S+)", quickstart)
    assert match and (REPO / match.group(1)).is_file()
