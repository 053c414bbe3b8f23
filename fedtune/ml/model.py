"""Base model loading, base fingerprint, LoRA attachment and the adapter tensors that travel.

The server and every contributor build the same PEFT model from the campaign config. In FFA-LoRA
mode (Sun et al., ICLR 2024) each ``lora_A`` is derived from the public campaign seed and frozen, so
only ``lora_B`` trains and travels, and averaging the B's averages the updates B·A exactly.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedtune.config import WEIGHT_FILES, CampaignConfig, LoraSection, ModelSection, is_builtin
from fedtune.ml.tiny import builtin_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FingerprintMismatch(RuntimeError):
    """A contributor's base model differs from the coordinator's."""


def resolve_model_dir(model: ModelSection) -> Path:
    """Local directory holding the base model's files (builds built-ins, reads the hub cache).

    A local folder is an absolute path (the config loader resolves relative ones against the campaign file's
    folder); any other name is a hub id, never a folder that happens to sit under the working directory.
    """
    if is_builtin(model.name):
        return builtin_path(model.name)
    local = Path(model.name).expanduser()
    if local.is_absolute():
        return local
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model.name, revision=model.revision, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]
        )
    )


def load_base(model: ModelSection, device: str | torch.device = "cpu"):  # -> (PreTrainedModel, tokenizer)
    """Load tokenizer and base model through ``from_pretrained`` and move the model to ``device``.

    The move happens here, before LoRA is attached (opacus issue 820: attaching first corrupts updates).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[model.dtype])
    base.to(device)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, tokenizer


@lru_cache(maxsize=8)
def _fingerprint_dir(path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    outer = hashlib.sha256()
    for name, _, _ in stamp:
        inner = hashlib.sha256()
        with open(Path(path) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(f"{name}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def base_fingerprint(model: ModelSection) -> str:
    """SHA-256 over the base's config and weight files (names and contents), cached per file stamp."""
    path = resolve_model_dir(model)
    names = ["config.json"] + sorted(
        p.name
        for p in path.iterdir()
        if p.name in WEIGHT_FILES or (p.suffix in (".safetensors", ".bin") and p.name.startswith("model"))
    )
    stamp = tuple((n, (path / n).stat().st_size, (path / n).stat().st_mtime_ns) for n in dict.fromkeys(names))
    return _fingerprint_dir(str(path), stamp)


def check_fingerprint(model: ModelSection, expected: str) -> None:
    """Refuse to train on a base that is not the coordinator's."""
    found = base_fingerprint(model)
    if found != expected:
        raise FingerprintMismatch(
            f"base model {model.name!r} has fingerprint {found[:16]}…, the coordinator's is {expected[:16]}…; "
            "this contributor's base differs (other revision, dtype file or corrupted download)"
        )


def _seed_for(seed: int, module_name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{module_name}".encode()).digest()[:8], "little")


def _canonical(name: str) -> str:
    """Module name relative to the base model, stable across PEFT wrappers."""
    return name.removeprefix("base_model.model.")


def derive_lora_a(peft_model: PeftModel, seed: int) -> None:
    """Set every ``lora_A`` from the campaign seed (Kaiming-uniform bound, as PEFT's default init).

    Per-module generators make A independent of module order, device and thread count.
    """
    for name, module in peft_model.named_modules():
        if not name.endswith(".lora_A.default"):
            continue
        weight = module.weight
        gen = torch.Generator().manual_seed(_seed_for(seed, _canonical(name)))
        bound = 1.0 / math.sqrt(weight.shape[1])
        values = (torch.rand(weight.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        with torch.no_grad():
            weight.copy_(values.to(weight.dtype))


def lora_config(lora: LoraSection) -> LoraConfig:
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(base, lora: LoraSection, seed: int) -> PeftModel:
    """Wrap ``base`` with the campaign's adapter; in ``ffa`` mode freeze the seed-derived A."""
    model = get_peft_model(base, lora_config(lora))
    derive_lora_a(model, seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(p)
        if lora.mode == "ffa" and "lora_A" in name:
            p.requires_grad_(False)
    return model


def build_model(cfg: CampaignConfig, device: str | torch.device = "cpu"):  # -> (PeftModel, tokenizer)
    base, tokenizer = load_base(cfg.model, device)
    return attach_lora(base, cfg.lora, cfg.campaign.seed), tokenizer


def trainable_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The tensors that travel: the trainable adapter parameters, as float32 numpy arrays."""
    return {n: p.detach().float().cpu().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Overwrite the trainable parameters; the names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(arrays):
        missing, extra = set(params) - set(arrays), set(arrays) - set(params)
        raise ValueError(f"adapter tensors do not match: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(arrays[name])).to(p.dtype))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen base parameters, adapter parameters) — what the credit formula needs."""
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    total = sum(p.numel() for p in model.parameters())
    return total - adapter, adapter
