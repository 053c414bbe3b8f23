"""A malicious coordinator replays each attack of issue 10 on a contributor's privacy, against fedtune's own ClientApp.

The coordinator is the adversary of each contributor's data (DESIGN.md): it may send any campaign, in any round,
and any field in its messages. Every test here plays one attack with real Flower messages through the real
handlers of :data:`fedtune.clients.app.app` (delivered by the in-process grid) and asserts that the contributor
declines or is unaffected before it trains, that a refused round costs no ε, and that no private statistic leaves.

Contributors are set up as ``fedtune join`` leaves them: a state dir named in the node config, holding an identity
key and, where the test needs one, a hand-written ``policy.toml`` (the file a contributor edits).

Attacks: batches and noise recomputed from the public seed; ``mechanism = "none"`` against a contributor with a
cap; a raised target ε; a lower noise multiplier; a bigger δ; another accountant; a state folder named by the
coordinator (and a renamed campaign to reset the budget); local files named as training data; an eval carve-out
of the contributor's own data; more work per round than the contributor takes on; a SecAgg+ round whose
parameters are bad, trained before they were checked; exact losses, token and sample counts, shard sizes and ε in
the replies; a train loss, even coarse, that the contributor did not choose to send; an adapter crafted to
overflow on chosen content.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
import torch
from cryptography.hazmat.primitives import serialization
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune.clients.app import app
from fedtune.clients.trainer import Randomness, train_local
from fedtune.config import CampaignConfig
from fedtune.console import contributor_round_line
from fedtune.ml.data import load_shard
from fedtune.ml.model import base_fingerprint, build_model, load_trainable, trainable_arrays
from fedtune.privacy import ContributorPrivacy, PrivacyParams
from fedtune.secagg import QuantConfig, SecAggParams, SecAggServer, generate_identity
from fedtune.server.campaign import round_row
from fedtune.strategies.secure import SecureRound
from fedtune.strategies.server_optimizer import build_strategy
from fedtune.wire import CONFIG, SECAGG_WEIGHT_MAX, Decline, Layout, SecAggRequest, TrainRequest, secagg_message_type

from ..conftest import DATA, run_python, small_campaign
from .inprocess_grid import InProcessGrid

PARTITIONS = 3
DP = {"mechanism": "dp-sgd", "target_epsilon": 4.0, "planned_rounds": 4}
FED = {"rounds": 4, "local_steps": 2, "batch_size": 4, "contributors_per_round": 3, "min_cohort": 2}
SIM_STATE_ROOT, SIM_SEED = "FEDTUNE_SIMULATION_STATE_ROOT", "FEDTUNE_SIMULATION_SEED"
ALLOWED_METRICS = {"num-examples", "steps", "train_loss", "declined", "epsilon"}  # assigned or coarse
GRID = 0.25  # README: train loss and ε leave on a 0.25 grid


def campaign(**privacy: Any) -> CampaignConfig:
    return CampaignConfig.from_dict(small_campaign(privacy=DP | privacy, federation=FED))


@pytest.fixture(scope="module")
def start() -> dict[str, np.ndarray]:
    """The shared adapter every request carries (the same LoRA shapes and FFA seed in every campaign here)."""
    model, _ = build_model(campaign())
    return trainable_arrays(model)


@pytest.fixture(scope="module")
def fingerprint() -> str:
    return base_fingerprint(campaign().model)


@dataclass
class Contributor:
    """A deployed contributor: its state dir and the grid node that delivers messages to fedtune's ClientApp."""

    state: Path
    grid: InProcessGrid
    node: int = 1

    def send(self, content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
        msg = self.grid.create_message(content, message_type, self.node, "1")
        (reply,) = self.grid.send_and_receive([msg])
        return reply

    def train(self, cfg: CampaignConfig, server_round: int, start: dict, fingerprint: str) -> Message:
        return self.send(TrainRequest.of(cfg, fingerprint, server_round, start).content())

    def steps_spent(self) -> int:
        """DP-SGD steps in the contributor's accountant (0 when it never trained)."""
        path = self.state / "privacy_state.json"
        if not path.is_file():
            return 0
        return sum(int(steps) for *_, steps in json.loads(path.read_text())["accountant"]["history"])

    def rounds(self) -> list[dict[str, Any]]:
        path = self.state / "rounds.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def setup_contributor(state: Path, partition: int = 0, policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``fedtune join`` leaves: a state dir with an identity key (and a policy file); returns the node config."""
    state.mkdir(parents=True, exist_ok=True)
    key, _ = generate_identity()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (state / "identity.key").write_bytes(pem)
    if policy is not None:
        (state / "policy.toml").write_text(tomli_w.dumps(policy))
    return {"state-dir": str(state), "data": str(DATA), "partition-id": partition, "num-partitions": PARTITIONS}


def contributor(state: Path, partition: int = 0, policy: dict[str, Any] | None = None, **node: Any) -> Contributor:
    config = setup_contributor(state, partition, policy) | node
    return Contributor(state, InProcessGrid(app, {1: config}))


def is_decline(reply: Message) -> bool:
    assert not reply.has_error(), reply.error.reason
    return Decline.is_decline(reply.content)


def declined_for(reply: Message, *words: str) -> str:
    assert is_decline(reply), "trained instead of declining"
    reason = Decline.read(reply.content).reason
    assert all(w in reason for w in words), reason
    return reason


def adapter(reply: Message, start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trained adapter of a reply, unpacked with the layout of the request's ``start``."""
    assert not reply.has_error() and not Decline.is_decline(reply.content), "no trained reply"
    return Layout.of(start).unpack(reply.content.array_records["arrays"])


def old_public_seed(cfg: CampaignConfig, server_round: int, partition: int) -> int:
    """How batches and noise were seeded before issue 10: from values the coordinator knows."""
    return cfg.campaign.seed * 1_000_003 + server_round * 1009 + partition


def coordinator_replay(
    cfg: CampaignConfig, start: dict, randomness: Randomness, scratch: Path, deployed: bool = True
) -> dict:
    """The coordinator recomputes partition 0's round: same base, shard and calibration, and the given randomness.

    It knows everything but the contributor's randomness (the worst case: in simulation it even holds the shard).
    A deployed contributor trains on all of its own data; a simulated one on what the eval carve-out leaves.
    """
    model, tokenizer = build_model(cfg)
    shard = load_shard(cfg, tokenizer, 0, PARTITIONS, hold_out=not deployed)
    fed = cfg.federation
    params = PrivacyParams.from_campaign(cfg.privacy, campaign_rounds=fed.rounds)
    privacy = ContributorPrivacy.load(
        scratch, params, shard_size=len(shard), batch_size=fed.batch_size, local_steps=fed.local_steps
    )
    load_trainable(model, start)
    train_local(
        model,
        shard,
        steps=fed.local_steps,
        batch_size=fed.batch_size,
        learning_rate=fed.learning_rate,
        randomness=randomness,
        privacy=privacy,
    )
    return trainable_arrays(model)


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def simulation_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The environment ``fedtune simulate`` gives its virtual contributors (set by the local launcher)."""
    root = tmp_path / "sim-root"
    monkeypatch.setenv(SIM_STATE_ROOT, str(root))
    monkeypatch.delenv(SIM_SEED, raising=False)
    yield root


# -- 1. public-seed batch and noise reconstruction ---------------------------------------------------------


@pytest.mark.slow
def test_identical_public_inputs_draw_different_batches_and_noise(
    tmp_path: Path, start: dict, fingerprint: str
) -> None:
    cfg = campaign()
    one = contributor(tmp_path / "a").train(cfg, 1, start, fingerprint)
    two = contributor(tmp_path / "b").train(cfg, 1, start, fingerprint)
    same_update = same(adapter(one, start), adapter(two, start))
    assert not same_update, "same campaign, round, partition and shard gave the same update"


@pytest.mark.slow
def test_coordinator_cannot_recompute_a_round_from_the_public_seed(
    tmp_path: Path, start: dict, fingerprint: str, simulation_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = campaign()
    reply = contributor(tmp_path / "deployed").train(cfg, 1, start, fingerprint)
    public = coordinator_replay(cfg, start, Randomness.from_seed(old_public_seed(cfg, 1, 0)), tmp_path / "replay")
    assert not same(adapter(reply, start), public), "the coordinator recomputed the batches and the noise"

    # control: the replay is exact whenever the randomness is known, here through the local simulation switch
    monkeypatch.setenv(SIM_SEED, "7")
    simulated = Contributor(simulation_root, InProcessGrid(app, {1: {"partition-id": 0, "num-partitions": 3}}))
    (simulation_root / "sim-000").mkdir(parents=True)
    (simulation_root / "sim-000" / "policy.toml").write_text(tomli_w.dumps({"max_epsilon": 4.0}))
    known = simulated.train(cfg, 1, start, fingerprint)
    from fedtune.clients.app import round_randomness
    from fedtune.clients.policy import ContributorPolicy

    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    randomness = round_randomness(ctx, ContributorPolicy(), 1, "cpu")
    replay = coordinator_replay(cfg, start, randomness, tmp_path / "r2", deployed=False)
    assert same(adapter(known, start), replay), "the replay is not faithful, so the mismatch above would prove nothing"


# -- 2. DP switched off by the coordinator -----------------------------------------------------------------


def test_a_campaign_without_dp_is_declined_before_training(tmp_path: Path, start: dict, fingerprint: str) -> None:
    c = contributor(tmp_path / "c", **{"max-epsilon": 3.0})  # the contributor's own cap, as join passes it
    reply = c.train(campaign(mechanism="none"), 1, start, fingerprint)
    declined_for(reply, "without differential privacy")
    assert c.steps_spent() == 0 and not (c.state / "privacy_state.json").exists()

    no_cap = contributor(tmp_path / "d")  # no flag, no policy file: the default policy still requires DP
    declined_for(no_cap.train(campaign(mechanism="none"), 1, start, fingerprint), "without differential privacy")


# -- 3. the budget moved by the coordinator ------------------------------------------------------------------


def test_a_raised_target_epsilon_is_declined_and_the_budget_never_grows(
    tmp_path: Path, start: dict, fingerprint: str
) -> None:
    c = contributor(tmp_path / "c", policy={"max_epsilon": 50.0})
    assert not is_decline(c.train(campaign(target_epsilon=2.0), 1, start, fingerprint))
    spent = c.steps_spent()
    assert spent == FED["local_steps"]
    for raised in (4.0, 50.0):
        declined_for(c.train(campaign(target_epsilon=raised), 2, start, fingerprint), "target ε", "above 2")
    assert c.steps_spent() == spent


@pytest.mark.slow
def test_a_lower_noise_multiplier_is_declined(tmp_path: Path, start: dict, fingerprint: str) -> None:
    c = contributor(tmp_path / "c", policy={"max_epsilon": 1000.0, "min_noise_multiplier": 0.3})
    declined_for(c.train(campaign(target_epsilon=30.0), 1, start, fingerprint), "noise multiplier")
    assert c.steps_spent() == 0


HUGE_EPSILON = """
import sys
from pathlib import Path
from fedtune.ml.model import base_fingerprint, build_model, trainable_arrays
from tests.unit.test_adversarial_coordinator import campaign, contributor, declined_for
cfg = campaign(target_epsilon=1000.0, planned_rounds=400)
start = trainable_arrays(build_model(cfg)[0])
c = contributor(Path(sys.argv[1]))  # the default policy: ε at most 8
print(declined_for(c.train(cfg, 1, start, base_fingerprint(cfg.model)), "cannot calibrate"))
print("steps spent:", c.steps_spent())
"""


@pytest.mark.slow  # a child process: imports, then the calibration
def test_an_epsilon_whose_accounting_would_exhaust_memory_is_declined(tmp_path: Path) -> None:
    """The coordinator picks ε and the horizon, and the contributor calibrates its noise for them before anything
    else: ε = 1000 over 800 steps asked Opacus' PRV accountant for a grid of ≈ 18M points (tens of GB), which
    took the contributor's memory down (here: a child capped at 6 GiB died of ``MemoryError``). Now declined."""
    proc = run_python(HUGE_EPSILON, str(tmp_path / "c"), memory_gib=6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps spent: 0" in proc.stdout, proc.stdout
    assert 'use accountant = "rdp"' in proc.stderr  # the detail stays in the contributor's own log


def test_more_work_than_the_policy_takes_on_is_declined_before_training(
    tmp_path: Path, start: dict, fingerprint: str
) -> None:
    """The coordinator sizes the round: a million local steps would hold the machine for days; a long enough
    ``max_seq_len``, a rank of 10⁶ or a huge batch would exhaust its memory. Each one over the policy's cap is
    declined, unless the contributor's own ``--max-rank`` / ``--batch-size`` takes on less."""
    caps = {"max_local_steps": 3, "max_seq_len": 64, "max_rank": 4, "max_batch_size": 4}
    c = contributor(tmp_path / "c", policy=caps)

    def ask(*words: str, **sections: dict) -> str:
        raw = small_campaign(privacy=DP, **{"federation": FED, **sections})
        return declined_for(c.train(CampaignConfig.from_dict(raw), 1, start, fingerprint), *words)

    ask("local_steps 4 above", "maximum 3", federation=FED | {"local_steps": 4})
    ask("max_seq_len 65 above", "maximum 64", data={"max_seq_len": 65})
    ask("rank 5 above", "maximum 4", lora={"rank": 5})
    ask("batch_size 5 above", "maximum 4", federation=FED | {"batch_size": 5})
    assert c.steps_spent() == 0 and not (c.state / "privacy_state.json").exists()
    at_caps = small_campaign(privacy=DP, federation=FED | {"local_steps": 3}, data={"max_seq_len": 64})
    assert not is_decline(c.train(CampaignConfig.from_dict(at_caps), 1, start, fingerprint))
    assert c.steps_spent() == 3
    less = contributor(tmp_path / "d", policy=caps, **{"batch-size": 4})  # takes on less than the campaign's 8
    bigger = small_campaign(privacy=DP, federation=FED | {"batch_size": 8})
    assert not is_decline(less.train(CampaignConfig.from_dict(bigger), 1, start, fingerprint))


HUGE_HUB_MODEL = """
import http.server, json, os, sys, threading
from pathlib import Path
GIB, asked = 2**30, []
class Hub(http.server.BaseHTTPRequestHandler):  # a hub on loopback that lists a 100 GB model and serves nothing
    def do_GET(self):
        asked.append(self.path)
        if not self.path.startswith("/api/models/bigorg/huge-model"):
            self.send_response(404); self.end_headers(); return
        files = [("config.json", 600), ("model-00001-of-00002.safetensors", 60 * GIB),
                 ("model-00002-of-00002.safetensors", 40 * GIB)]
        body = json.dumps({"id": "bigorg/huge-model", "sha": "a" * 40,
                           "siblings": [{"rfilename": n, "size": b} for n, b in files]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    do_HEAD = do_GET
    def log_message(self, *args): pass
hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
threading.Thread(target=hub.serve_forever, daemon=True).start()
os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{hub.server_address[1]}", HF_HUB_OFFLINE="0",
                  HF_HOME=sys.argv[2])
from fedtune.config import CampaignConfig
from fedtune.ml.model import build_model, trainable_arrays
from tests.conftest import small_campaign
from tests.unit.test_adversarial_coordinator import DP, FED, contributor, declined_for
start = trainable_arrays(build_model(CampaignConfig.from_dict(small_campaign()))[0])
cfg = CampaignConfig.from_dict(small_campaign(privacy=DP, federation=FED, model={"name": "bigorg/huge-model"}))
c = contributor(Path(sys.argv[1]))
print(declined_for(c.train(cfg, 1, start, "0" * 64), "100.0 GB to download", "maximum 50 GB"))
print("fetched:", [p for p in asked if "/resolve/" in p], "steps spent:", c.steps_spent())
"""


@pytest.mark.slow  # a child process with a hub endpoint of its own
def test_a_base_model_too_big_to_download_is_declined_before_the_download(tmp_path: Path) -> None:
    """The coordinator names the base: a 100 GB hub model would fill a home contributor's disk and link. The
    contributor asks the hub's file list first (here a loopback stand-in) and declines above ``max_download_gb``
    (50 GB by default), fetching nothing."""
    proc = run_python(HUGE_HUB_MODEL, str(tmp_path / "c"), str(tmp_path / "hf-home"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fetched: [] steps spent: 0" in proc.stdout, proc.stdout


def test_a_bigger_delta_is_declined(tmp_path: Path, start: dict, fingerprint: str) -> None:
    c = contributor(tmp_path / "c")
    declined_for(c.train(campaign(delta=1e-3), 1, start, fingerprint), "δ")
    assert c.steps_spent() == 0
    assert not is_decline(c.train(campaign(delta=1e-6), 1, start, fingerprint))
    declined_for(c.train(campaign(delta=5e-6), 2, start, fingerprint), "δ 5e-06 above 1e-06")
    assert c.steps_spent() == FED["local_steps"]


def test_another_accountant_is_declined(tmp_path: Path, start: dict, fingerprint: str) -> None:
    c = contributor(tmp_path / "c", policy={"accountant": "rdp"})
    assert not is_decline(c.train(campaign(accountant="rdp"), 1, start, fingerprint))
    declined_for(c.train(campaign(accountant="prv"), 2, start, fingerprint), "prv", "rdp")
    assert c.steps_spent() == FED["local_steps"]
    # what the switch would have bought the coordinator: PRV finds less ε in the same history, so more budget left
    from opacus.accountants import create_accountant

    history = json.loads((c.state / "privacy_state.json").read_text())["accountant"]
    eps = {}
    for kind in ("rdp", "prv"):
        acct = create_accountant(mechanism=kind)
        acct.load_state_dict({**history, "mechanism": kind})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps[kind] = acct.get_epsilon(delta=1e-5)
    assert eps["prv"] < eps["rdp"]


# -- 4. the accountant at a path the coordinator names --------------------------------------------------------


def test_a_state_folder_named_by_the_coordinator_is_ignored(
    tmp_path: Path, start: dict, fingerprint: str, simulation_root: Path
) -> None:
    evil = tmp_path / "coordinator-chosen"
    node = {"partition-id": 0, "num-partitions": PARTITIONS}  # a virtual contributor: no state-dir of its own
    c = Contributor(simulation_root / "sim-000", InProcessGrid(app, {1: node}))
    (c.state).mkdir(parents=True)
    (c.state / "policy.toml").write_text(tomli_w.dumps({"max_epsilon": 8.0}))
    content = TrainRequest.of(campaign(), fingerprint, 1, start).content()
    content[CONFIG] = ConfigRecord({**dict(content[CONFIG].items()), "state-root": str(evil)})
    assert not is_decline(c.send(content))
    assert not evil.exists(), "the contributor wrote its state where the coordinator told it to"
    assert c.steps_spent() == FED["local_steps"]


def test_local_files_named_by_the_coordinator_are_never_trained_on(
    tmp_path: Path, start: dict, fingerprint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The campaign's ``[data] source`` is the coordinator's word: a local path there made any file this user can
    read (think ``~/.ssh/id_rsa``) training data, sent back as an update; ``[simulation] extra_data`` added one to
    the shard even next to ``--data``. A deployed contributor trains on its own ``--data`` (or a public hub
    dataset) and ignores ``[simulation]``."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("the contributor's private notes, one line of many\n" * 640)
    (home / "records.jsonl").write_text("these bytes are not json records\n")
    monkeypatch.chdir(tmp_path)  # "home/notes.txt" reads like a hub id ("org/name") but is a local path here
    no_data = setup_contributor(tmp_path / "c")
    del no_data["data"]  # joined without --data
    c = Contributor(tmp_path / "c", InProcessGrid(app, {1: no_data}))
    for source in (str(home / "notes.txt"), "home/notes.txt", "home", "~/notes.txt"):
        raw = small_campaign(privacy=DP, federation=FED, data={"source": source})
        declined_for(c.train(CampaignConfig.from_dict(raw), 1, start, fingerprint), "local data", "--data")
    assert c.steps_spent() == 0
    with_data = contributor(tmp_path / "d")  # its own --data; the campaign adds a file through extra_data
    raw = small_campaign(privacy=DP, federation=FED, simulation={"extra_data": {"0": str(home / "records.jsonl")}})
    assert not is_decline(with_data.train(CampaignConfig.from_dict(raw), 1, start, fingerprint))
    assert with_data.steps_spent() == FED["local_steps"]


def test_the_coordinator_cannot_hold_out_a_contributors_own_data(tmp_path: Path, start: dict, fingerprint: str) -> None:
    """``[data] eval_fraction`` carves the coordinator's eval set out of the training source. Applied to a
    contributor's own ``--data`` it only took examples away: a campaign holding out 90 % left this contributor 20
    of its 200 records, below its minimum shard, and it declined. Its own data is nobody's eval set: all of it
    trains."""
    own = tmp_path / "own.jsonl"
    own.write_text("\n".join(DATA.read_text().splitlines()[:200]) + "\n")
    raw = small_campaign(privacy=DP, federation=FED, data={"eval_fraction": 0.9, "eval_max_examples": 10**6})
    c = contributor(tmp_path / "c", data=str(own), **{"num-partitions": 1})
    assert not is_decline(c.train(CampaignConfig.from_dict(raw), 1, start, fingerprint)), "declined its own data"
    privacy = json.loads((c.state / "privacy.json").read_text())
    assert privacy["sample_rate"] == pytest.approx(FED["batch_size"] / 200)  # batch / all 200 records


@pytest.mark.slow
def test_renaming_the_campaign_does_not_reset_the_budget(
    tmp_path: Path, start: dict, fingerprint: str, simulation_root: Path
) -> None:
    node = {"partition-id": 0, "num-partitions": PARTITIONS}
    c = Contributor(simulation_root / "sim-000", InProcessGrid(app, {1: node}))
    c.state.mkdir(parents=True)
    one_round = campaign(target_epsilon=1.0, planned_rounds=1)  # one round spends the whole budget
    (c.state / "policy.toml").write_text(tomli_w.dumps({"max_epsilon": 1.0}))
    first = TrainRequest.of(one_round, fingerprint, 1, start).content()
    first[CONFIG] = ConfigRecord({**dict(first[CONFIG].items()), "state-root": str(tmp_path / "evil")})
    assert not is_decline(c.send(first))
    renamed = CampaignConfig.from_dict(
        small_campaign(campaign={"name": "fresh-start"}, privacy=DP | {"target_epsilon": 1.0, "planned_rounds": 1})
        | {"federation": FED}
    )
    again = TrainRequest.of(renamed, fingerprint, 2, start).content()
    again[CONFIG] = ConfigRecord({**dict(again[CONFIG].items()), "state-root": str(tmp_path / "evil-2")})
    declined_for(c.send(again), "ε budget")
    assert c.steps_spent() == FED["local_steps"]


# -- 5. SecAgg+ parameters checked only after training ------------------------------------------------------


def test_bad_secagg_parameters_are_refused_before_training(tmp_path: Path, start: dict, fingerprint: str) -> None:
    cfg = CampaignConfig.from_dict(
        small_campaign(privacy=DP, federation=FED, secure_aggregation={"protocol": "secagg+"})
    )
    c = contributor(tmp_path / "c")
    n = sum(a.size for a in start.values()) + 1
    bad = {
        "not in the cohort": SecAggParams.create(cfg.campaign.name, 1, [7, 8, 9], n, QuantConfig(1.0, 16)),
        "other quantization": SecAggParams.create(cfg.campaign.name, 1, [1, 8, 9], n, QuantConfig(1e-6, 16)),
        "other campaign": SecAggParams.create("other", 1, [1, 8, 9], n, QuantConfig(1.0, 16)),
        # a cohort past the contributor's maximum: signatures and sizing over 20,000 members, every round
        "huge cohort": SecAggParams.create(cfg.campaign.name, 1, list(range(1, 20_001)), n, QuantConfig(1.0, 16)),
    }
    for case, params in bad.items():
        msg = {**SecAggServer(params, {}).advertise_request(), SECAGG_WEIGHT_MAX: 8.0}
        train = TrainRequest.of(cfg, fingerprint, 1, start)
        reply = c.send(SecAggRequest(msg, train).content(), secagg_message_type("advertise"))
        assert reply.has_error() or Decline.is_decline(reply.content), case
        assert c.steps_spent() == 0, f"{case}: ε spent on a round whose SecAgg+ parameters were bad"


# -- 6. un-noised private values in the replies --------------------------------------------------------------


def numbers_in(reply: Message) -> list[float]:
    out: list[float] = []
    for record in reply.content.metric_records.values():
        out += [float(v) for v in record.values() if isinstance(v, int | float)]
    for record in reply.content.config_records.values():
        for v in record.values():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out.append(float(v))
            elif isinstance(v, str):
                out += [float(x) for x in re.findall(r"\d+(?:\.\d+)?", v)]
    return out


def assert_nothing_private(reply: Message, private: dict[str, float]) -> None:
    """Only assigned or coarse metrics, on their grids, and no exact private figure anywhere in the reply."""
    for record in reply.content.metric_records.values():
        assert set(record) <= ALLOWED_METRICS, sorted(set(record) - ALLOWED_METRICS)
        for key in ("train_loss", "epsilon"):
            if key in record:
                assert float(record[key]) / GRID == round(float(record[key]) / GRID), (key, record[key])
    found = numbers_in(reply)
    for name, value in private.items():
        assert not any(math.isclose(v, value, rel_tol=1e-9, abs_tol=1e-12) for v in found), f"{name}={value} sent"


def private_figures(c: Contributor, cfg: CampaignConfig, partition: int = 0) -> dict[str, float]:
    """The exact figures the contributor keeps to itself: its own log, and its shard size."""
    _, tokenizer = build_model(cfg)
    own = load_shard(cfg, tokenizer, partition, PARTITIONS, hold_out=False)  # deployed: all of its --data trains
    figures = {"shard size": float(len(own))}
    for row in c.rounds():
        if not row.get("declined"):  # not the sample count: it may equal the assigned one by chance (keys check it)
            figures |= {f"round {row['round']} {k}": float(row[k]) for k in ("tokens", "train_loss")}
        if row.get("epsilon") is not None:
            figures[f"round {row['round']} exact ε"] = float(row["epsilon"])
    return figures


def test_a_failed_round_tells_the_coordinator_nothing_of_the_contributors_machine(
    tmp_path: Path, start: dict, fingerprint: str
) -> None:
    """Flower's error reply carries ``str(exception)``, and a contributor's exceptions quote its private facts:
    its data's path and columns, whether a path the campaign names exists on its disk. A coordinator crafting
    campaigns to fail would read them; now it learns the exception's type (and the same decline for a model that
    is missing or different), while the contributor's own ``rounds.jsonl`` keeps the whole story."""
    own = tmp_path / "alice-medical-notes.jsonl"
    own.write_text("".join(json.dumps({"patient_note": f"visit {i}"}) + "\n" for i in range(200)))
    c = contributor(tmp_path / "c", data=str(own))
    wrong_field = small_campaign(privacy=DP, federation=FED)  # asks for a "text" column the contributor lacks
    reply = c.train(CampaignConfig.from_dict(wrong_field), 1, start, fingerprint)
    assert reply.has_error()
    for private in ("alice-medical-notes", "patient_note", str(tmp_path)):
        assert private not in reply.error.reason, reply.error.reason
    assert "DataError" in reply.error.reason
    assert "patient_note" in c.rounds()[-1]["error"]  # the contributor's own log has it, and join shows it
    assert "patient_note" in contributor_round_line(c.rounds()[-1]).removeprefix("a round failed: ")
    reasons = set()
    for probed in (tmp_path / "c", tmp_path / "no-such-folder"):  # exists / does not: indistinguishable
        raw = small_campaign(privacy=DP, federation=FED, model={"name": str(probed)})
        reasons.add(declined_for(c.train(CampaignConfig.from_dict(raw), 1, start, fingerprint), "base model"))
    assert len(reasons) == 1 and str(tmp_path) not in reasons.pop()
    assert c.steps_spent() == 0


def test_plain_replies_and_declines_carry_no_private_statistic(tmp_path: Path, start: dict, fingerprint: str) -> None:
    cfg = campaign(target_epsilon=2.0, planned_rounds=1)
    c = contributor(tmp_path / "c", policy={"max_epsilon": 2.0})
    trained = c.train(cfg, 1, start, fingerprint)
    budget = c.train(cfg, 2, start, fingerprint)  # the planned participation is spent: a decline with ε
    assert is_decline(budget) and Decline.read(budget.content).epsilon is not None
    private = private_figures(c, cfg)
    assert {"round 1 tokens", "round 1 train_loss", "round 1 exact ε"} <= set(private)
    for reply in (trained, budget):
        assert_nothing_private(reply, private)
    declined_for(budget, "ε budget")


def test_the_train_loss_stays_with_the_contributor_unless_its_policy_sends_it(tmp_path: Path) -> None:
    """The mean train loss is an un-noised function of the shard, computed on a model the coordinator chose: with
    a crafted adapter and a batch of one it reads single records, round after round, outside any ε. Two
    contributors with as many records, one holding prose and one noise, get the same request; the coordinator
    must not be able to tell them apart (with the loss sent, even on its 0.25 grid: 5.5 against 6.5)."""
    fed = FED | {"local_steps": 10, "batch_size": 8}  # a mean over ~80 sequences: the two shards' gap is stable
    cfg = CampaignConfig.from_dict(small_campaign(privacy=DP, federation=fed, model={"name": "builtin:stdlib-llama"}))
    model, _ = build_model(cfg)
    start, fingerprint = trainable_arrays(model), base_fingerprint(cfg.model)
    prose = DATA.read_text().splitlines()[:300]
    rng = np.random.default_rng(0)
    noise = ["".join(rng.choice(list("qxzjkvwy0123456789#@%"), 150)) for _ in prose]
    replies, logged = {}, {}
    for name, lines in {"prose": prose, "noise": [json.dumps({"text": t}) for t in noise]}.items():
        own = tmp_path / f"{name}.jsonl"
        own.write_text("\n".join(lines) + "\n")
        c = contributor(tmp_path / name, data=str(own))
        replies[name] = dict(c.train(cfg, 1, start, fingerprint).content.metric_records["metrics"])
        logged[name] = c.rounds()[-1]["train_loss"]  # the contributor's own log keeps the exact loss
    assert logged["noise"] - logged["prose"] > GRID, logged  # apart on the grid: what the coordinator could read
    assert "train_loss" not in replies["prose"]
    assert replies["prose"] == replies["noise"]
    sharing = contributor(tmp_path / "sharing", policy={"report_train_loss": True}, data=str(tmp_path / "noise.jsonl"))
    sent = sharing.train(cfg, 1, start, fingerprint).content.metric_records["metrics"]["train_loss"]
    assert float(sent) == round(sharing.rounds()[-1]["train_loss"] / GRID) * GRID  # opted in: the coarse loss


def overflow_adapter(cfg: CampaignConfig, text: str, scale: float) -> dict[str, np.ndarray]:
    """The coordinator's crafted A+B adapter: layer 0's query and key grow along one direction, ``text``'s input
    to that layer, so the attention score of a sequence holding ``text`` overflows and those of others do not."""
    model, tokenizer = build_model(cfg)
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    inner = model.base_model.model.model
    with torch.no_grad():
        x = inner.layers[0].input_layernorm(inner.embed_tokens.weight)[token]
    crafted = {}
    for name, value in trainable_arrays(model).items():
        value = np.zeros_like(value)
        if "layers.0." in name and ("q_proj" in name or "k_proj" in name):
            if "lora_A" in name:
                value[0] = (x / x.norm()).numpy()
            else:
                value[0, 0] = scale
        crafted[name] = value
    return crafted


def test_a_crafted_adapter_that_overflows_on_chosen_content_learns_nothing(tmp_path: Path) -> None:
    """One sequence whose gradient is not finite used to make the whole noised update NaN. With an adapter that
    overflows on one letter, the coordinator read from the update whether a contributor's sampled records held
    it: a membership test outside any ε. Such sequences now add nothing, and both updates are finite."""
    lora = {"mode": "lora", "rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "k_proj"]}
    fed = FED | {"local_steps": 4, "batch_size": 8}
    cfg = CampaignConfig.from_dict(small_campaign(privacy=DP, federation=fed, lora=lora))
    crafted, fingerprint = overflow_adapter(cfg, "x", 1e4), base_fingerprint(cfg.model)
    prose = [json.loads(line)["text"].replace("x", "y")[:40] for line in DATA.read_text().splitlines()[:300]]
    for name, prefix in {"holds the letter": "x ", "does not": ""}.items():
        own = tmp_path / f"{name}.jsonl"
        own.write_text("".join(json.dumps({"text": prefix + line}) + "\n" for line in prose))
        reply = contributor(tmp_path / name, data=str(own)).train(cfg, 1, crafted, fingerprint)
        update = adapter(reply, crafted)
        assert all(np.isfinite(v).all() for v in update.values()), f"the update of the one that {name} is not finite"


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every reply the coordinator receives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Message] = []

    def pull_messages(self, message_ids: Any) -> list[Message]:
        got = list(super().pull_messages(message_ids))
        self.seen += got
        return got


@pytest.mark.slow
def test_secure_round_replies_carry_no_private_statistic(tmp_path: Path, start: dict, fingerprint: str) -> None:
    cfg = CampaignConfig.from_dict(
        small_campaign(privacy=DP, federation=FED, secure_aggregation={"protocol": "secagg+", "stage_timeout_s": 60.0})
    )
    states = {100 + p: tmp_path / f"c{p}" for p in range(PARTITIONS)}
    grid = RecordingGrid(app, {node: setup_contributor(state, node - 100) for node, state in states.items()})
    request = TrainRequest.of(cfg, fingerprint, 1, start)
    result = SecureRound(cfg, tmp_path / "run").run(grid, build_strategy(cfg, PARTITIONS), request)
    assert result.applied and len(result.outcomes) == PARTITIONS, result.abort_reason
    row = round_row(1, result, {"eval_loss": 1.0}, 0.1)
    assert "tokens" not in row and all(o.report is not None for o in result.outcomes)
    private: dict[str, float] = {}
    for node, state in states.items():
        private |= {f"{node} {k}": v for k, v in private_figures(Contributor(state, grid), cfg, node - 100).items()}
    assert any("tokens" in k for k in private)
    assert len(grid.seen) >= 5 * PARTITIONS
    for reply in grid.seen:
        assert_nothing_private(reply, private)
