"""Contributors of every size: smaller LoRA ranks and batches aggregate exactly, hardware requirements decline,
credit follows the work taken on, and the new config keys fail with one line.

Four contributors of ranks 8 (the campaign's), 4, 2, 1 and batches 4, 2, 3, 1 train with fedtune's own ClientApp
on an in-process grid, through the plain driver (Flower's FedAvg) and SecAgg+. Each contributor's update ΔW_i is
read independently of the padding code: PEFT's own ``get_delta_weight`` of the model it trained, minus the shared
adapter truncated to its rank (what it started from, by definition).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.clients.app import LocalUpdate, local_update, register_handlers
from fedtune.clients.policy import SIMULATION_STATE_ROOT_ENV, prepare_simulated_contributors
from fedtune.clients.workspace import CACHE, Hardware, contributor_hardware, unmet_requirements
from fedtune.config import CampaignConfig
from fedtune.credit.formula import round_credit, train_flops_per_token
from fedtune.credit.ledger import Ledger, default_url
from fedtune.credit.recorder import CreditKeeper
from fedtune.ml.model import build_model, count_parameters, trainable_arrays
from fedtune.strategies.driver import RoundResult
from fedtune.strategies.plain import PlainRound
from fedtune.strategies.secure import SecureRound
from fedtune.strategies.server_optimizer import build_strategy
from fedtune.wire import ContributorInfo, TrainReport, TrainRequest, Work

from ..conftest import small_campaign
from .inprocess_grid import InProcessGrid
from .lora_reference import relative_error, weighted_mean
from .test_config_errors import run_bad

RANK, ALPHA = 8, 16.0
RANKS = {0: 8, 1: 4, 2: 2, 3: 1}
BATCHES = {0: 4, 1: 2, 2: 3, 3: 1}
NODES = {100 + p: p for p in RANKS}


def campaign(secure: bool = False, **extra: dict[str, Any]) -> CampaignConfig:
    raw = small_campaign(
        lora={"rank": RANK, "alpha": ALPHA},
        federation={"contributors_per_round": 4, "min_cohort": 2, "local_steps": 3, "batch_size": 4},
        simulation={"contributors": 4},
    )
    if secure:
        raw["secure_aggregation"] = {"protocol": "secagg+", "bits": 24, "clip_range": 0.5, "stage_timeout_s": 60.0}
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    return CampaignConfig.from_dict(raw)


def shared_start(cfg: CampaignConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A shared adapter that already moved (random B) and the campaign's frozen A, by lora_B name."""
    model, _ = build_model(cfg)
    rng = np.random.default_rng(0)
    start = {k: rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in trainable_arrays(model).items()}
    frozen = {
        n.replace("lora_A", "lora_B"): p.detach().numpy().astype(np.float64)
        for n, p in model.named_parameters()
        if "lora_A" in n
    }
    return start, frozen


def delta_w(b: dict[str, np.ndarray], a: dict[str, np.ndarray], scale: float, rank: int = RANK) -> dict:
    return {k: scale * b[k][:, :rank].astype(np.float64) @ a[k][:rank] for k in b}


def peft_delta_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """PEFT's own ΔW (its scaling, its A) of every LoRA module, by lora_B parameter name."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_B", {}):
            key = f"{name}.lora_B.default.weight"
            out[key] = module.get_delta_weight("default").detach().double().numpy()
    return out


def run_round(cfg: CampaignConfig, folder: Path, secure: bool) -> tuple[RoundResult, dict[int, dict], dict[int, Any]]:
    """One round of fedtune's ClientApp (node configs choose rank and batch); each contributor's ΔW_i kept."""
    start, frozen = shared_start(cfg)
    updates: dict[int, dict] = {}
    models: dict[int, Any] = {}

    def trainer(message: Message, request: TrainRequest, context: Context, refuse: Any = None) -> Any:
        update = local_update(message, request, context, refuse)
        p = int(context.node_config["partition-id"])
        model = next(reversed(CACHE.models.values()))[0]  # the model just trained (most recently used)
        models[p] = model
        before = delta_w(start, frozen, ALPHA / RANK, RANKS[p])  # the shared adapter truncated to rank r
        updates[p] = {k: v - before[k] for k, v in peft_delta_weights(model).items()}
        return update

    app = ClientApp()
    register_handlers(app, trainer)
    nodes = {
        node: {"partition-id": p, "num-partitions": 4, "max-rank": RANKS[p], "batch-size": BATCHES[p]}
        for node, p in NODES.items()
    }
    grid = InProcessGrid(app, nodes)
    driver = SecureRound(cfg, folder) if secure else PlainRound(cfg)
    request = TrainRequest.of(cfg, _fingerprint(cfg), 1, start)
    with virtual_contributors(cfg, folder):
        result = driver.run(grid, build_strategy(cfg, 4), request)
    return result, updates, {"start": start, "frozen": frozen, "models": models}


@contextlib.contextmanager
def virtual_contributors(cfg: CampaignConfig, folder: Path) -> Iterator[None]:
    """Run the nodes as a simulation's virtual contributors: their own state and policy, as the launcher writes."""
    root = folder / "contributors"
    prepare_simulated_contributors(cfg, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SIMULATION_STATE_ROOT_ENV, str(root))
        yield


