"""The contributor's own policy: its file, ``join``'s flags, the simulation launcher's policies, the local-only
reproducibility switch, secure mode, and the coarse figures a contributor reports."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, MessageType, RecordDict

from fedtune.cli import build_parser
from fedtune.cli.deploy import write_join_policy
from fedtune.clients.app import app
from fedtune.clients.policy import (
    POLICY_FILE,
    SIMULATION_SEED_ENV,
    SIMULATION_STATE_ROOT_ENV,
    CampaignPins,
    ContributorPolicy,
    PolicyError,
    contributor_state_dir,
    load_policy,
    prepare_simulated_contributors,
    simulated_policy,
    simulated_state_dir,
)
from fedtune.clients.trainer import Randomness, SecureModeUnavailable, secure_mode_missing
from fedtune.config import CampaignConfig
from fedtune.ml.model import base_fingerprint, build_model, trainable_arrays
from fedtune.privacy import EPSILON_STEP, LOSS_MAX, coarse_epsilon, coarse_loss
from fedtune.wire import Decline, Layout, TrainRequest

from ..conftest import DATA, small_campaign
from .inprocess_grid import InProcessGrid

DP = {"mechanism": "dp-sgd", "target_epsilon": 4.0, "planned_rounds": 4}
FED = {"rounds": 4, "local_steps": 2, "batch_size": 4}


def context(**node: object) -> Context:
    return Context(run_id=1, node_id=1, node_config=dict(node), state=RecordDict(), run_config={})


# -- the policy file -----------------------------------------------------------------------------------------


def test_policy_file_round_trip_defaults_and_refusals(tmp_path: Path) -> None:
    assert ContributorPolicy.load(tmp_path) == ContributorPolicy()  # no file: the safe defaults
    defaults = ContributorPolicy()
    assert defaults.require_dp and defaults.max_epsilon == 8.0 and not defaults.require_secagg
    assert (defaults.secagg_security_bits, defaults.secagg_max_corrupt_fraction) == (40, 0.2)
    policy = ContributorPolicy(max_epsilon=2.5, accountant="rdp", require_secagg=True, secagg_min_cohort=5)
    path = policy.save(tmp_path)
    assert path.name == POLICY_FILE and ContributorPolicy.load(tmp_path) == policy
    path.write_text("max_epsilon = 2.0\nepsilon = 3.0\n")
    with pytest.raises(PolicyError, match="unknown keys.*epsilon"):
        ContributorPolicy.load(tmp_path)
    for bad, match in (
        ({"max_epsilon": 0.0}, "max_epsilon"),
        ({"max_epsilon": "8"}, "max_epsilon must be"),
        ({"require_dp": 1}, "require_dp"),
        ({"accountant": "gdp"}, "accountant"),
        ({"secagg_min_cohort": 1}, "secagg_min_cohort"),
        ({"secagg_max_corrupt_fraction": 0.6, "secagg_max_dropout_fraction": 0.5}, "< 1"),
        ({"max_local_steps": 0}, "max_local_steps"),
        ({"max_seq_len": 2.5}, "max_seq_len must be"),
        ({"max_download_gb": 0}, "max_download_gb"),
    ):
        with pytest.raises(PolicyError, match=match):
            ContributorPolicy.from_dict(bad)


def test_the_state_dir_is_the_contributors_own_and_the_node_cap_only_lowers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SIMULATION_STATE_ROOT_ENV, raising=False)
    with pytest.raises(PolicyError, match="no state dir"):
        contributor_state_dir(context(**{"partition-id": 0}))
    ContributorPolicy(max_epsilon=4.0).save(tmp_path)
    deployed = {"state-dir": str(tmp_path)}
    assert load_policy(context(**deployed)).max_epsilon == 4.0
    assert load_policy(context(**deployed, **{"max-epsilon": 2.0})).max_epsilon == 2.0
    assert load_policy(context(**deployed, **{"max-epsilon": 9.0})).max_epsilon == 4.0
    monkeypatch.setenv(SIMULATION_STATE_ROOT_ENV, str(tmp_path / "sim"))
    assert contributor_state_dir(context(**{"partition-id": 2})) == tmp_path / "sim" / "sim-002"
    assert contributor_state_dir(context(**deployed)) == tmp_path  # a deployed contributor keeps its own


# -- join's flags --------------------------------------------------------------------------------------------


def join_args(state: Path, *flags: str):  # -> argparse.Namespace
    return build_parser().parse_args(["join", "--coordinator", "127.0.0.1:1", "--state-dir", str(state), *flags])


def test_join_flags_write_the_policy_and_dp_stays_required_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SIMULATION_SEED_ENV, raising=False)
    assert (
        write_join_policy(join_args(tmp_path, "--max-epsilon", "3", "--allow-no-dp", "--secagg-min-cohort", "6"))
        is None
    )
    policy = ContributorPolicy.load(tmp_path)
    assert (policy.max_epsilon, policy.require_dp, policy.secagg_min_cohort) == (3.0, False, 6)
    assert write_join_policy(join_args(tmp_path, "--require-secagg")) is None  # flags not given keep the file's
    policy = ContributorPolicy.load(tmp_path)
    assert (policy.max_epsilon, policy.require_dp, policy.require_secagg, policy.secagg_min_cohort) == (
        3.0,
        True,
        True,
        6,
    )
    assert "max_delta" in (write_join_policy(join_args(tmp_path, "--max-delta", "2")) or "")
    assert write_join_policy(join_args(tmp_path, "--max-local-steps", "50", "--max-seq-len", "256")) is None
    policy = ContributorPolicy.load(tmp_path)
    assert (policy.max_local_steps, policy.max_seq_len, policy.max_epsilon) == (50, 256, 3.0)
    assert "max_local_steps" in (write_join_policy(join_args(tmp_path, "--max-local-steps", "0")) or "")
    summary = ContributorPolicy.load(tmp_path).summary()  # what join prints at start
    assert "ε ≤ 3 for good" in summary and "≤ 50 steps" in summary and "sequences ≤ 256 tokens" in summary


@pytest.mark.slow
def test_join_refuses_to_start_with_the_simulation_seed_set(tmp_path: Path) -> None:
    env = {**os.environ, SIMULATION_SEED_ENV: "1"}
    cmd = [sys.executable, "-m", "fedtune.cli", "join", "--coordinator", "127.0.0.1:1", "--insecure"]
    proc = subprocess.run([*cmd, "--state-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and SIMULATION_SEED_ENV in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "supernode.key").exists()  # refused before anything started


# -- the simulation launcher's policies ---------------------------------------------------------------------


def test_simulated_contributors_get_their_policy_from_the_launcher_once(tmp_path: Path) -> None:
    raw = small_campaign(privacy=DP | {"personal_max_epsilon": {"1": 1.5}, "accountant": "rdp"})
    cfg = CampaignConfig.from_dict(raw)
    assert simulated_policy(cfg, 0) == ContributorPolicy(
        max_epsilon=4.0, accountant="rdp", secagg_min_cohort=2, report_train_loss=True, min_noise_multiplier=0.0
    )
    assert simulated_policy(cfg, 1).max_epsilon == 1.5
    plain = simulated_policy(CampaignConfig.from_dict(small_campaign()), 0)
    assert not plain.require_dp
    big = CampaignConfig.from_dict(
        small_campaign(
            federation={"local_steps": 5000, "batch_size": 2048}, data={"max_seq_len": 8192}, lora={"rank": 512}
        )
    )
    caps = simulated_policy(big, 0)
    assert (caps.max_local_steps, caps.max_seq_len, caps.max_rank, caps.max_batch_size) == (5000, 8192, 512, 2048)
    prepare_simulated_contributors(cfg, tmp_path)
    assert ContributorPolicy.load(simulated_state_dir(tmp_path, 1)).max_epsilon == 1.5
    ContributorPolicy(max_epsilon=0.5).save(simulated_state_dir(tmp_path, 1))
    prepare_simulated_contributors(cfg, tmp_path)  # a resumed run keeps what is there
    assert ContributorPolicy.load(simulated_state_dir(tmp_path, 1)).max_epsilon == 0.5


def test_pins_refuse_weaker_secure_aggregation_and_accept_stronger_settings() -> None:
    def pins(**sec: object) -> CampaignPins:
        return CampaignPins.of(
            CampaignConfig.from_dict(small_campaign(privacy=DP, secure_aggregation={"protocol": "secagg+", **sec}))
        )

    first = pins(min_cohort=3, neighbours=4, threshold=3)
    assert first.refusal(pins(min_cohort=4, neighbours=6, threshold=4)) is None
    assert first.refusal(
        CampaignPins.of(CampaignConfig.from_dict(small_campaign(privacy=DP | {"target_epsilon": 2.0})))
    ).reason
    for weaker, word in (
        ({"min_cohort": 2}, "minimum cohort"),
        ({"neighbours": 0}, "neighbours"),
        ({"threshold": 2}, "threshold"),
    ):
        refusal = first.refusal(pins(**{"min_cohort": 3, "neighbours": 4, "threshold": 3, **weaker}))
        assert refusal is not None and word in refusal.reason


# -- the reproducibility switch and secure mode -------------------------------------------------------------


def trained_adapter(grid: InProcessGrid, cfg: CampaignConfig, start: dict) -> dict[str, np.ndarray]:
    msg = grid.create_message(
        TrainRequest.of(cfg, base_fingerprint(cfg.model), 1, start).content(), MessageType.TRAIN, 1, "1"
    )
    (reply,) = grid.send_and_receive([msg])
    assert not reply.has_error() and not Decline.is_decline(reply.content), reply
    return Layout.of(start).unpack(reply.content.array_records["arrays"])


@pytest.mark.slow
def test_the_simulation_seed_reproduces_simulated_rounds_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CampaignConfig.from_dict(small_campaign(privacy=DP, federation=FED))
    start = trainable_arrays(build_model(cfg)[0])
    monkeypatch.setenv(SIMULATION_SEED_ENV, "3")
    runs = []
    for name in ("one", "two"):
        monkeypatch.setenv(SIMULATION_STATE_ROOT_ENV, str(tmp_path / name))
        prepare_simulated_contributors(cfg, tmp_path / name)
        runs.append(trained_adapter(InProcessGrid(app, {1: {"partition-id": 0, "num-partitions": 3}}), cfg, start))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    deployed = []
    for name in ("a", "b"):  # a deployed contributor ignores the switch: fresh OS randomness each round
        state = tmp_path / name
        deployed.append(
            trained_adapter(
                InProcessGrid(
                    app, {1: {"state-dir": str(state), "data": str(DATA), "partition-id": 0, "num-partitions": 3}}
                ),
                cfg,
                start,
            )
        )
    assert not all(np.array_equal(deployed[0][k], deployed[1][k]) for k in deployed[0])


def test_secure_mode_is_refused_with_what_is_missing(tmp_path: Path) -> None:
    missing = secure_mode_missing()
    if missing is None:
        pytest.skip("torchcsprng is installed here")
    assert "torchcsprng" in missing
    with pytest.raises(SecureModeUnavailable, match="torchcsprng"):
        Randomness.csprng()
    assert "torchcsprng" in (write_join_policy(join_args(tmp_path, "--secure-mode")) or "")
    cfg = CampaignConfig.from_dict(small_campaign(privacy=DP, federation=FED))
    ContributorPolicy(secure_mode=True).save(tmp_path)
    grid = InProcessGrid(app, {1: {"state-dir": str(tmp_path), "data": str(DATA), "partition-id": 0}})
    request = TrainRequest.of(cfg, base_fingerprint(cfg.model), 1, {"x": np.zeros(1, np.float32)})
    (reply,) = grid.send_and_receive([grid.create_message(request.content(), MessageType.TRAIN, 1, "1")])
    assert "secure mode" in Decline.read(reply.content).reason
    assert not (tmp_path / "privacy_state.json").exists()


def test_secret_randomness_differs_every_time() -> None:
    one, two = Randomness.secret(), Randomness.secret()
    assert not torch.equal(torch.rand(8, generator=one.sampling), torch.rand(8, generator=two.sampling))
    assert not torch.equal(torch.rand(8, generator=one.noise), torch.rand(8, generator=two.noise))


# -- coarse figures ------------------------------------------------------------------------------------------


def test_coarse_figures_sit_on_their_grids() -> None:
    assert [coarse_epsilon(e) for e in (0.0, 0.01, 0.25, 0.2500001, 7.9)] == [0.0, 0.25, 0.25, 0.5, 8.0]
    assert coarse_epsilon(math.inf) == math.inf and all(coarse_epsilon(e) >= e for e in np.linspace(0, 9, 97))
    with pytest.raises(ValueError):
        coarse_epsilon(-1.0)
    assert EPSILON_STEP == 0.25
    assert [coarse_loss(v) for v in (-1.0, 3.1, 3.13, 99.0, math.nan)] == [0.0, 3.0, 3.25, LOSS_MAX, LOSS_MAX]


def test_coordinate_warns_when_contributors_with_the_default_policy_would_decline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomli_w

    from fedtune.server.coordinator import Coordinator

    capsys_out: list[str] = []

    def warning(**sections: dict) -> str:
        config = tmp_path / "campaign.toml"
        config.write_text(tomli_w.dumps(small_campaign(**sections)))
        Coordinator(config, tmp_path / "run", "127.0.0.1:9092", home_dir=tmp_path / "home").validate()
        captured = capsys.readouterr()
        capsys_out.append(captured.out)
        return captured.err

    assert "default policy will decline" not in warning(privacy=DP)
    assert "contributors train on their own data (fedtune join --data)" in capsys_out[-1]
    assert "without differential privacy" in warning()
    long = warning(privacy=DP, federation={"local_steps": 5000})
    assert "local_steps 5000 above this contributor's maximum 1000" in long
    assert not (tmp_path / "run").exists()  # validate writes nothing
