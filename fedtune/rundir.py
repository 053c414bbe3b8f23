"""The run directory that a campaign writes and later tools read.

Layout::

    config.toml            the resolved campaign config
    metrics.jsonl          one JSON object per round (round 0 = the initial adapter)
    adapter/               the latest shared adapter, PEFT format
    checkpoints/round-N/   the shared adapter after round N

Every file and folder is written through :mod:`fedtune.files` (temporary name, then rename), so a crash
leaves the previous complete version, never a half-written one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.files import atomic_write_text

LEDGER_FILENAME = "ledger.sqlite"
"""The run's embedded credit ledger (SQLite) unless ``[credit] db`` names another database."""


def fresh_run_dir(requested: Path) -> Path:
    """``requested`` if it is free, else the first free ``requested-2``, ``requested-3``, …"""
    candidate, n = requested, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = requested.with_name(f"{requested.name}-{n}")
    return candidate


class RunDir:
    """Paths and writers of one campaign run."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    def checkpoint(self, server_round: int) -> Path:
        return self.root / "checkpoints" / f"round-{server_round}"

    def contributor_state(self, contributor: str) -> Path:
        return self.root / "contributors" / contributor

    def create(self, config_toml: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, config_toml)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text(encoding="utf-8").splitlines() if line]

    def append_metrics(self, row: dict[str, Any]) -> None:
        rows = [r for r in self.read_metrics() if r.get("round") != row.get("round")] + [row]
        atomic_write_text(self.metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
