"""Tests for fedtune.privacy: per-sample gradients, accounting, budget persistence, update clipping."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedtune.ml.losses import per_sequence_loss
from fedtune.ml.tiny import TINY_LLAMA, builtin_path
from fedtune.privacy import (
    STATE_FILE,
    SUMMARY_FILE,
    ContributorPrivacy,
    PrivacyBudgetExceeded,
    PrivacyParams,
    TrainingRun,
    calibrate_noise,
    clip_update,
    default_delta,
    enable_dp_gradient_checkpointing,
    make_private,
    sample_rate_for,
    train_step,
)

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hi",
    "federated learning with differential privacy",
    "lora adapters, tiny",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builtin_path(TINY_LLAMA)


@pytest.fixture(scope="module")
def tokenizer(model_path: Path):  # -> PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def lora_model(model_path: Path, seed: int = 0) -> nn.Module:
    """Tiny Llama with FFA-LoRA (A frozen, B trains); B is randomised so every LoRA path carries gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path).to("cpu")  # device first, then PEFT
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
        elif "lora_B" in name:
            nn.init.normal_(param, std=0.05)
    return model


class TextDataset(Dataset):
    """Token ids of a few strings of very different lengths, so every batch is padded."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.items = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
        self.pad_id = int(tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.items[index]

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sequence; padding has ``attention_mask == 0``."""
        width = max(len(x) for x in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, ids in enumerate(items):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture()
def dataset(tokenizer) -> TextDataset:
    return TextDataset(tokenizer, TEXTS)


def loader_for(dataset: TextDataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=dataset.collate)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def brute_force_grads(model: nn.Module, dataset: TextDataset) -> list[dict[str, torch.Tensor]]:
    """Gradient of each sequence's loss, one unpadded sequence at a time, on the plain model."""
    grads = []
    for ids in dataset.items:
        model.zero_grad(set_to_none=True)
        batch = dataset.collate([ids])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        per_sequence_loss(out.logits, batch["input_ids"], batch["attention_mask"]).mean().backward()
        grads.append({n: p.grad.detach().clone() for n, p in trainable(model)})
    model.zero_grad(set_to_none=True)
    return grads


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def one_step_run(
    model: nn.Module, dataset: TextDataset, mode: str, max_grad_norm: float
) -> tuple[TrainingRun, dict[str, torch.Tensor]]:
    """One noiseless DP step (lr 0) on the whole padded dataset; returns the run and the step's gradient."""
    params = [p for _, p in trainable(model)]
    run = make_private(
        model,
        torch.optim.SGD(params, lr=0.0),
        loader_for(dataset, batch_size=len(dataset)),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=mode,  # type: ignore[arg-type]
    )
    batch = dataset.collate(dataset.items)
    assert batch["attention_mask"].eq(0).any(), "the batch must contain padding"
    assert train_step(run, batch) is not None
    return run, {n: p.grad.detach().clone() for n, p in trainable(model)}


def clipped_mean(grads: list[dict[str, torch.Tensor]], max_grad_norm: float) -> torch.Tensor:
    """What a noiseless DP-SGD step should produce: mean of per-sample gradients clipped to the bound."""
    total = torch.zeros_like(flat(grads[0]))
    for g in grads:
        vec = flat(g)
        total += vec * min(1.0, max_grad_norm / (float(vec.norm()) + 1e-6))
    return total / len(grads)


# -------------------------------------------------------------------------------------------------
# Per-sample gradients
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "reentrant-checkpointing"])
def test_hooks_per_sample_grads_match_brute_force_with_padding(
    model_path: Path, dataset: TextDataset, checkpointing: bool
) -> None:
    model = lora_model(model_path)
    expected = brute_force_grads(model, dataset)
    if checkpointing:
        enable_dp_gradient_checkpointing(model)
    run, _ = one_step_run(model, dataset, "hooks", max_grad_norm=1e6)
    assert model.training
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) is checkpointing
    names = [n for n, _ in trainable(model)]
    per_sample = {n: p.grad_sample.detach().clone() for n, p in trainable(model)}
    run.close()
    assert all(n.endswith("lora_B.default.weight") for n in names)
    for i, grads in enumerate(expected):
        actual = torch.cat([per_sample[n][i].reshape(-1) for n in names])
        assert relative_error(actual, flat(grads)) < REL_TOL, f"sample {i}"


