"""Home GPUs in the training loop: micro-batches, checkpointing under DP, bf16 autocast, a bitsandbytes base.

References are independent of the code under test: a whole-batch step for the micro-batched one (same noise
generator, so the same noise), a brute-force per-example loop for per-sample gradients, dtypes read off the model.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from fedtune.clients.trainer import (
    Batch,
    LossFn,
    PlainRun,
    Randomness,
    causal_lm_loss,
    micro_batches,
    train_local,
    train_step,
)
from fedtune.config import CampaignConfig
from fedtune.ml.data import TokenizedSet
from fedtune.ml.model import QuantizationUnavailable, build_model, quantization_config
from fedtune.ml.precision import Precision
from fedtune.privacy import PrivateRun, make_private

from ..conftest import small_campaign
from .test_privacy import TEXTS, brute_force_grads, flat, lora_model, make_shard, relative_error, trainable, weights

LONG_TEXTS = [*TEXTS, "secure aggregation of masked updates", "xy z", "home gpus of every size, micro-batched"]


@pytest.fixture(scope="module")
def model_path() -> Path:
    from fedtune.ml.tiny import TINY_LLAMA, builtin_path

    return builtin_path(TINY_LLAMA)


@pytest.fixture(scope="module")
def shard(model_path: Path) -> TokenizedSet:
    from transformers import AutoTokenizer

    return make_shard(AutoTokenizer.from_pretrained(model_path), LONG_TEXTS)


def dp_step(
    model: nn.Module,
    batch: dict,
    mode: str,
    micro: int,
    bound: float,
    noise_seed: int,
    loss_fn: LossFn = causal_lm_loss,
) -> PrivateRun:
    """One DP-SGD step (σ = 0.8, SGD lr 1: the parameters move by exactly the noised clipped mean)."""
    run = make_private(
        model,
        torch.optim.SGD([p for _, p in trainable(model)], lr=1.0),
        noise_multiplier=0.8,
        max_grad_norm=bound,
        expected_batch_size=6.0,
        grad_sample_mode=mode,  # type: ignore[arg-type]
        noise_generator=torch.Generator().manual_seed(noise_seed),
    )
    assert train_step(run, batch, loss_fn, micro_batch_size=micro) is not None
    run.close()
    return run


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batched_dp_step_equals_the_whole_batch_step(
    model_path: Path, shard: TokenizedSet, mode: str, micro: int
) -> None:
    batch = shard.pad(shard.ids)
    norms = [float(flat(g).norm()) for g in brute_force_grads(lora_model(model_path), shard)]
    bound = sorted(norms)[len(norms) // 2]  # some sequences clipped, some not
    start = weights(lora_model(model_path))
    whole, chunked = lora_model(model_path), lora_model(model_path)
    run_whole = dp_step(whole, batch, mode, 0, bound, noise_seed=11)
    run_chunked = dp_step(chunked, batch, mode, micro, bound, noise_seed=11)
    assert run_whole.steps_taken == run_chunked.steps_taken == 1, "one noised step per logical batch"
    moved = weights(whole) - start
    assert relative_error(weights(chunked) - start, moved) < 1e-5
    # the noise was drawn once: a different generator gives a different step
    other = lora_model(model_path)
    dp_step(other, batch, mode, micro, bound, noise_seed=12)
    assert relative_error(weights(other) - start, moved) > 0.1


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("micro", [0, 2])
def test_sequences_whose_gradient_is_not_finite_add_nothing_to_a_dp_step(
    model_path: Path, shard: TokenizedSet, mode: str, micro: int
) -> None:
    """The coordinator chooses the adapter, and a crafted one overflows on chosen content: one NaN gradient used
    to make the whole noised update NaN, telling the coordinator that a sampled record held that content. Such
    sequences now add nothing: the step equals the step on the batch without them, with the same noise."""
    held_by = Counter(t for ids in shard.ids for t in set(ids))
    marker = min(held_by, key=lambda t: (abs(held_by[t] - 2), t))  # a token two sequences hold
    held = [marker in ids for ids in shard.ids]
    assert 0 < sum(held) < len(held) - 1, held

    def crafted(module: nn.Module, batch: Batch) -> torch.Tensor:  # the overflow, on the marker's sequences
        losses = causal_lm_loss(module, batch)
        scale = torch.ones_like(losses)  # not torch.where: its backward gives the other rows 0 · ∞ too
        scale[(batch["input_ids"] == marker).any(dim=1)] = float("inf")
        return losses * scale

    start = weights(lora_model(model_path))
    poisoned, reference = lora_model(model_path), lora_model(model_path)
    dp_step(poisoned, shard.pad(shard.ids), mode, micro, 0.5, noise_seed=11, loss_fn=crafted)
    others = [ids for ids, h in zip(shard.ids, held, strict=True) if not h]
    dp_step(reference, shard.pad(others), mode, micro, 0.5, noise_seed=11)
    moved = weights(poisoned) - start
    assert bool(torch.isfinite(moved).all()), "a non-finite gradient reached the update"
    assert relative_error(moved, weights(reference) - start) < 1e-5


def test_micro_batched_plain_step_equals_the_whole_batch_step(model_path: Path, shard: TokenizedSet) -> None:
    batch = shard.pad(shard.ids)
    start = weights(lora_model(model_path))
    moved = {}
    for micro in (0, 1, 4):
        model = lora_model(model_path)
        run = PlainRun(model, torch.optim.SGD([p for _, p in trainable(model)], lr=1.0), torch.device("cpu"))
        model.train()
        train_step(run, batch, micro_batch_size=micro)
        moved[micro] = weights(model) - start
    assert float(moved[0].norm()) > 0
    assert relative_error(moved[1], moved[0]) < 1e-5 and relative_error(moved[4], moved[0]) < 1e-5


def test_micro_batches_keep_rows_and_trim_only_padding(shard: TokenizedSet) -> None:
    batch = shard.pad(shard.ids)
    chunks = micro_batches(batch, 2)
    assert [len(c["input_ids"]) for c in chunks] == [2, 2, 2, 1]
    for i, chunk in enumerate(chunks):
        rows = shard.ids[2 * i : 2 * i + 2]
        assert chunk["input_ids"].shape[1] == max(len(r) for r in rows)
        assert int(chunk["attention_mask"].sum()) == sum(len(r) for r in rows)
    assert micro_batches(batch, 0)[0]["input_ids"] is batch["input_ids"]


def train(model: nn.Module, shard: TokenizedSet, steps: int, **kwargs: object):  # -> TrainResult
    """``train_local`` with batches of 3, lr 0.05 and seed-0 randomness, unless ``kwargs`` says otherwise."""
    options: dict = {"batch_size": 3, "learning_rate": 0.05, "randomness": Randomness.from_seed(0), **kwargs}
    return train_local(model, shard, steps=steps, **options)


def campaign(**model: object) -> CampaignConfig:
    raw = small_campaign(model=model)
    raw["lora"]["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return CampaignConfig.from_dict(raw)


def randomise_b(model: nn.Module) -> None:
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)


@pytest.mark.parametrize("micro", [0, 2])
def test_campaign_checkpointing_keeps_dp_per_sample_gradients_exact(shard: TokenizedSet, micro: int) -> None:
    """``[model] gradient_checkpointing = true`` builds reentrant checkpointing that Opacus' hooks see through."""
    model, _ = build_model(campaign(gradient_checkpointing=True))
    randomise_b(model)
    base = model.get_base_model()
    assert base.is_gradient_checkpointing and base.model.layers[0].gradient_checkpointing
    assert base.model.layers[0]._gradient_checkpointing_func.keywords["use_reentrant"] is True
    model.train()
    expected = brute_force_grads(model, shard)
    run = make_private(
        model,
        torch.optim.SGD([p for _, p in trainable(model)], lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        expected_batch_size=len(shard),
    )
    captured: dict[str, list[torch.Tensor]] = {n: [] for n, _ in trainable(model)}
    original = run.accumulate

    def keep_and_accumulate() -> None:  # per-sample gradients of each micro-batch, before they are summed
        for n, p in trainable(model):
            captured[n].append(p.grad_sample.detach().clone())
        original()

    run.accumulate = keep_and_accumulate  # type: ignore[method-assign]
    train_step(run, shard.pad(shard.ids), micro_batch_size=micro)
    for n, p in trainable(model):
        captured[n].append(p.grad_sample.detach().clone())
    run.close()
    per_sample = {n: torch.cat(chunks) for n, chunks in captured.items()}
    for i, grads in enumerate(expected):
        actual = torch.cat([per_sample[n][i].reshape(-1) for n, _ in trainable(model)])
        assert relative_error(actual, flat(grads)) < 1e-4, f"sequence {i}"


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp-sgd"])
def test_bf16_autocast_on_cpu_trains_and_the_adapter_stays_fp32(
    tmp_path: Path, shard: TokenizedSet, private: bool
) -> None:
    from .test_privacy import raw_privacy

    model, _ = build_model(campaign(dtype="bfloat16"))
    adapter = {n: p for n, p in model.named_parameters() if "lora_" in n}
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n and p.dim() == 2]
    assert adapter and all(p.dtype == torch.float32 for p in adapter.values())
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    precision = Precision.of("bfloat16", "cpu")
    assert precision.mixed and precision.unsupported() is None and precision.scaler() is None
    before = weights(model)
    privacy = raw_privacy(tmp_path, noise=0.5, sample_rate=0.5) if private else None
    result = train(model, shard, 6, privacy=privacy, micro_batch_size=2, precision=precision)
    assert torch.isfinite(torch.tensor(result.train_loss)) and result.train_loss > 0
    assert all(p.dtype == torch.float32 for p in adapter.values()), "master weights stay fp32"
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert float((weights(model) - before).norm()) > 0


