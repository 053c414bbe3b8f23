"""SecAgg+ in whole simulated campaigns: same learning curve as plain FedAvg, dropouts survived, aborts harmless.

Crashing contributors are played by test code only: ``faulty_contributors.py`` runs the campaign with fedtune's
ClientApp wrapped in one that raises in the given stages (``STAGE:PARTITION:ROUND``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtune.credit.ledger import Ledger, default_url
from fedtune.identity import simulated_contributor_id
from fedtune.rundir import RunDir
from fedtune.strategies.secure import REGISTRY_FILE

from ..conftest import small_campaign
from .conftest import Campaigns

SECURE = {"protocol": "secagg+"}
FOUR = {"simulation": {"contributors": 4}, "federation": {"contributors_per_round": 4, "rounds": 3}}
# round 1: partition 2 crashes while masking; round 2: partitions 1-3 crash, leaving 1 < t = 2; round 3: all fine
FAULTS = ["masked_input:2:1", "masked_input:1:2", "masked_input:2:2", "masked_input:3:2"]


@pytest.fixture(scope="module")
def secure_run(campaigns: Campaigns) -> Path:
    return campaigns.simulate("secure", small_campaign(secure_aggregation=SECURE))


@pytest.fixture(scope="module")
def failing_run(campaigns: Campaigns) -> Path:
    config = campaigns.write("failing", small_campaign(secure_aggregation=SECURE, **FOUR))
    run = campaigns.root / "failing"
    script = Path(__file__).with_name("faulty_contributors.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(config), str(run), *FAULTS], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return run


def ledger_round(run: Path, server_round: int) -> dict[str, object]:
    """Ledger entries of a round keyed by partition id (virtual contributors' ids are derived from it)."""
    ids = {simulated_contributor_id("test", p): p for p in range(4)}
    with Ledger.open(default_url(run)) as ledger:
        return {ids[e.contributor_id]: e for e in ledger.round_entries("test", server_round)}


def n_trainable(run: Path) -> int:
    from fedtune.config import load_config
    from fedtune.ml.model import build_model

    model, _ = build_model(load_config(run / "config.toml"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- whole campaigns -------------------------------------------------------------------------------


def test_secure_campaign_reproduces_the_plain_learning_curve(plain_run: Path, secure_run: Path) -> None:
    plain, secure = RunDir(plain_run).read_metrics(), RunDir(secure_run).read_metrics()
    assert [r["round"] for r in secure] == [0, 1, 2]
    for p, s in zip(plain, secure, strict=True):
        assert s["eval_loss"] == pytest.approx(p["eval_loss"], rel=1e-3), (p, s)
    assert secure[-1]["eval_loss"] < secure[0]["eval_loss"]
    n = n_trainable(secure_run)
    for r in secure[1:]:
        assert r["secure_aggregation"] and r["applied"] and r["survivors"] == r["participants"] == 3
        # uint32 masked upload: 4 bytes a parameter (+ the weight coordinate, + the array header)
        assert 3 * 4 * (n + 1) <= r["bytes_up"] <= 3 * (4 * (n + 1) + 256)
        assert r["train_loss"] == pytest.approx(plain[r["round"]]["train_loss"], rel=1e-4)
    assert all(e.status == "included" and e.credit > 0 for e in ledger_round(secure_run, 2).values())
    pins = json.loads((secure_run / REGISTRY_FILE).read_text())["identities"]
    assert len(pins) == 3 and all(len(bytes.fromhex(p["key"])) == 32 for p in pins.values())


def test_dropout_mid_round_completes_with_survivors_and_credits_only_them(failing_run: Path) -> None:
    row = RunDir(failing_run).read_metrics()[1]
    assert row["applied"] and row["survivors"] == row["participants"] == 3 and row["failed"] == 1
    assert row["eval_loss"] < RunDir(failing_run).read_metrics()[0]["eval_loss"]
    entries = ledger_round(failing_run, 1)
    assert {p: e.status for p, e in entries.items()} == {0: "included", 1: "included", 2: "failed", 3: "included"}
    assert "masked_input" in entries[2].reason and "injected fault" in entries[2].reason and entries[2].credit == 0
    assert all(entries[p].credit > 0 for p in (0, 1, 3))


def test_too_few_survivors_fail_the_round_cleanly_and_the_campaign_goes_on(failing_run: Path) -> None:
    rows = RunDir(failing_run).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    aborted = rows[2]
    assert not aborted["applied"] and aborted["participants"] == 0 and aborted["survivors"] == 1
    assert "threshold" in aborted["abort_reason"]
    assert aborted["eval_loss"] == rows[1]["eval_loss"]  # nothing applied
    from safetensors.numpy import load_file

    one, two = (load_file(failing_run / "checkpoints" / f"round-{r}" / "adapter_model.safetensors") for r in (1, 2))
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert all(e.status != "included" and e.credit == 0 for e in ledger_round(failing_run, 2).values())
    assert rows[3]["applied"] and rows[3]["participants"] == 4 and rows[3]["eval_loss"] < rows[1]["eval_loss"]