def test_ghost_norms_and_clipped_gradient_match_hooks_and_brute_force(model_path: Path, dataset: TextDataset) -> None:
    model = lora_model(model_path)
    expected = brute_force_grads(model, dataset)
    norms = torch.tensor([float(flat(g).norm()) for g in expected])
    bound = float(norms.median())  # some samples clipped, some not
    want = clipped_mean(expected, bound)

    summed = {}
    for mode in ("hooks", "ghost"):
        run, grads = one_step_run(model, dataset, mode, max_grad_norm=bound)
        if mode == "ghost":
            ghost_norms = run.module.per_sample_gradient_norms.detach()
            assert relative_error(ghost_norms, norms) < REL_TOL
        run.close()
        summed[mode] = flat(grads)
        assert relative_error(summed[mode], want) < REL_TOL, mode
    assert relative_error(summed["ghost"], summed["hooks"]) < REL_TOL


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_take_noise_only_steps(model_path: Path, dataset: TextDataset, mode: str) -> None:
    model = lora_model(model_path)
    params = [p for _, p in trainable(model)]
    for round_ in range(2):  # the same model is wrapped again next round
        before = flat({n: p.detach().clone() for n, p in trainable(model)})
        with make_private(
            model,
            torch.optim.SGD(params, lr=0.1),
            loader_for(dataset, batch_size=2),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,  # type: ignore[arg-type]
            sample_rate=0.1,  # P(empty) = 0.9**4 ≈ 0.66
            sample_generator=torch.Generator().manual_seed(round_),
        ) as run:
            metrics = run.train_steps(12)
        assert metrics["steps"] == 12 and run.steps_taken == 12
        assert 0 < metrics["empty_batches"] < 12
        assert not any(hasattr(p, "grad_sample") or hasattr(p, "_norm_sample") for p in params), "hooks left"
        assert not torch.equal(before, flat({n: p.detach() for n, p in trainable(model)}))