def _fingerprint(cfg: CampaignConfig) -> str:
    from fedtune.ml.model import base_fingerprint

    return base_fingerprint(cfg.model)


def aggregate_error(result: RoundResult, updates: dict[int, dict], ctx: dict[str, Any]) -> float:
    weights = [float(3 * BATCHES[p]) for p in sorted(updates)]
    exact = weighted_mean([updates[p] for p in sorted(updates)], weights)
    start, frozen = ctx["start"], ctx["frozen"]
    before = delta_w(start, frozen, ALPHA / RANK)
    merged = {k: v - before[k] for k, v in delta_w(result.arrays, frozen, ALPHA / RANK).items()}
    return relative_error(merged, exact)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[RoundResult, dict, dict, Path]:
    folder = tmp_path_factory.mktemp("plain")
    return (*run_round(campaign(), folder, secure=False), folder)


def test_heterogeneous_ranks_aggregate_exactly_through_flowers_fedavg(plain: tuple) -> None:
    result, updates, ctx, _ = plain
    assert result.applied and {o.status for o in result.outcomes} == {"included"}
    assert {NODES[o.node_id]: (o.work.rank, o.work.batch_size) for o in result.outcomes} == {
        p: (RANKS[p], BATCHES[p]) for p in RANKS
    }
    assert {NODES[o.node_id]: o.report.num_examples for o in result.outcomes} == {p: 3 * BATCHES[p] for p in RANKS}
    assert all(float(np.abs(u[k]).max()) > 0 for u in updates.values() for k in u)
    err = aggregate_error(result, updates, ctx)
    print(f"heterogeneous ranks {sorted(RANKS.values())}: relative error {err:.2e}")
    assert err <= 1e-6


def test_a_smaller_rank_starts_from_the_shared_adapter_truncated(plain: tuple) -> None:
    """The local model's A is the campaign's first r rows, and its start ΔW is the shared one's rank-r part."""
    from fedtune.clients.workspace import LocalChoice, Workspace
    from fedtune.ml.model import load_trainable
    from fedtune.ml.precision import Precision

    _, _, ctx, _ = plain
    cfg, start, frozen = campaign(), ctx["start"], ctx["frozen"]
    model, _ = build_model(cfg, rank=2)
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert np.array_equal(p.detach().numpy(), frozen[n.replace("lora_A", "lora_B")][:2].astype(np.float32))
    ws = Workspace(cfg, model, None, LocalChoice(rank=2, batch_size=4), Precision())  # type: ignore[arg-type]
    load_trainable(model, ws.to_local(start))
    assert relative_error(peft_delta_weights(model), delta_w(start, frozen, ALPHA / RANK, 2)) < 1e-6
    # and an untrained contributor uploads exactly the shared adapter
    back = ws.to_campaign(start, trainable_arrays(model))
    assert all(np.array_equal(back[k], start[k]) for k in start)


def test_heterogeneous_ranks_under_secagg_upload_the_full_shape(tmp_path: Path) -> None:
    result, updates, ctx = run_round(campaign(secure=True), tmp_path, secure=True)
    assert result.applied and result.extra["survivors"] == 4
    # the masked input carries each contributor's work claim, so credit follows it under SecAgg+ too
    assert {NODES[o.node_id]: (o.work.rank, o.work.batch_size) for o in result.outcomes if o.work} == {
        p: (RANKS[p], BATCHES[p]) for p in RANKS
    }
    assert result.bytes_up == 4 * 4 * (sum(v.size for v in ctx["start"].values()) + 1)  # campaign shape, every one
    err = aggregate_error(result, updates, ctx)
    print(f"heterogeneous ranks under SecAgg+ (24-bit quantization): relative error {err:.2e}")
    assert err <= 1e-4


