"""Tests for fedtune.privacy and the one local loop: per-sample gradients, Poisson batches, accounting, clipping."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant
from torch import nn

from fedtune.clients.trainer import Randomness, causal_lm_loss, train_local, train_step
from fedtune.ml.data import TokenizedSet
from fedtune.ml.losses import per_sequence_loss
from fedtune.ml.tiny import TINY_LLAMA, builtin_path
from fedtune.privacy import (
    DEFAULT_DELTA,
    STATE_FILE,
    SUMMARY_FILE,
    ContributorPrivacy,
    PrivacyBudgetExceeded,
    PrivacyParams,
    PrivateRun,
    batch_rows,
    calibrate_noise,
    clip_update,
    delta_fits,
    enable_dp_gradient_checkpointing,
    make_private,
    poisson_loader,
    sample_rate_for,
)
from fedtune.privacy.accounting import PRV_MAX_GRID_POINTS, prv_grid_points

from ..conftest import run_python

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hi",
    "federated learning with differential privacy",
    "lora adapters, tiny",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def model_path() -> Path:
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


def make_shard(tokenizer, texts: list[str]) -> TokenizedSet:
    """The trainer's own dataset type, over strings of very different lengths, so every batch is padded."""
    return TokenizedSet(ids=[tokenizer(t)["input_ids"] for t in texts], pad_id=int(tokenizer.pad_token_id))


@pytest.fixture()
def shard(tokenizer) -> TokenizedSet:
    return make_shard(tokenizer, TEXTS)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for _, p in trainable(model)])


def brute_force_grads(model: nn.Module, shard: TokenizedSet) -> list[dict[str, torch.Tensor]]:
    """Gradient of each sequence's loss, one unpadded sequence at a time, on the plain model."""
    grads = []
    for ids in shard.ids:
        model.zero_grad(set_to_none=True)
        batch = shard.pad([ids])
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
    model: nn.Module, shard: TokenizedSet, mode: str, max_grad_norm: float
) -> tuple[PrivateRun, dict[str, torch.Tensor]]:
    """One noiseless DP step (lr 0) on the whole padded shard; returns the run and the step's gradient."""
    run = make_private(
        model,
        torch.optim.SGD([p for _, p in trainable(model)], lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=len(shard),
        grad_sample_mode=mode,  # type: ignore[arg-type]
    )
    batch = shard.pad(shard.ids)
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


def raw_privacy(
    tmp_path: Path,
    *,
    noise: float,
    sample_rate: float,
    mode: str = "hooks",
    max_grad_norm: float = 1.0,
    epsilon: float = 1e6,
) -> ContributorPrivacy:
    """A contributor's privacy state with a chosen noise multiplier and rate (no calibration, a loose budget)."""
    params = PrivacyParams(
        target_epsilon=epsilon,
        accountant="rdp",
        grad_sample_mode=mode,  # type: ignore[arg-type]
        max_grad_norm=max_grad_norm,
    )
    return ContributorPrivacy(
        params, noise, 1e-5, sample_rate, {}, create_accountant(mechanism="rdp"), state_dir=tmp_path
    )


def no_opacus_attributes_left(model: nn.Module) -> bool:
    return not any(hasattr(p, "grad_sample") or hasattr(p, "_norm_sample") for _, p in trainable(model))


# -------------------------------------------------------------------------------------------------
# Per-sample gradients
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "reentrant-checkpointing"])
def test_hooks_per_sample_grads_match_brute_force_with_padding(
    model_path: Path, shard: TokenizedSet, checkpointing: bool
) -> None:
    model = lora_model(model_path)
    expected = brute_force_grads(model, shard)
    if checkpointing:
        enable_dp_gradient_checkpointing(model)
    run, _ = one_step_run(model, shard, "hooks", max_grad_norm=1e6)
    assert model.training
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) is checkpointing
    names = [n for n, _ in trainable(model)]
    per_sample = {n: p.grad_sample.detach().clone() for n, p in trainable(model)}
    run.close()
    assert all(n.endswith("lora_B.default.weight") for n in names)
    for i, grads in enumerate(expected):
        actual = torch.cat([per_sample[n][i].reshape(-1) for n in names])
        assert relative_error(actual, flat(grads)) < REL_TOL, f"sample {i}"


