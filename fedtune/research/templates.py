"""Domain templates for ``fedtune init DIR --template NAME``: campaign files shaped like FlowerTune's challenges.

Each template (``templates/NAME.toml``, shipped as package data) names a hub base model and a hub dataset,
an evaluation with task metrics on a standard benchmark, DP-SGD and SecAgg+ on, and fedtune's measured defaults
(FFA-LoRA at twice the rank FlowerTune's A+B LoRA uses). ``init`` writes the file as it is, so its comments
survive; ``--model``/``--data`` replace the base and the training source (local stand-ins, a mirror) in the
text itself. Pitfalls: nothing is downloaded here, so the hub ids are only checked when the campaign is
validated on a machine that can reach the hub (``fedtune simulate`` does that before writing anything).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from fedtune.config import ConfigError
from fedtune.files import atomic_write_text

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
CAMPAIGN_FILE = "campaign.toml"


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.toml"))


def template_text(name: str) -> str:
    path = TEMPLATE_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError("--template", "--template", f"one of {template_names()}", name)
    return path.read_text(encoding="utf-8")


def _replace_key(text: str, section: str, key: str, value: str) -> str:
    """Set ``key`` of ``[section]`` to the TOML string ``value``, keeping every comment of the template."""
    pattern = re.compile(rf"(^\[{re.escape(section)}\]\n(?:(?!^\[).*\n)*?){re.escape(key)} = [^\n]*", re.M)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    new, count = pattern.subn(lambda m: f'{m.group(1)}{key} = "{escaped}"', text, count=1)
    if count != 1:
        raise ValueError(f"template has no [{section}] {key}")
    return new


def render_template(name: str, model: str | None = None, data: str | None = None, campaign: str | None = None) -> str:
    """The template's text with the given base model, training source and campaign name filled in."""
    text = template_text(name)
    for section, key, value in (("model", "name", model), ("data", "source", data), ("campaign", "name", campaign)):
        if value:
            text = _replace_key(text, section, key, value)
    tomllib.loads(text)  # still valid TOML
    return text


def write_template(
    folder: Path, name: str, model: str | None = None, data: str | None = None, force: bool = False
) -> Path:
    """Write ``folder/campaign.toml`` from template ``name``; an existing file is kept unless ``force``."""
    target = Path(folder) / CAMPAIGN_FILE
    if target.exists() and not force:
        raise ConfigError(target, "(file)", "a folder without a campaign.toml (or --force)", "an existing campaign")
    atomic_write_text(target, render_template(name, model, data))
    return target
