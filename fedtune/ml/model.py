"""Base model loading, base fingerprint, LoRA attachment and the adapter tensors that travel.

The server and every contributor build the same PEFT model from the campaign config. In FFA-LoRA
mode (Sun et al., ICLR 2024) each ``lora_A`` is derived from the public campaign seed and frozen, so
only ``lora_B`` trains and travels, and averaging the B's averages the updates B·A exactly.

Home GPUs: the base may be stored in bfloat16/float16 (``[model] dtype``; the adapter stays float32) or
quantized by bitsandbytes to 8 or 4 bits (``[model] quantization``, QLoRA-style), gradient checkpointing is
always the reentrant kind DP-SGD needs, and a contributor may attach a smaller rank r ≤ R: its frozen A is the
first r rows of the campaign's seed-derived A, so its update is exactly a rank-r part of the campaign's adapter
(``fedtune.clients.workspace`` pads it back to the campaign's shape).

Pitfalls: a quantized base is placed on its device while loading (bitsandbytes weights cannot be moved after),
still before PEFT is attached (opacus issue 820); bitsandbytes packs weights, so parameter counts of a quantized
model are not the model's (the coordinator counts on the unquantized base).
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
from fedtune.ml.precision import DTYPES
from fedtune.ml.tiny import builtin_path


class FingerprintMismatch(RuntimeError):
    """A contributor's base model differs from the coordinator's."""


class QuantizationUnavailable(RuntimeError):
    """``[model] quantization`` asks for bitsandbytes where it is not installed; ``str()`` is one line."""


def quantization_config(model: ModelSection):  # -> transformers.BitsAndBytesConfig | None
    """bitsandbytes' config for ``[model] quantization`` (NF4 with double quantization, or LLM.int8), or None.

    Raises :class:`QuantizationUnavailable` (one line) when bitsandbytes is not installed.
    """
    if model.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuantizationUnavailable(
            f"[model] quantization = {model.quantization!r} needs the bitsandbytes package "
            "(pip install 'fedtune[qlora]', with a CUDA GPU); it is not installed here"
        ) from None
    from transformers import BitsAndBytesConfig

    if model.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[model.dtype],
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _device_map(device: str | torch.device) -> dict[str, str | int]:
    dev = torch.device(device)
    if dev.type == "cuda":
        return {"": dev.index if dev.index is not None else torch.cuda.current_device()}
    return {"": dev.type}


HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]
"""What is fetched of a hub base: config, weights and tokenizer files."""


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

    return Path(snapshot_download(model.name, revision=model.revision, allow_patterns=HUB_MODEL_FILES))


def load_base(
    model: ModelSection, device: str | torch.device = "cpu", quantize: bool = True
):  # -> (PreTrainedModel, tokenizer)
    """Load tokenizer and base model through ``from_pretrained`` and move the model to ``device``.

    The move happens here, before LoRA is attached (opacus issue 820: attaching first corrupts updates). With
    ``[model] quantization`` (and ``quantize``) bitsandbytes quantizes the weights while they are loaded onto
    ``device``; ``quantize=False`` loads the unquantized base (the coordinator evaluates on it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quant = quantization_config(model) if quantize else None
    if quant is None:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[model.dtype])
        base.to(device)
    else:
        base = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[model.dtype], quantization_config=quant, device_map=_device_map(device)
        )
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


def derive_lora_a(peft_model: PeftModel, seed: int, campaign_rank: int | None = None) -> None:
    """Set every ``lora_A`` from the campaign seed (Kaiming-uniform bound, as PEFT's default init).

    Per-module generators make A independent of module order, device and thread count. A model of a smaller
    rank r gets the first r rows of the ``campaign_rank``-row A (default: its own rank), so every contributor's
    A is a slice of the one the campaign's adapter uses.
    """
    for name, module in peft_model.named_modules():
        if not name.endswith(".lora_A.default"):
            continue
        weight = module.weight
        rows = max(campaign_rank or 0, weight.shape[0])
        gen = torch.Generator().manual_seed(_seed_for(seed, _canonical(name)))
        bound = 1.0 / math.sqrt(weight.shape[1])
        values = (torch.rand((rows, weight.shape[1]), generator=gen, dtype=torch.float32) * 2 - 1) * bound
        with torch.no_grad():
            weight.copy_(values[: weight.shape[0]].to(weight.dtype))


def lora_scaling(lora: LoraSection, rank: int | None = None) -> float:
    """PEFT's LoRA scaling ``alpha / r`` at ``rank`` (default: the campaign's): ΔW = scaling · B·A."""
    return lora.alpha / (rank or lora.rank)


def lora_config(lora: LoraSection, rank: int | None = None) -> LoraConfig:
    return LoraConfig(
        r=rank or lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(base, lora: LoraSection, seed: int, rank: int | None = None) -> PeftModel:
    """Wrap ``base`` with the campaign's adapter (or a smaller ``rank``); in ``ffa`` mode freeze the seed-derived A.

    PEFT keeps the adapter in float32 on a half-precision base (``autocast_adapter_dtype``): those are the
    master weights the optimizer steps.
    """
    model = get_peft_model(base, lora_config(lora, rank), autocast_adapter_dtype=True)
    derive_lora_a(model, seed, lora.rank)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(p)
        if lora.mode == "ffa" and "lora_A" in name:
            p.requires_grad_(False)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing in the form DP-SGD needs (and plain training accepts): reentrant, input grads on.

    Non-reentrant checkpointing recomputes activations outside Opacus' hooks, so per-sample gradients of the
    checkpointed layers go missing; reentrant checkpointing needs the embedding output to require grad.

    Parameters
    ----------
    model
        A Hugging Face causal LM, or a PEFT model around one.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": True}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.enable_input_require_grads()


def build_model(
    cfg: CampaignConfig, device: str | torch.device = "cpu", *, rank: int | None = None, quantize: bool = True
):  # -> (PeftModel, tokenizer)
    """The campaign's PEFT model on ``device``: base (quantized unless ``quantize`` is False), LoRA, checkpointing.

    ``rank`` below the campaign's attaches a smaller adapter whose A is the first rows of the campaign's.
    """
    base, tokenizer = load_base(cfg.model, device, quantize)
    quantized = quantize and cfg.model.quantization != "none"
    if quantized:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        )
    model = attach_lora(base, cfg.lora, cfg.campaign.seed, rank)
    if cfg.model.gradient_checkpointing and not quantized:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def trainable_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The tensors that travel: the trainable adapter parameters, as float32 numpy arrays."""
    return {n: p.detach().float().cpu().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Overwrite the trainable parameters; the names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(arrays):
        missing, extra = set(params) - set(arrays), set(arrays) - set(params)
        raise ValueError(f"adapter tensors do not match: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for name, p in params.items():  # copy_ would broadcast a smaller tensor silently
        if tuple(np.shape(arrays[name])) != tuple(p.shape):
            raise ValueError(f"adapter tensor {name!r} is {list(np.shape(arrays[name]))}, the model's {list(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(arrays[name])).to(p.dtype))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen base parameters, adapter parameters) — what the credit formula needs."""
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    total = sum(p.numel() for p in model.parameters())
    return total - adapter, adapter
