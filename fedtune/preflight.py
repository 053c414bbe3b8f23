"""Preflight: everything about a campaign that can be checked before anything is written or started.

The CLI (``simulate``) and the coordinator launcher run it before they create a run dir, so bad input ends
in one ``error:`` line and exit code 2 with nothing on disk.
"""

from __future__ import annotations

from typing import Any

from fedtune.config import CampaignConfig, ConfigError, load_config


def validate_campaign(path: str, overrides: dict[str, dict[str, Any]] | None = None) -> CampaignConfig:
    """Everything that can be checked before work starts: the file, the model files, the data fields."""
    from fedtune.ml.data import DataError, load_raw, split_eval

    cfg = load_config(path, overrides)
    try:
        split_eval(cfg, load_raw(cfg.data))
    except DataError as exc:
        raise ConfigError(path, "[data] source", str(exc).split(": ", 1)[-1]) from None
    return cfg