def test_ghost_norms_and_clipped_gradient_match_hooks_and_brute_force(model_path: Path, shard: TokenizedSet) -> None:
    model = lora_model(model_path)
    expected = brute_force_grads(model, shard)
    norms = torch.tensor([float(flat(g).norm()) for g in expected])
    bound = float(norms.median())  # some samples clipped, some not
    want = clipped_mean(expected, bound)

    summed = {}
    for mode in ("hooks", "ghost"):
        run, grads = one_step_run(model, shard, mode, max_grad_norm=bound)
        if mode == "ghost":
            ghost_norms = run.module.per_sample_gradient_norms.detach()
            assert relative_error(ghost_norms, norms) < REL_TOL
        run.close()
        summed[mode] = flat(grads)
        assert relative_error(summed[mode], want) < REL_TOL, mode
    assert relative_error(summed["ghost"], summed["hooks"]) < REL_TOL


def test_secure_mode_reaches_opacus_noise(model_path: Path) -> None:
    """``secure_mode`` makes Opacus draw each noise value as 4 Gaussians summed and halved: same σ·C, other values."""
    moved = {}
    for secure in (False, True):
        model = lora_model(model_path)
        before = weights(model)
        run = make_private(
            model,
            torch.optim.SGD([p for _, p in trainable(model)], lr=1.0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=1,
            noise_generator=torch.Generator().manual_seed(0),
            secure_mode=secure,
        )
        run.empty_step()  # a noise-only step: the update is minus the noise
        run.close()
        moved[secure] = weights(model) - before
    assert not torch.equal(moved[False], moved[True])
    for delta in moved.values():
        assert delta.numel() > 10_000 and abs(float(delta.std()) - 1.0) < 0.05


def test_non_reentrant_checkpointing_is_refused(model_path: Path) -> None:
    model = lora_model(model_path)
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="use_reentrant"):
        make_private(
            model,
            torch.optim.SGD([p for _, p in trainable(model)], lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=2,
        )


# -------------------------------------------------------------------------------------------------
# One loop: plain and DP, Poisson batches
# -------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_with_negligible_noise_and_no_clipping_trains_like_the_plain_path(
    tmp_path: Path, model_path: Path, shard: TokenizedSet, mode: str
) -> None:
    """With noise far below Adam's ε, a clip no gradient reaches and q = 1, the DP path must train like the plain one.

    q = 1 puts every record in every batch, so both paths see the same batches. (σ = 0 would be refused by the
    budget check: steps without noise have no finite ε.)
    """
    kwargs = {"steps": 3, "batch_size": len(shard), "learning_rate": 0.01}
    initial = weights(lora_model(model_path))
    plain_model, dp_model = lora_model(model_path), lora_model(model_path)
    plain = train_local(plain_model, shard, randomness=Randomness.from_seed(1), **kwargs)  # type: ignore[arg-type]
    privacy = raw_privacy(tmp_path, noise=1e-12, sample_rate=1.0, mode=mode, max_grad_norm=100.0, epsilon=1e30)
    private = train_local(dp_model, shard, randomness=Randomness.from_seed(2), privacy=privacy, **kwargs)  # type: ignore[arg-type]
    assert (private.examples, private.tokens, private.steps) == (plain.examples, plain.tokens, plain.steps)
    assert private.train_loss == pytest.approx(plain.train_loss, rel=1e-5)
    moved = weights(plain_model) - initial
    assert float(moved.norm()) > 0
    assert relative_error(weights(dp_model) - initial, moved) < 1e-4
    assert privacy.steps == 3 and no_opacus_attributes_left(dp_model)


def test_plain_batches_come_from_the_generator_passed_in(model_path: Path, shard: TokenizedSet) -> None:
    kwargs = {"steps": 2, "batch_size": 2, "learning_rate": 0.05}
    runs = {}
    for name, seed in (("a", 3), ("a again", 3), ("b", 4)):
        model = lora_model(model_path)
        result = train_local(model, shard, randomness=Randomness.from_seed(seed), **kwargs)  # type: ignore[arg-type]
        assert result.examples == 4 and result.empty_batches == 0 and result.privacy == {}
        runs[name] = weights(model)
    assert torch.equal(runs["a"], runs["a again"])
    assert not torch.equal(runs["a"], runs["b"])


