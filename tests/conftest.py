"""Shared fixtures: small campaign files that point at the repo's quickstart data and the tiny model.

Two tiers: ``tests/unit`` (fast, the edit-test loop: ``python -m pytest -q tests/unit``) and ``tests/e2e``
(whole campaigns, simulated and deployed on loopback), marked ``e2e`` here. CI runs both.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "experiments" / "data" / "python-docs.jsonl"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing can be downloaded here: the hub is unreachable in tests


def run_python(
    code: str, *args: str, memory_gib: int | None = None, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -c code ARGS`` in a fresh interpreter from the repo root (so import order is what is tested).

    ``memory_gib`` caps the child's address space: for tests of a bound on memory, where code without the bound
    fails with ``MemoryError`` instead of taking the test machine's memory with it.
    """

    def cap() -> None:
        if memory_gib is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_gib << 30, memory_gib << 30))

    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        preexec_fn=cap,
    )


def small_campaign(**sections: dict) -> dict:
    """A campaign small enough for tests; ``sections`` override keys per section."""
    cfg = {
        "campaign": {"name": "test", "seed": 0, "run_dir": "run"},
        "model": {"name": "builtin:tiny-llama"},
        "lora": {"mode": "ffa", "rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "data": {"source": str(DATA), "max_seq_len": 64, "eval_fraction": 0.05, "eval_max_examples": 32},
        "federation": {
            "rounds": 2,
            "contributors_per_round": 3,
            "min_cohort": 2,
            "local_steps": 3,
            "batch_size": 4,
            "learning_rate": 0.01,
        },
        "simulation": {"contributors": 3},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture
def write_campaign(tmp_path: Path) -> Callable[..., Path]:
    def write(name: str = "campaign.toml", raw: dict | None = None, **sections: dict) -> Path:
        path = tmp_path / name
        path.write_text(tomli_w.dumps(raw if raw is not None else small_campaign(**sections)))
        return path

    return write


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under ``tests/e2e`` is the end-to-end tier (``-m "not e2e"`` skips it)."""
    e2e = Path(__file__).resolve().parent / "e2e"
    for item in items:
        if e2e in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
