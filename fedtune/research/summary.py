"""One finished (or interrupted) run, condensed: the numbers a sweep table and a report compare.

Reads only the run directory: ``metrics.jsonl`` (loss, task metrics, ε, bytes, wall time per round) and
``config.toml`` (what was run). Pitfalls: a run interrupted before round 0 has no metrics (``rounds_done`` is
-1 and the numbers are None); task metrics are taken from the last round that computed them, which is the last
round whenever the campaign finished.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedtune.rundir import RunDir


@dataclass
class RunSummary:
    """What a run achieved and cost."""

    run: str
    name: str
    planned_rounds: int
    rounds_done: int
    eval_loss_initial: float | None
    eval_loss_final: float | None
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    epsilon_max: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0
    eval_loss_def: str = ""

    @property
    def complete(self) -> bool:
        return self.rounds_done >= self.planned_rounds

    @property
    def loss_drop(self) -> float | None:
        if self.eval_loss_initial is None or self.eval_loss_final is None:
            return None
        return self.eval_loss_initial - self.eval_loss_final

    @property
    def loss_drop_pct(self) -> float | None:
        drop = self.loss_drop
        return None if drop is None or not self.eval_loss_initial else 100.0 * drop / self.eval_loss_initial

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "complete": self.complete,
            "loss_drop": self.loss_drop,
            "loss_drop_pct": self.loss_drop_pct,
            "bytes_total": self.bytes_up + self.bytes_down,
        }


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` places, missing values as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved campaign as a plain dict ({} if the run has none)."""
    path = Path(run_dir) / "config.toml"
    return tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def summarize(run_dir: str | Path) -> RunSummary:
    """Condense ``run_dir`` (a fedtune run directory) into a :class:`RunSummary`."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    rows = RunDir(run_dir).read_metrics()
    tasks: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get("tasks"):
            tasks = row["tasks"]
    eps = [float(r["epsilon_max"]) for r in rows if r.get("epsilon_max") is not None]
    return RunSummary(
        run=str(run_dir),
        name=str(cfg.get("campaign", {}).get("name", run_dir.name)),
        planned_rounds=int(cfg.get("federation", {}).get("rounds", 0)),
        rounds_done=int(rows[-1]["round"]) if rows else -1,
        eval_loss_initial=float(rows[0]["eval_loss"]) if rows else None,
        eval_loss_final=float(rows[-1]["eval_loss"]) if rows else None,
        tasks=tasks,
        epsilon_max=max(eps) if eps else None,
        bytes_up=sum(int(r.get("bytes_up") or 0) for r in rows),
        bytes_down=sum(int(r.get("bytes_down") or 0) for r in rows),
        wall_s=sum(float(r.get("wall_s") or 0.0) for r in rows),
        eval_loss_def=str(rows[-1].get("eval_loss_def", "")) if rows else "",
    )


def flatten(cfg: dict[str, Any]) -> dict[str, Any]:
    """``{"lora": {"rank": 8}}`` -> ``{"lora.rank": 8}`` (lists and task tables stay whole)."""
    return {f"{section}.{key}": value for section, values in cfg.items() for key, value in values.items()}


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The ``section.key`` names whose values differ between runs (paths to the run itself left out)."""
    flat = [flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f} - {"campaign.run_dir", "campaign.name"})
    return [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