def test_dp_data_loader_empty_batches_first_and_later(shard: TokenizedSet) -> None:
    """Opacus' CollateFnWithEmpty: a list before any non-empty batch, a zero-row mapping after; both count as empty."""
    collate = poisson_loader(shard, 0.5, shard.pad, torch.Generator().manual_seed(0)).collate_fn
    first = collate([])
    assert isinstance(first, list) and batch_rows(first) == 0
    full = collate([shard[1], shard[0]])
    assert batch_rows(full) == 2 and full["attention_mask"].sum() == len(shard.ids[0]) + len(shard.ids[1])
    later = collate([])
    assert later.keys() == full.keys() and batch_rows(later) == 0
    with pytest.raises(ValueError, match="mapping"):
        batch_rows([torch.ones(2)])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_take_noise_only_steps(
    tmp_path: Path, model_path: Path, shard: TokenizedSet, mode: str
) -> None:
    model = lora_model(model_path)
    privacy = raw_privacy(tmp_path, noise=1.0, sample_rate=0.1, mode=mode)  # P(empty) = 0.9**4 ≈ 0.66
    for round_ in range(2):  # the same model is wrapped again next round
        before = weights(model)
        result = train_local(
            model,
            shard,
            steps=12,
            batch_size=1,
            learning_rate=0.1,
            randomness=Randomness.from_seed(round_),
            privacy=privacy,
        )
        assert result.steps == 12 and 0 < result.empty_batches < 12
        assert privacy.steps == 12 * (round_ + 1) and privacy.rounds == round_ + 1, "empty steps are accounted"
        assert no_opacus_attributes_left(model), "hooks left"
        assert not torch.equal(before, weights(model))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_only_empty_batches_from_the_first_still_step_with_noise(
    tmp_path: Path, model_path: Path, shard: TokenizedSet, mode: str
) -> None:
    model = lora_model(model_path)
    before = weights(model)
    privacy = raw_privacy(tmp_path, noise=1.0, sample_rate=1e-9, mode=mode)
    result = train_local(
        model, shard, steps=3, batch_size=1, learning_rate=0.1, randomness=Randomness.from_seed(0), privacy=privacy
    )
    assert (result.steps, result.empty_batches, result.examples, result.train_loss) == (3, 3, 0, 0.0)
    assert privacy.steps == 3
    assert not torch.equal(before, weights(model)), "noise-only steps move the weights"


def test_randomness_streams_are_reproducible_and_independent() -> None:
    one, again = Randomness.from_seed(7), Randomness.from_seed(7)
    assert torch.equal(torch.rand(4, generator=one.sampling), torch.rand(4, generator=again.sampling))
    two = Randomness.from_seed(7)
    assert not torch.equal(torch.rand(4, generator=two.sampling), torch.rand(4, generator=two.noise))


# -------------------------------------------------------------------------------------------------
# Accounting
# -------------------------------------------------------------------------------------------------

SHARD, BATCH, LOCAL_STEPS = 40, 4, 3  # q = 0.1


def train_round(
    state_dir: Path, params: PrivacyParams, model: nn.Module, shard: TokenizedSet, seed: int = 0
) -> tuple[ContributorPrivacy, bool, str]:
    """The contributor's round, as the ClientApp does it: load, check, train (records and saves)."""
    privacy = ContributorPrivacy.load(
        state_dir, params, shard_size=len(shard), batch_size=BATCH, local_steps=LOCAL_STEPS
    )
    ok, reason = privacy.check_round(LOCAL_STEPS)
    if ok:
        train_local(
            model,
            shard,
            steps=LOCAL_STEPS,
            batch_size=BATCH,
            learning_rate=0.05,
            randomness=Randomness.from_seed(seed),
            privacy=privacy,
        )
    return privacy, ok, reason


def independent_accountant(kind: str, noise: float, sample_rate: float, steps: int):  # -> IAccountant
    accountant = create_accountant(mechanism=kind)
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=sample_rate)
    return accountant


