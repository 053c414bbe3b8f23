"""The pieces the SecAgg+ round adds around the protocol core: update encoding, wire format, setup
checks, the identity registry, the contributor's identity key and cohort check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from fedtune.clients.policy import SIMULATION_STATE_ROOT_ENV
from fedtune.clients.secagg_client import handle_stage, identity_key
from fedtune.config import CampaignConfig, ConfigError
from fedtune.secagg import QuantConfig, SecAggClient, SecAggParams, SecAggServer, generate_identity, run_round
from fedtune.secagg.campaign import check_setup, decode_mean, encode_update, flatten, quant_config, unflatten
from fedtune.secagg.crypto import identity_public_bytes
from fedtune.strategies.secure import REGISTRY_FILE, IdentityRegistry
from fedtune.wire import SecAggReply, SecAggRequest, TrainRequest

from ..conftest import small_campaign

SECURE = {"protocol": "secagg+"}
FOUR = {"simulation": {"contributors": 4}, "federation": {"contributors_per_round": 4, "rounds": 3}}


def test_weighted_mean_and_total_weight_come_out_of_the_secure_sum() -> None:
    rng = np.random.default_rng(0)
    start = {"b": rng.normal(size=(4, 6)).astype(np.float32), "a": rng.normal(size=7).astype(np.float32)}
    ends = [{k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in start.items()} for _ in range(5)]
    weights = [48.0, 12.0, 48.0, 30.0, 6.0]
    quant = QuantConfig(clip=0.1, bits=16)
    vectors = {i + 1: encode_update(start, ends[i], w / max(weights), quant.clip) for i, w in enumerate(weights)}
    idents = {c: generate_identity() for c in vectors}
    registry = {c: pub for c, (_, pub) in idents.items()}
    params = SecAggParams.create("c", 1, vectors, len(vectors[1]), quant)
    clients = {c: SecAggClient(c, key, "c") for c, (key, _) in idents.items()}
    result = run_round(SecAggServer(params, registry), clients, vectors, {"masked_input": {3}})
    mean, weight = decode_mean(result.total, quant, len(result.survivors))
    kept = [i for i in range(5) if i + 1 in result.survivors]
    assert weight * max(weights) == pytest.approx(sum(weights[i] for i in kept), rel=1e-4)
    exact = sum(weights[i] * (flatten(ends[i]) - flatten(start)) for i in kept) / sum(weights[i] for i in kept)
    assert np.max(np.abs(mean - exact)) < 4 * quant.mean_error_bound
    assert unflatten(flatten(start), start).keys() == start.keys()


def test_wire_format_keeps_uint64_ids_and_uint32_uploads() -> None:
    msg = {
        "campaign_id": "c",
        "round": 3,
        "stage": "unmask",
        "sender": 2**64 - 5,
        "ids": [2**63 + 1, 7],
        "ct": [b"x", b""],
        "b_ids": [],
        "masked": np.arange(10, dtype=np.uint32),
    }
    back = SecAggReply.read(SecAggReply(msg).content(), "unmask").msg
    assert back.keys() == msg.keys() and back["masked"].dtype == np.uint32
    assert all(np.array_equal(back[k], v) if isinstance(v, np.ndarray) else back[k] == v for k, v in msg.items())


def test_setup_refuses_overflow_and_sizes_the_clip_range() -> None:
    raw = small_campaign(secure_aggregation={**SECURE, "bits": 30}, **FOUR)
    with pytest.raises(ConfigError, match=r"bits.*overflow"):
        check_setup(CampaignConfig.from_dict(raw))
    with pytest.raises(ConfigError, match="threshold"):
        check_setup(CampaignConfig.from_dict(small_campaign(secure_aggregation={**SECURE, "threshold": 3})))
    cfg = CampaignConfig.from_dict(small_campaign(secure_aggregation=SECURE, privacy={"update_clip_norm": 0.5}))
    check_setup(cfg)
    assert quant_config(cfg) == QuantConfig(clip=0.5, bits=16)
    cfg.secure_aggregation.clip_range = 0.05
    assert quant_config(cfg).clip == 0.05


def test_identity_registry_pins_on_first_use_and_refuses_a_changed_key(tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILE
    registry = IdentityRegistry(path)
    key, other = generate_identity()[1], generate_identity()[1]
    assert registry.refusal("alice", key) is None
    registry.pin("alice", key, 1)
    registry.save()
    again = IdentityRegistry(path)  # a restarted coordinator
    again.pin("alice", other, 2)  # no effect: the first key stays
    assert again.refusal("alice", key) is None and again.refusal("bob", other) is None
    assert "pinned in round 1" in again.refusal("alice", other)


def _context(**node_config: object) -> Context:
    return Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, **node_config}, state=RecordDict(), run_config={}
    )


def test_identity_key_from_the_state_dir_or_derived_in_simulation(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key, public = generate_identity()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "identity.key").write_bytes(pem)
    for ctx in (_context(**{"state-dir": str(tmp_path)}), _context(**{"identity-key": str(tmp_path / "identity.key")})):
        assert identity_public_bytes(identity_key(ctx, seed=0)) == public
    simulated = [identity_public_bytes(identity_key(_context(**{"partition-id": p}), seed=0)) for p in (0, 0, 1)]
    assert simulated[0] == simulated[1] != simulated[2]


def test_contributor_refuses_a_cohort_below_its_minimum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIMULATION_STATE_ROOT_ENV, str(tmp_path))
    cfg = CampaignConfig.from_dict(small_campaign(secure_aggregation={**SECURE, "min_cohort": 3}))
    seen = []

    def trainer(
        message: object, request: TrainRequest, context: Context, refuse: Callable[[CampaignConfig], str | None]
    ) -> Message:
        seen.append((request.server_round, refuse(request.campaign())))
        raise RuntimeError("stop before training")

    train = TrainRequest.of(cfg, "fingerprint", 1, {"b": np.zeros(3, dtype=np.float32)})
    params = SecAggParams.create("test", 1, [5, 9], 4, quant_config(cfg)).to_message()
    advertise = {**params, "stage": "advertise", "weight_max": 12.0}
    message = SimpleNamespace(
        content=SecAggRequest(advertise, train).content(), metadata=SimpleNamespace(dst_node_id=5)
    )
    with pytest.raises(RuntimeError, match="stop before training"):
        handle_stage("advertise", trainer, message, _context())
    assert seen == [(1, "secure-aggregation cohort of 2 is below this contributor's minimum 3")]
