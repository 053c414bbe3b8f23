"""Built-in base models, loaded like any hub model through ``from_pretrained``: nothing is downloaded.

- ``builtin:tiny-llama``: a randomly initialised tiny Llama (about 360k parameters) with a byte-level
  tokenizer, for the tests. Built on first use into the cache with ``save_pretrained``; the build is
  deterministic (fixed seed, byte-level vocabulary with no learned merges), so every machine builds the same
  weights and the same base fingerprint.
- ``builtin:stdlib-llama``: the quickstart's base, a 1.1M-parameter Llama with a 2,048-token BPE tokenizer
  pretrained on Python's standard library source and license texts (``experiments/base/train_stdlib_llama.py``).
  Its files ship inside the package (``fedtune/ml/builtin/stdlib-llama``, float16 weights, about 2.3 MB),
  because a training run is not bit-reproducible across machines and the coordinator and every contributor
  must hold byte-identical weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_LLAMA = "builtin:tiny-llama"
STDLIB_LLAMA = "builtin:stdlib-llama"
SHIPPED = {STDLIB_LLAMA: Path(__file__).resolve().parent / "builtin" / "stdlib-llama"}
"""Built-ins whose files are part of the package (trained, not built)."""
BUILTIN_MODELS = (TINY_LLAMA, STDLIB_LLAMA)
"""Every ``builtin:`` model name fedtune knows."""
_BUILD_VERSION = "1"


def cache_root() -> Path:
    """Where built-in models live: ``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def builtin_path(name: str) -> Path:
    """Directory of a built-in model, building it first if absent."""
    if name in SHIPPED:
        if not (SHIPPED[name] / "model.safetensors.index.json").is_file():  # two shards: each file stays small
            raise ValueError(f"built-in model {name!r} is missing its files in {SHIPPED[name]}; reinstall fedtune")
        return SHIPPED[name]
    if name != TINY_LLAMA:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    target = cache_root() / "models" / f"tiny-llama-v{_BUILD_VERSION}"
    if not (target / "model.safetensors").exists():
        build_tiny_llama(target)
    return target


def _byte_level_tokenizer():  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )


def small_llama_config(tokenizer, hidden_size: int, intermediate_size: int, num_hidden_layers: int):  # -> LlamaConfig
    """A small Llama with 4 heads, tied embeddings, 512 positions and the tokenizer's vocabulary and specials."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny_llama(target: Path, seed: int = 0) -> Path:
    """Build and save the tiny Llama (about 360k parameters) and its tokenizer to ``target``.

    Written to a temporary directory first and renamed, so a crash never leaves a half-built model.
    """
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = _byte_level_tokenizer()
    config = small_llama_config(tokenizer, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
