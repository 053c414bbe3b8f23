"""End to end: a simulation with more virtual contributors than Ray actors keeps each actor's model and shards
across rounds (``clients/workspace.py``), counted by the actors themselves in ``RUN/contributors/workspaces/``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedtune.rundir import RunDir

from ..conftest import small_campaign
from .conftest import Campaigns

CONTRIBUTORS, ACTORS, ROUNDS = 4, 2, 3


def test_actors_build_each_model_once_and_load_each_shard_once(campaigns: Campaigns) -> None:
    raw = small_campaign(
        federation={"rounds": ROUNDS, "contributors_per_round": CONTRIBUTORS, "local_steps": 2},
        simulation={"contributors": CONTRIBUTORS, "cpus_per_contributor": (os.cpu_count() or 2) / ACTORS},
    )
    run = campaigns.simulate("workspace-cache", raw)
    rows = RunDir(run).read_metrics()
    assert [r["participants"] for r in rows[1:]] == [CONTRIBUTORS] * ROUNDS
    stats = [json.loads(p.read_text()) for p in sorted(Path(run, "contributors", "workspaces").glob("*.json"))]
    assert 1 <= len(stats) <= ACTORS, stats
    trainings = sum(s["rounds"] for s in stats)
    built, loaded = sum(s["build_model"] for s in stats), sum(s["load_shard"] for s in stats)
    print(f"{trainings} trainings on {len(stats)} actors: {built} build_model, {loaded} load_shard")
    assert trainings == CONTRIBUTORS * ROUNDS
    assert built == len(stats), "one model per actor, kept across rounds and contributors"
    assert loaded <= len(stats) * CONTRIBUTORS and all(s["load_shard"] <= CONTRIBUTORS for s in stats)
    assert all(s["models_cached"] == 1 and s["shards_cached"] == s["load_shard"] for s in stats)
