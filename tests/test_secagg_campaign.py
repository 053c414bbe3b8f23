"""SecAgg+ in whole simulated campaigns: same learning curve as plain FedAvg, dropouts survived, aborts harmless.

Three ``fedtune simulate`` runs (about a minute in all on 2 cores) plus fast unit tests of the pieces the
workflow adds around the protocol core: update encoding, wire format, setup checks, the identity registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tomli_w
from flwr.app import Context, Message, RecordDict

from fedtune.clients.secagg_client import FAIL_ENV, handle_stage, identity_key
from fedtune.config import CampaignConfig, ConfigError
from fedtune.credit.ledger import Ledger, default_url
from fedtune.identity import simulated_contributor_id
from fedtune.rundir import RunDir
from fedtune.secagg import QuantConfig, SecAggClient, SecAggParams, SecAggServer, generate_identity, run_round
from fedtune.secagg.crypto import identity_public_bytes
from fedtune.secagg.flower import (
    check_setup,
    decode_mean,
    encode_update,
    flatten,
    from_content,
    quant_config,
    to_content,
    unflatten,
)
from fedtune.strategies.secure import REGISTRY_FILE, IdentityRegistry

from .conftest import small_campaign

SECURE = {"protocol": "secagg+"}
FOUR = {"simulation": {"contributors": 4}, "federation": {"contributors_per_round": 4, "rounds": 3}}
# round 1: partition 2 crashes while masking; round 2: partitions 1-3 crash, leaving 1 < t = 2; round 3: all fine
FAILURES = "masked_input:2:1,masked_input:1:2,masked_input:2:2,masked_input:3:2"


def simulate(tmp: Path, name: str, raw: dict, env: dict[str, str] | None = None) -> Path:
    config, run = tmp / f"{name}.toml", tmp / name
    config.write_text(tomli_w.dumps(raw))
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", str(config), "--run-dir", str(run)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return run


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secagg")


@pytest.fixture(scope="module")
def plain_run(tmp: Path) -> Path:
    return simulate(tmp, "plain", small_campaign())


@pytest.fixture(scope="module")
def secure_run(tmp: Path) -> Path:
    return simulate(tmp, "secure", small_campaign(secure_aggregation=SECURE))


@pytest.fixture(scope="module")
def failing_run(tmp: Path) -> Path:
    raw = small_campaign(secure_aggregation=SECURE, **FOUR)
    return simulate(tmp, "failing", raw, env={FAIL_ENV: FAILURES})


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
    assert "masked_input" in entries[2].reason and entries[2].credit == 0
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


# -- pieces -------------------------------------------------------------------------------------------


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
    clients = {c: SecAggClient(c, key, registry, "c") for c, (key, _) in idents.items()}
    result = run_round(SecAggServer(params, registry), clients, vectors, {"masked_input": {3}})
    mean, weight = decode_mean(result.total, quant, len(result.survivors))
    kept = [i for i in range(5) if i + 1 in result.survivors]
    assert weight * max(weights) == pytest.approx(sum(weights[i] for i in kept), rel=1e-4)
    exact = sum(weights[i] * (flatten(ends[i]) - flatten(start)) for i in kept) / sum(weights[i] for i in kept)
    assert np.max(np.abs(mean - exact)) < 4 * quant.mean_error_bound
    assert unflatten(flatten(start), start).keys() == start.keys()


def test_wire_format_keeps_uint64_ids_and_uint32_uploads() -> None:
    msg = {"round": 3, "sender": 2**64 - 5, "ids": [2**63 + 1, 7], "ct": [b"x", b""], "b_ids": [],
           "masked": np.arange(10, dtype=np.uint32)}
    back = from_content(to_content(msg))
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
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, **node_config}, state=RecordDict(),
                   run_config={})


def test_identity_key_from_the_state_dir_or_derived_in_simulation(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key, public = generate_identity()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    (tmp_path / "identity.key").write_bytes(pem)
    for ctx in (_context(**{"state-dir": str(tmp_path)}), _context(**{"identity-key": str(tmp_path / "identity.key")})):
        assert identity_public_bytes(identity_key(ctx, seed=0)) == public
    simulated = [identity_public_bytes(identity_key(_context(**{"partition-id": p}), seed=0)) for p in (0, 0, 1)]
    assert simulated[0] == simulated[1] != simulated[2]


def test_contributor_refuses_a_cohort_below_its_minimum() -> None:
    cfg = CampaignConfig.from_dict(small_campaign(secure_aggregation={**SECURE, "min_cohort": 3}))
    seen = []

    def trainer(message: object, context: Context, refuse: Callable[[CampaignConfig], str | None]) -> Message:
        seen.append(refuse(cfg))
        raise RuntimeError("stop before training")

    request = SimpleNamespace(content=to_content({"round": 1, "cohort": [5, 9]}))
    with pytest.raises(RuntimeError, match="stop before training"):
        handle_stage("advertise", trainer, request, _context())
    assert seen == ["secure-aggregation cohort of 2 is below the campaign minimum 3"]
