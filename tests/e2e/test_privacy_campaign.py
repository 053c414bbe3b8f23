"""DP in a whole simulated campaign: a contributor with a small personal budget declines once the next round
would pass it, keeps declining after its processes are restarted, never reports ε above it (on the coarse grid ε
leaves a contributor on), and the campaign completes with the others."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import tomli_w

from fedtune.config import CampaignConfig
from fedtune.ml.data import load_shard
from fedtune.ml.model import load_base
from fedtune.privacy import ContributorPrivacy, PrivacyParams, coarse_epsilon
from fedtune.rundir import RunDir

from ..conftest import small_campaign
from .conftest import Campaigns

PRIVACY = {"mechanism": "dp-sgd", "target_epsilon": 8.0, "max_grad_norm": 1.0, "planned_rounds": 4}


def budget_between_round_one_and_two(raw: dict) -> float:
    """A personal ε cap that allows exactly one round for virtual contributor 0, computed independently."""
    cfg = CampaignConfig.from_dict(raw)
    _, tokenizer = load_base(cfg.model)
    shard = load_shard(cfg, tokenizer, 0, cfg.simulation.contributors)
    params = PrivacyParams.from_campaign(cfg.privacy, campaign_rounds=cfg.federation.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        acct = ContributorPrivacy.load(
            tmp,
            params,
            shard_size=len(shard),
            batch_size=cfg.federation.batch_size,
            local_steps=cfg.federation.local_steps,
        )
        steps = cfg.federation.local_steps
        one, two = acct.epsilon_after(steps), acct.epsilon_after(2 * steps)
    assert one < two
    return (one + two) / 2


def test_personal_budget_is_never_exceeded_across_restarts(tmp_path: Path, campaigns: Campaigns) -> None:
    raw = small_campaign(privacy=PRIVACY, federation={"rounds": 2})
    cap = budget_between_round_one_and_two(raw)
    raw["privacy"]["personal_max_epsilon"] = {"0": cap}
    config = tmp_path / "dp.toml"
    config.write_text(tomli_w.dumps(raw))
    run = tmp_path / "run"
    campaigns.simulate("dp-cap", config=config, run_dir=run)
    campaigns.simulate(
        "dp-cap", None, "--resume", "--rounds", "3", config=config, run_dir=run
    )  # new processes: state comes back from disk only

    rows = RunDir(run).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    spent = [r["epsilon"]["sim-000"] for r in rows[1:]]
    assert spent[0] == pytest.approx(spent[-1]) and max(spent) <= coarse_epsilon(cap)  # trained once, then declined
    assert all(e == coarse_epsilon(e) for e in spent)  # ε leaves on its coarse grid only
    assert [r["declined"] for r in rows[1:]] == [0, 1, 1]
    assert all(r["applied"] and r["participants"] == 2 for r in rows[2:])  # the others carried the campaign
    others = [r["epsilon"]["sim-001"] for r in rows[1:]]
    assert others == sorted(others) and others[-1] > others[0] and others[-1] <= 8.0
    state = run / "contributors"
    assert len(list(state.glob("*/privacy.json"))) == 3
    exact = json.loads((state / "sim-000" / "privacy.json").read_text())["epsilon_spent"]
    assert exact <= cap < coarse_epsilon(cap) + 1e-9 and spent[0] == coarse_epsilon(exact)
    from fedtune.credit.ledger import Ledger, default_url

    with Ledger.open(default_url(run)) as ledger:
        entries = {e.contributor_id: e for e in ledger.round_entries("test", 3)}
    statuses = sorted(e.status for e in entries.values())
    assert statuses == ["declined", "included", "included"]
    assert all(e.credit == 0 for e in entries.values() if e.status == "declined")
    assert any("budget" in (e.reason or "") for e in entries.values())


def test_dp_campaign_reports_epsilon_within_target(tmp_path: Path, campaigns: Campaigns) -> None:
    raw = small_campaign(privacy=PRIVACY | {"planned_rounds": 2})
    config = tmp_path / "dp.toml"
    config.write_text(tomli_w.dumps(raw))
    campaigns.simulate("dp", config=config, run_dir=tmp_path / "run")
    rows = RunDir(tmp_path / "run").read_metrics()
    assert 0 < rows[1]["epsilon_max"] < rows[2]["epsilon_max"] <= 8.0
    assert rows[2]["epsilon_max"] > 0.9 * 8.0  # the whole planned horizon spends (nearly) the whole target