def test_float16_is_refused_where_it_cannot_run_and_under_dp(tmp_path: Path, shard: TokenizedSet) -> None:
    from .test_privacy import raw_privacy

    assert "needs a CUDA GPU" in (Precision.of("float16", "cpu").unsupported() or "")
    model, _ = build_model(campaign())
    with pytest.raises(ValueError, match="bf16"):
        train(
            model,
            shard,
            1,
            privacy=raw_privacy(tmp_path, noise=1.0, sample_rate=0.5),
            precision=Precision(torch.float16, "cuda"),
        )


def test_quantization_without_bitsandbytes_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an interpreter without the package sees
    cfg = campaign(quantization="4bit")
    with pytest.raises(QuantizationUnavailable) as err:
        quantization_config(cfg.model)
    assert "\n" not in str(err.value) and "bitsandbytes" in str(err.value) and "'4bit'" in str(err.value)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_trains_a_float32_adapter(shard: TokenizedSet, bits: str) -> None:
    """QLoRA-style: bitsandbytes' CPU backend here; the same code runs its CUDA kernels on a GPU (not exercised)."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg = campaign(quantization=bits, dtype="bfloat16", gradient_checkpointing=True)
    model, _ = build_model(cfg)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt)
    adapter = [p for n, p in model.named_parameters() if p.requires_grad]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)
    before = weights(model)
    result = train(model, shard, 2, precision=Precision.of("bfloat16", "cpu"))
    assert torch.isfinite(torch.tensor(result.train_loss))
    assert float((weights(model) - before).norm()) > 0
