"""End to end: the shared 2-round, 3-contributor campaign in Flower's simulation engine: its run dir, its adapter
reloaded with plain PEFT (same eval loss), its ledger and ``--resume``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.config import load_config
from fedtune.rundir import RunDir

from .conftest import Campaigns

REQUIRED = {"round", "eval_loss", "train_loss", "participants", "bytes_up", "bytes_down", "wall_s"}


@pytest.fixture(scope="module")
def finished_run(plain_run: Path) -> Path:
    return plain_run


def test_run_dir_layout(finished_run: Path) -> None:
    rows = RunDir(finished_run).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(r) >= REQUIRED, REQUIRED - set(r)
    for r in rows[1:]:
        assert r["participants"] == 3 and r["declined"] == 0 and r["failed"] == 0
        assert r["bytes_up"] > 0 and r["bytes_up"] == r["bytes_down"]  # FFA: B down, B up
        assert r["train_loss"] is not None and math.isfinite(r["train_loss"])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    for d in (finished_run / "adapter", finished_run / "checkpoints" / "round-2"):
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
    cfg = load_config(finished_run / "config.toml")  # the resolved config is itself a valid campaign
    assert cfg.federation.rounds == 2 and cfg.simulation.contributors == 3


def test_adapter_reloads_with_plain_peft(finished_run: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.ml.data import load_eval
    from fedtune.ml.evaluation import evaluate_loss
    from fedtune.ml.tiny import builtin_path

    cfg = load_config(finished_run / "config.toml")
    base_dir = builtin_path(cfg.model.name)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, str(finished_run / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    reported = RunDir(finished_run).read_metrics()[-1]["eval_loss"]
    measured = evaluate_loss(model, load_eval(cfg, tokenizer))["eval_loss"]
    assert measured == pytest.approx(reported, rel=1e-5), (measured, reported)
    adapter_cfg = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == cfg.lora.rank


def test_existing_run_dir_is_not_overwritten(finished_run: Path) -> None:
    from fedtune.rundir import fresh_run_dir

    assert fresh_run_dir(finished_run) == finished_run.with_name(finished_run.name + "-2")


def test_ledger_credits_assigned_work(finished_run: Path) -> None:
    from fedtune.credit.formula import round_credit, train_flops_per_token
    from fedtune.credit.ledger import Ledger, default_url
    from fedtune.ml.model import build_model, count_parameters

    cfg = load_config(finished_run / "config.toml")
    model, _ = build_model(cfg)
    n_base, n_adapter = count_parameters(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fed = cfg.federation
    tokens = fed.local_steps * fed.batch_size * cfg.data.max_seq_len
    expected = round_credit(tokens, train_flops_per_token(n_base, n_adapter, n_train))
    with Ledger.open(default_url(finished_run)) as ledger:
        for server_round in (1, 2):
            entries = ledger.round_entries(cfg.campaign.name, server_round)
            assert len(entries) == 3 and all(e.status == "included" for e in entries)
            assert all(e.credit == pytest.approx(expected) for e in entries)
        board = ledger.leaderboard(cfg.campaign.name)
    assert [r.rounds for r in board] == [2, 2, 2]
    assert board[0].total_credit == pytest.approx(2 * expected)


def test_credits_command_prints_leaderboard(finished_run: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "credits", "--run-dir", str(finished_run), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [c["name"] for c in data["contributors"]] == ["sim-000", "sim-001", "sim-002"]


def test_resume_runs_only_the_missing_rounds(finished_run: Path, tmp_path: Path, campaigns: Campaigns) -> None:
    import shutil

    from fedtune.credit.ledger import Ledger, default_url

    run = tmp_path / "resumed"
    shutil.copytree(finished_run, run)
    before = RunDir(run).read_metrics()
    campaigns.simulate("resumed", None, "--resume", "--rounds", "3", config=run / "config.toml", run_dir=run)
    rows = RunDir(run).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[:3] == before  # completed rounds are kept, not re-run
    cfg = load_config(run / "config.toml")
    with Ledger.open(default_url(run)) as ledger:
        board = ledger.leaderboard(cfg.campaign.name)
    assert [r.rounds for r in board] == [3, 3, 3]  # rounds 1-2 credited once, round 3 once


def test_server_optimizer_state_roundtrip() -> None:
    import numpy as np

    from fedtune.config import CampaignConfig
    from fedtune.strategies.server_optimizer import build_strategy, restore_strategy_state, strategy_state

    from ..conftest import small_campaign

    for opt in ("fedadam", "fedavgm"):
        cfg = CampaignConfig.from_dict(small_campaign(federation={"server_optimizer": opt}))
        strategy = build_strategy(cfg, 3)
        if opt == "fedadam":
            strategy.m_t, strategy.v_t = {"b": np.ones(3)}, {"b": np.full(3, 2.0)}
        else:
            strategy.momentum_vector = [np.ones(2), np.zeros(4)]
        fresh = build_strategy(cfg, 3)
        restore_strategy_state(fresh, strategy_state(strategy))
        assert {k: v.tolist() for k, v in strategy_state(fresh).items()} == {
            k: v.tolist() for k, v in strategy_state(strategy).items()
        }


def test_simulate_exits_with_one_line_when_ray_cannot_start(campaigns: Campaigns, tmp_path: Path) -> None:
    """Ray fails to start (its temp dir cannot be made: a file stands in the way); ``simulate`` says so and exits.

    Before the fix Flower's ServerApp thread, which nothing told that the engine had crashed, waited for replies
    for the round timeout (an hour by default), and the interpreter waited for it at exit: a hung command.
    """
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    campaigns.simulate("ray-fails", env={"RAY_TMPDIR": str(blocker / "ray")}, expect_rc=1, timeout_s=180)
    assert campaigns.last is not None
    last = campaigns.last.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the simulation engine (Ray) stopped: NotADirectoryError"), last
    assert "carry on with: " in last and "--resume" in last, last