def test_credit_follows_each_contributors_rank_and_batch(plain: tuple) -> None:
    result, _, _, folder = plain
    cfg = campaign()
    full, _ = build_model(cfg)
    n_base, n_adapter = count_parameters(full)
    n_train = sum(p.numel() for p in full.parameters() if p.requires_grad)
    expected = {}
    for p, rank in RANKS.items():
        local, _ = build_model(cfg, rank=rank)  # counted on a rank-r model, not scaled
        _, adapter_r = count_parameters(local)
        train_r = sum(q.numel() for q in local.parameters() if q.requires_grad)
        tokens = 3 * BATCHES[p] * cfg.data.max_seq_len
        expected[p] = round_credit(tokens, train_flops_per_token(n_base, adapter_r, train_r))
    with Ledger.open(default_url(folder)) as ledger:
        CreditKeeper(cfg, ledger, n_base, n_adapter, n_train).record(1, result.outcomes)
        got = {e.contributor_id: e.credit for e in ledger.round_entries(cfg.campaign.name, 1)}
    ids = {NODES[o.node_id]: o.contributor.id for o in result.outcomes}
    for p in RANKS:
        assert got[ids[p]] == pytest.approx(expected[p], rel=1e-12), p
    assert got[ids[0]] > got[ids[2]] > got[ids[3]]


def cheat(fate: str) -> ClientApp:
    """Contributors claiming less work than their update shows."""

    def trainer(message: Message, request: TrainRequest, context: Context, refuse: Any = None) -> Any:
        p = int(context.node_config["partition-id"])
        start = request.tensors()
        end = {k: v.copy() for k, v in start.items()}
        for v in end.values():
            v[:, : 2 if fate == "rank" else 1] += 0.01 * (p + 1)
        batch = 2 if fate == "batch" and p < 2 else 1
        report = TrainReport(3 * 2, 3, 1.0)  # 3 steps x batch 2 reported
        work = Work(rank=1, batch_size=batch if fate == "batch" else 2)
        return LocalUpdate(request.campaign(), start, end, report, ContributorInfo(f"c{p}", f"c{p}"), work)

    app = ClientApp()
    register_handlers(app, trainer)
    return app


@pytest.mark.parametrize("fate", ["rank", "batch"])
def test_a_work_claim_the_update_contradicts_fails_the_node(tmp_path: Path, fate: str) -> None:
    cfg = campaign()
    start, _ = shared_start(cfg)
    grid = InProcessGrid(cheat(fate), {node: {"partition-id": p} for node, p in NODES.items()})
    result = PlainRound(cfg).run(grid, build_strategy(cfg, 4), TrainRequest.of(cfg, "f", 1, start))
    statuses = {NODES[o.node_id]: (o.status, o.reason or "") for o in result.outcomes}
    if fate == "rank":  # everyone changed column 2 but claims rank 1
        assert all(s == "failed" and "beyond column 1" in r for s, r in statuses.values())
    else:  # partitions 0, 1 claim batch 2 with 6 examples: consistent; 2, 3 claim batch 1 with 6
        assert statuses[0][0] == statuses[1][0] == "included"
        assert all(s == "failed" and "examples reported" in r for p, (s, r) in statuses.items() if p >= 2)


# -- requirements --------------------------------------------------------------------------------------

GPU_8GB = Hardware("cuda:0", vram_bytes=8 * 2**30, compute_capability="7.5", bf16=False, ram_bytes=16 * 2**30)


@pytest.mark.parametrize(
    ("requirements", "hardware", "reason"),
    [
        ({"gpu": True}, Hardware("cpu", ram_bytes=2**34), "a CUDA GPU"),
        ({"min_vram_gb": 12.0}, GPU_8GB, "at least 12 GiB of GPU memory; this contributor's cuda:0 has 8.0"),
        ({"min_compute_capability": "8.0"}, GPU_8GB, "compute capability >= 8.0; this contributor's cuda:0 has 7.5"),
        ({"bf16": True}, GPU_8GB, "bfloat16 support"),
        ({"min_ram_gb": 32.0}, GPU_8GB, "at least 32 GiB of RAM"),
        ({"min_vram_gb": 8.0, "min_compute_capability": "7.0"}, GPU_8GB, None),
    ],
)
def test_requirements_against_hardware(requirements: dict, hardware: Hardware, reason: str | None) -> None:
    got = unmet_requirements(campaign(requirements=requirements), hardware)
    assert (got is None) if reason is None else (reason in (got or "") and "\n" not in got), got


def test_requirements_read_the_contributors_hardware_json(tmp_path: Path) -> None:
    """``fedtune join`` writes ``hardware.json`` (the probe's dict); the contributor checks against it."""
    from fedtune.clients.hardware import GpuInfo, HardwareInfo

    gpu = GpuInfo(0, "GeForce GTX 1080", 8 * 2**30, "6.1", False)
    info = HardwareInfo("cuda:0", "cpu", 8, 2**35, "2.13", "12.8", [gpu])
    (tmp_path / "hardware.json").write_text(json.dumps({**info.as_dict(), "peak_flops": 1e13}))
    hw = contributor_hardware({"state-dir": str(tmp_path)})
    assert hw == Hardware("cuda:0", 8 * 2**30, "6.1", False, 2**35, "GeForce GTX 1080")
    reason = unmet_requirements(campaign(model={"dtype": "bfloat16"}), hw)
    assert reason is not None and "GeForce GTX 1080" in reason and "bfloat16" in reason