def test_non_reentrant_checkpointing_is_refused(model_path: Path, dataset: TextDataset) -> None:
    model = lora_model(model_path)
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="use_reentrant"):
        make_private(
            model,
            torch.optim.SGD([p for _, p in trainable(model)], lr=0.1),
            loader_for(dataset, batch_size=2),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


# -------------------------------------------------------------------------------------------------
# Accounting
# -------------------------------------------------------------------------------------------------

SHARD, BATCH, LOCAL_STEPS = 40, 4, 3  # q = 0.1


def train_round(
    state_dir: Path, params: PrivacyParams, model: nn.Module, dataset: TextDataset
) -> tuple[ContributorPrivacy, bool, str]:
    """The trainer's round, as documented: load, check, make_private, train, (record on exit), save."""
    privacy = ContributorPrivacy.load(
        state_dir, params, shard_size=len(dataset), batch_size=BATCH, local_steps=LOCAL_STEPS
    )
    ok, reason = privacy.check_round(LOCAL_STEPS)
    if ok:
        optimizer = torch.optim.SGD([p for _, p in trainable(model)], lr=0.05)
        with privacy.make_private(model, optimizer, loader_for(dataset, BATCH)) as run:
            run.train_steps(LOCAL_STEPS)
        privacy.save()
    return privacy, ok, reason


def independent_epsilon(kind: str, noise: float, sample_rate: float, steps: int, delta: float) -> float:
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=kind)
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=sample_rate)
    return float(accountant.get_epsilon(delta=delta))


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_epsilon_after_rounds_matches_independent_opacus_accountant(
    tmp_path: Path, model_path: Path, tokenizer, kind: str
) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    params = PrivacyParams(target_epsilon=4.0, accountant=kind, planned_rounds=4)  # type: ignore[arg-type]
    dataset = TextDataset(tokenizer, TEXTS * (SHARD // len(TEXTS)))
    model = lora_model(model_path)
    rounds = 3
    for _ in range(rounds):
        privacy, ok, reason = train_round(tmp_path, params, model, dataset)
        assert ok, reason
    privacy = ContributorPrivacy.load(tmp_path, params, shard_size=SHARD, batch_size=BATCH, local_steps=LOCAL_STEPS)
    q, delta = sample_rate_for(BATCH, SHARD), default_delta(SHARD)
    noise = get_noise_multiplier(
        target_epsilon=4.0, target_delta=delta, sample_rate=q, steps=LOCAL_STEPS * 4, accountant=kind
    )
    assert (privacy.sample_rate, privacy.delta, privacy.noise_multiplier) == (q, delta, noise)
    assert privacy.steps == rounds * LOCAL_STEPS and privacy.rounds == rounds
    want = independent_epsilon(kind, noise, q, rounds * LOCAL_STEPS, delta)
    assert privacy.epsilon_spent() == pytest.approx(want, rel=0.01)
    assert privacy.epsilon_after(LOCAL_STEPS) == pytest.approx(
        independent_epsilon(kind, noise, q, (rounds + 1) * LOCAL_STEPS, delta), rel=0.01
    )
    assert privacy.epsilon_after(LOCAL_STEPS) <= 4.0  # the planned horizon lands within the target
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["epsilon_spent"] == pytest.approx(want, rel=0.01)
    assert summary["steps"] == rounds * LOCAL_STEPS and summary["rounds"] == rounds
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["accountant"] == {"history": [[noise, q, rounds * LOCAL_STEPS]], "mechanism": kind}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([STATE_FILE, SUMMARY_FILE]), "no temp files left"


def test_small_personal_budget_declines_and_keeps_declining_after_reload(tmp_path: Path) -> None:
    params = PrivacyParams(target_epsilon=8.0, personal_max_epsilon=5.0, planned_rounds=10, accountant="rdp")
    shape = {"shard_size": 100, "batch_size": 10, "local_steps": 20}
    accepted = 0
    for _ in range(10):
        privacy = ContributorPrivacy.load(tmp_path, params, **shape)
        ok, reason = privacy.check_round(shape["local_steps"])
        if not ok:
            assert "budget" in reason
            break
        privacy.record_round(shape["local_steps"])
        privacy.save()
        accepted += 1
        assert privacy.epsilon_spent() <= params.budget
    assert 0 < accepted < 10, "a stricter personal budget must stop the contributor before the horizon"
    for _ in range(2):  # fresh objects from the same state dir keep declining
        reloaded = ContributorPrivacy.load(tmp_path, params, **shape)
        assert reloaded.rounds == accepted
        assert reloaded.epsilon_spent() <= params.budget
        assert reloaded.check_round(shape["local_steps"])[0] is False
        assert reloaded.check_round(1)[0] is (reloaded.epsilon_after(1) <= params.budget)
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["epsilon_spent"] <= summary["budget"] == 5.0


def test_training_past_the_budget_raises(tmp_path: Path, model_path: Path, dataset: TextDataset) -> None:
    params = PrivacyParams(target_epsilon=3.0, planned_rounds=1, accountant="rdp")
    privacy = ContributorPrivacy.load(tmp_path, params, shard_size=len(dataset), batch_size=2, local_steps=2)
    model = lora_model(model_path)
    optimizer = torch.optim.SGD([p for _, p in trainable(model)], lr=0.05)
    with privacy.make_private(model, optimizer, loader_for(dataset, 2)) as run:
        run.train_steps(2)
        with pytest.raises(PrivacyBudgetExceeded):
            run.train_steps(50)
    assert privacy.steps == 2 and privacy.epsilon_spent() <= 3.0


def test_without_dp_a_personal_budget_declines(tmp_path: Path) -> None:
    shape = {"shard_size": 10, "batch_size": 2, "local_steps": 5}
    plain = ContributorPrivacy.load(tmp_path, PrivacyParams(mechanism="none"), **shape)
    assert plain.check_round(5)[0] and plain.epsilon_spent() == 0.0
    strict = ContributorPrivacy.load(tmp_path, PrivacyParams(mechanism="none", personal_max_epsilon=5.0), **shape)
    assert strict.check_round(5)[0] is False
    plain.record_round(5)
    plain.save()
    switched = ContributorPrivacy.load(tmp_path, PrivacyParams(), **shape)  # campaign turns DP on later
    assert switched.epsilon_spent() == math.inf and switched.check_round(1)[0] is False


def test_params_validation_and_defaults() -> None:
    assert default_delta(50) == 1e-5 and default_delta(1_000_000) == 1e-7
    assert PrivacyParams(target_epsilon=8.0, personal_max_epsilon=3.0).budget == 3.0
    assert PrivacyParams.from_mapping({"target_epsilon": 2.0, "accountant": "rdp"}).accountant == "rdp"
    with pytest.raises(ValueError, match="unknown"):
        PrivacyParams.from_mapping({"epsilon": 2.0})
    with pytest.raises(ValueError):
        PrivacyParams(grad_sample_mode="functorch")  # type: ignore[arg-type]
    from fedtune.config import PrivacySection

    params = PrivacyParams.from_campaign(
        PrivacySection(mechanism="dp-sgd"), campaign_rounds=7, personal_max_epsilon=2.0
    )
    assert (params.planned_rounds, params.target_delta, params.update_clip_norm, params.budget) == (
        7,
        None,
        None,
        2.0,
    )
    with pytest.raises(ValueError, match="cannot reach"):
        calibrate_noise(1e-9, 1e-5, 1.0, 10_000, "rdp")


# -------------------------------------------------------------------------------------------------
# Update clipping
# -------------------------------------------------------------------------------------------------


def global_norm(update: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values()))


@pytest.mark.parametrize(
    ("make", "bound", "clipped"),
    [
        (lambda rng: {"a": rng.normal(size=(8, 4)).astype(np.float32), "b": rng.normal(size=3)}, 1.0, True),
        (lambda rng: {"a": rng.normal(size=(8, 4)).astype(np.float32) * 1e-3}, 1.0, False),
        (lambda rng: {"a": np.zeros((2, 2), dtype=np.float32)}, 1.0, False),
    ],
    ids=["above", "below", "zero"],
)
def test_clip_update(make: Callable[[np.random.Generator], dict[str, np.ndarray]], bound: float, clipped: bool) -> None:
    update = make(np.random.default_rng(0))
    out, norm = clip_update(update, bound)
    assert norm == pytest.approx(global_norm(update))
    assert out.keys() == update.keys()
    for key in update:
        assert out[key].dtype == update[key].dtype and out[key].shape == update[key].shape
    if clipped:
        assert global_norm(out) == pytest.approx(bound, rel=1e-6)
        scale = out["a"].ravel()[0] / update["a"].ravel()[0]
        for key in update:  # direction kept
            np.testing.assert_allclose(out[key], update[key] * scale, rtol=1e-6)
    else:
        for key in update:
            np.testing.assert_array_equal(out[key], update[key])


def test_clip_update_rejects_non_finite() -> None:
    with pytest.raises(ValueError):
        clip_update({"a": np.array([np.nan, 1.0])}, 1.0)
    with pytest.raises(ValueError):
        clip_update({"a": np.ones(3)}, 0.0)