def independent_epsilon(kind: str, noise: float, sample_rate: float, steps: int, delta: float) -> float:
    return float(independent_accountant(kind, noise, sample_rate, steps).get_epsilon(delta=delta))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_epsilon_after_rounds_matches_independent_opacus_accountant(
    tmp_path: Path, model_path: Path, tokenizer, kind: str
) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    params = PrivacyParams(target_epsilon=4.0, accountant=kind, planned_rounds=4)  # type: ignore[arg-type]
    shard = make_shard(tokenizer, TEXTS * (SHARD // len(TEXTS)))
    model = lora_model(model_path)
    rounds = 3
    for round_ in range(rounds):
        privacy, ok, reason = train_round(tmp_path, params, model, shard, seed=round_)
        assert ok, reason
    privacy = ContributorPrivacy.load(tmp_path, params, shard_size=SHARD, batch_size=BATCH, local_steps=LOCAL_STEPS)
    q, delta = sample_rate_for(BATCH, SHARD), DEFAULT_DELTA
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

    # on disk: Opacus' own state_dict(), which a fresh Opacus accountant loads and gets the same ε from
    state = json.loads((tmp_path / STATE_FILE).read_text())
    independent = independent_accountant(kind, noise, q, rounds * LOCAL_STEPS).state_dict()
    assert state["accountant"] == json.loads(json.dumps(independent))
    fresh = create_accountant(mechanism=state["accountant"]["mechanism"])
    fresh.load_state_dict(state["accountant"])
    assert float(fresh.get_epsilon(delta=state["delta"])) == pytest.approx(want, rel=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([STATE_FILE, SUMMARY_FILE]), "no temp files left"


# A privacy_state.json as written before fedtune.privacy became a package (2 rounds of 3 steps, PRV).
FORMAT_1_STATE = {
    "accountant": {"history": [[0.6292724609375, 0.1, 6]], "mechanism": "prv"},
    "calibration": {
        "accountant": "prv",
        "batch_size": 4,
        "local_steps": 3,
        "planned_rounds": 4,
        "sample_rate": 0.1,
        "shard_size": 40,
        "steps": 12,
        "target_epsilon": 8.0,
    },
    "delta": 1e-05,
    "format": 1,
    "mechanism": "dp-sgd",
    "noise_multiplier": 0.6292724609375,
    "rounds": 2,
}
FORMAT_1_EPSILON = 6.5148159445295  # what the code that wrote it reported


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_a_state_file_from_before_the_package_keeps_its_spent_budget(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps(FORMAT_1_STATE, indent=2))
    shape = {"shard_size": 40, "batch_size": 4, "local_steps": 3}
    params = PrivacyParams(target_epsilon=8.0, planned_rounds=4)
    privacy = ContributorPrivacy.load(tmp_path, params, **shape)
    assert (privacy.steps, privacy.rounds, privacy.noise_multiplier) == (6, 2, 0.6292724609375)
    assert privacy.epsilon_spent() == pytest.approx(FORMAT_1_EPSILON, rel=1e-6)
    privacy.record_round(3)
    privacy.save()
    reloaded = ContributorPrivacy.load(tmp_path, params, **shape)
    assert (reloaded.steps, reloaded.rounds) == (9, 3)
    assert reloaded.epsilon_spent() == pytest.approx(
        independent_epsilon("prv", 0.6292724609375, 0.1, 9, 1e-5), rel=0.01
    )
    rdp = ContributorPrivacy.load(tmp_path, PrivacyParams(target_epsilon=8.0, accountant="rdp"), **shape)
    assert rdp.epsilon_spent() == pytest.approx(independent_epsilon("rdp", 0.6292724609375, 0.1, 9, 1e-5), rel=1e-6)


@pytest.mark.slow
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


@pytest.mark.slow
def test_training_past_the_budget_is_refused_before_any_step(
    tmp_path: Path, model_path: Path, shard: TokenizedSet
) -> None:
    params = PrivacyParams(target_epsilon=3.0, planned_rounds=1, accountant="rdp")
    privacy = ContributorPrivacy.load(tmp_path, params, shard_size=len(shard), batch_size=2, local_steps=2)
    model = lora_model(model_path)
    kwargs = {"batch_size": 2, "learning_rate": 0.05, "randomness": Randomness.from_seed(0), "privacy": privacy}
    train_local(model, shard, steps=2, **kwargs)  # type: ignore[arg-type]
    before = weights(model)
    with pytest.raises(PrivacyBudgetExceeded):
        train_local(model, shard, steps=50, **kwargs)  # type: ignore[arg-type]
    assert torch.equal(before, weights(model))
    assert privacy.steps == 2 and privacy.epsilon_spent() <= 3.0


def test_steps_taken_before_training_raises_are_accounted_and_saved(
    tmp_path: Path, model_path: Path, shard: TokenizedSet
) -> None:
    calls = 0

    def failing_third_time(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("out of memory")
        return causal_lm_loss(module, batch)

    model = lora_model(model_path)
    privacy = raw_privacy(tmp_path, noise=1.0, sample_rate=1.0)  # q = 1: no empty batches
    with pytest.raises(RuntimeError, match="out of memory"):
        train_local(
            model,
            shard,
            steps=5,
            batch_size=len(shard),
            learning_rate=0.05,
            randomness=Randomness.from_seed(0),
            privacy=privacy,
            loss_fn=failing_third_time,
        )
    assert privacy.steps == 2 and no_opacus_attributes_left(model)
    on_disk = ContributorPrivacy.load(tmp_path, privacy.params, shard_size=len(shard), batch_size=4, local_steps=5)
    assert (on_disk.steps, on_disk.rounds) == (2, 1)


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
    assert DEFAULT_DELTA == 1e-5 and delta_fits(1e-5, 10_000) and not delta_fits(1e-5, 10_001)
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
    assert (params.planned_rounds, params.target_delta, params.update_clip_norm, params.budget) == (7, None, None, 2.0)
    with pytest.raises(ValueError, match="cannot reach"):
        calibrate_noise(1e-9, 1e-5, 1.0, 10_000, "rdp")
    with pytest.raises(ValueError, match="accountant"):
        ContributorPrivacy(PrivacyParams(accountant="prv"), 1.0, 1e-5, 0.1, {}, create_accountant(mechanism="rdp"))


def test_prv_grid_points_is_the_grid_opacus_builds() -> None:
    """The bound's estimate against the domain Opacus' own PRV accountant makes for the same history."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    for sigma, q, steps in ((0.6, 16 / 600, 160), (1.0, 0.01, 1000), (0.4, 1.0, 10)):
        prv = PoissonSubsampledGaussianPRV(q, sigma)
        domain = PRVAccountant()._get_domain([prv], [steps], eps_error=0.01, delta_error=1e-5 / 1000)
        assert prv_grid_points(sigma, q, steps, 1e-5) == pytest.approx(domain.size, rel=1e-3)


CALIBRATE_1000 = """
from fedtune.privacy import calibrate_noise
try:
    print("prv", calibrate_noise(1000.0, 1e-5, 16 / 600, 160, "prv"))
except ValueError as exc:
    print("refused:", exc)
print("rdp", calibrate_noise(1000.0, 1e-5, 16 / 600, 160, "rdp"))
"""


@pytest.mark.slow  # a child process: imports, then the calibration
def test_prv_calibration_refuses_a_grid_that_would_exhaust_memory() -> None:
    """ε = 1000 over 160 steps at q = 16/600: Opacus' PRV calibration builds ≈ 9M points and did not fit in 11 GB.

    It is refused before the grid is built (the RDP accountant still calibrates it); in a child capped at 6 GiB,
    the code before the bound died of ``MemoryError``.
    """
    proc = run_python(CALIBRATE_1000, memory_gib=6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = next(line for line in proc.stdout.splitlines() if line.startswith(("refused:", "prv")))
    assert refused.startswith("refused:") and 'use accountant = "rdp"' in refused, refused
    assert f"at most {PRV_MAX_GRID_POINTS // 10**6}M" in refused
    rdp = next(line for line in proc.stdout.splitlines() if line.startswith("rdp "))
    assert 0 < float(rdp.split()[1]) < 0.2, rdp


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