def test_a_contributor_declines_a_campaign_its_hardware_cannot_run(tmp_path: Path) -> None:
    from fedtune.clients.app import app

    cfg = campaign(requirements={"min_vram_gb": 100_000.0})  # no machine has 100 TB of GPU memory
    start, _ = shared_start(cfg)
    before = dict(CACHE.counts)
    grid = InProcessGrid(app, {node: {"partition-id": p, "num-partitions": 4} for node, p in NODES.items()})
    request = TrainRequest.of(cfg, _fingerprint(cfg), 1, start)
    with virtual_contributors(cfg, tmp_path):
        result = PlainRound(cfg).run(grid, build_strategy(cfg, 4), request)
    assert not result.applied and {o.status for o in result.outcomes} == {"declined"}
    assert all("at least 100000 GiB of GPU memory" in o.reason for o in result.outcomes)
    assert CACHE.counts["build_model"] == before["build_model"], "declined before any model was built"


# -- config --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "key", "expected"),
    [
        ({"model": {"quantization": "3bit"}}, "[model] quantization", "one of 'none', '8bit', '4bit'"),
        ({"model": {"gradient_checkpointing": "yes"}}, "[model] gradient_checkpointing", "true or false"),
        ({"model": {"dtype": "float16"}, "privacy": {"mechanism": "dp-sgd"}}, "[model] dtype", "under DP-SGD"),
        ({"federation": {"micro_batch_size": -1}}, "[federation] micro_batch_size", "an integer >= 0"),
        ({"simulation": {"max_rank": {"0": 9}}}, "[simulation] max_rank.0", "at most the campaign's [lora] rank (4)"),
        ({"simulation": {"batch_size": {"0": 0}}}, "[simulation] batch_size.0", "an integer >= 1"),
        ({"simulation": {"micro_batch_size": {"7": 1}}}, "[simulation] micro_batch_size.7", "partition id below 3"),
        ({"simulation": {"max_rank": {"0": 2}}, "lora": {"mode": "lora"}}, "[simulation] max_rank", "mode = 'ffa'"),
        ({"simulation": {"workspace_cache": 1}}, "[simulation] workspace_cache", "true or false"),
        ({"requirements": {"min_vram_gb": -1}}, "[requirements] min_vram_gb", "a number >= 0"),
        ({"requirements": {"min_compute_capability": "eight"}}, "[requirements] min_compute_capability", "MAJOR.MINOR"),
        ({"requirements": {"gpus": 2}}, "[requirements] gpus", "one of the keys"),
    ],
)
def test_new_keys_fail_with_one_line(capsys, tmp_path, write_campaign, sections, key, expected) -> None:
    line = run_bad(capsys, write_campaign(**sections), tmp_path)
    assert key in line and expected in line, line


def test_a_contributors_choice_only_ever_lowers_its_work() -> None:
    from fedtune.clients.workspace import LocalChoice, local_choice

    cfg = campaign(simulation={"max_rank": {"1": 2}, "batch_size": {"1": 3}, "micro_batch_size": {"1": 1}})
    assert local_choice(cfg, {}, 0) == LocalChoice(rank=RANK, batch_size=4, micro_batch_size=0)
    assert local_choice(cfg, {}, 1) == LocalChoice(rank=2, batch_size=3, micro_batch_size=1)  # [simulation] tables
    node = {"max-rank": 99, "batch-size": 2, "micro-batch": 5}  # asking for more gets the campaign's
    assert local_choice(cfg, node, 1) == LocalChoice(rank=RANK, batch_size=2, micro_batch_size=0)
    plain_lora = campaign(lora={"mode": "lora"})
    reason = local_choice(plain_lora, {"max-rank": 2}, 0)
    assert isinstance(reason, str) and "mode 'ffa'" in reason


def test_an_adapter_tensor_of_another_shape_is_refused_not_broadcast() -> None:
    """A rank-1 B where the model holds rank 8 would broadcast into every column through ``copy_``: refused,
    naming the tensor, before any parameter changes."""
    from fedtune.ml.model import load_trainable

    torch.manual_seed(0)
    model, _ = build_model(CampaignConfig.from_dict(small_campaign()))
    before = trainable_arrays(model)
    name = next(n for n in before if "lora_B" in n)
    bad = {n: a + 1.0 for n, a in before.items()} | {name: before[name][:, :1] + 1.0}
    with pytest.raises(ValueError, match=f"adapter tensor '{name}' is \\[{before[name].shape[0]}, 1\\]"):
        load_trainable(model, bad)
    assert all(np.array_equal(a, trainable_arrays(model)[n]) for n, a in before.items())
