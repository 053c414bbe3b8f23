"""Pretrain ``builtin:stdlib-llama``: the small base the quickstart fine-tunes, trained on public text on this machine.

The corpus is the running interpreter's own standard library source (``Lib/``: code, comments and docstrings)
plus the license texts the OS ships (``/usr/share/common-licenses``) and Python's ``LICENSE.txt``. It leaves out
everything the quickstart corpus is made of: the standard-library modules that
``experiments/data/make_python_docs.py`` lists (whole top-level packages, e.g. all of ``email`` and ``json``),
test suites and ``site-packages``. So the base knows Python and English, but has never seen the quickstart's
modules, and fine-tuning on ``python-docs.jsonl`` has something left to learn.

What it builds:

- a byte-level BPE tokenizer (``tokenizers``) with a 2,048-token vocabulary trained on the corpus,
  ``<pad>``/``<s>``/``</s>`` specials, and ``<s>`` prepended when ``add_special_tokens`` is on;
- a Llama (hidden 128, 4 layers, 4 heads, MLP 384, tied embeddings: about 1.1M parameters), trained with
  AdamW on random 128-token windows of the packed corpus (documents joined with ``</s>``);
- the result saved with ``save_pretrained`` in float16 (``[model] dtype`` casts it back when loading) into
  ``fedtune/ml/builtin/stdlib-llama/``, with ``training.json`` recording corpus, steps, time and losses.

The weights are committed: every coordinator and contributor must load byte-identical files (the base
fingerprint), and a rerun on another Python version or machine reads other bytes and gives other weights.
This script is how they were made, reproducible in spirit. Pitfalls: run it under ``nice`` with its threads
pinned (``--threads``); it uses no network and never reads ``experiments/data``.

Run: ``python experiments/base/train_stdlib_llama.py --steps 700 --threads 2``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import random
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TARGET = REPO / "fedtune" / "ml" / "builtin" / "stdlib-llama"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled", "lib2to3"}
LICENSE_DIR = Path("/usr/share/common-licenses")
VOCAB = 2048
SPECIALS = ["<pad>", "<s>", "</s>"]


def quickstart_modules() -> set[str]:
    """Top-level names of every module the quickstart corpus documents (all of them stay out)."""
    path = REPO / "experiments" / "data" / "make_python_docs.py"
    spec = importlib.util.spec_from_file_location("make_python_docs", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name.split(".")[0] for name in module.MODULES} | {"posixpath", "ntpath", "genericpath"}


def corpus_files() -> list[Path]:
    """Sorted standard-library sources and license texts, quickstart modules and test suites excluded."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    excluded = quickstart_modules()
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.parts[0].removesuffix(".py") in excluded:
            continue
        files.append(path)
    licenses = {p.resolve() for p in LICENSE_DIR.iterdir() if p.is_file()} if LICENSE_DIR.is_dir() else set()
    licenses |= {p for p in [stdlib / "LICENSE.txt"] if p.is_file()}
    return files + sorted(licenses)


def read_documents(files: list[Path]) -> list[str]:
    docs = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text)
    return docs


def train_tokenizer(docs: list[str]):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )


def pack(docs: list[str], tokenizer) -> torch.Tensor:
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([t for doc in ids for t in [*doc, eos]], dtype=torch.long)


def windows(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq] for s in starts.tolist()])


def build_model(tokenizer):  # -> LlamaForCausalLM
    from transformers import LlamaForCausalLM

    from fedtune.ml.tiny import small_llama_config

    return LlamaForCausalLM(small_llama_config(tokenizer, hidden_size=128, intermediate_size=384, num_hidden_layers=4))


@torch.no_grad()
def held_out_loss(model, stream: torch.Tensor, seq: int, batches: int = 20) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1)
    losses = [float(model(input_ids=(x := windows(stream, 16, seq, gen)), labels=x).loss) for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    files = corpus_files()
    docs = read_documents(files)
    random.Random(args.seed).shuffle(docs)
    n_val = max(1, len(docs) // 50)
    tokenizer = train_tokenizer(docs[n_val:])
    train, val = pack(docs[n_val:], tokenizer), pack(docs[:n_val], tokenizer)
    chars = sum(len(d) for d in docs)
    print(f"{len(docs)} documents, {chars / 1e6:.1f}M characters, {len(train) / 1e6:.2f}M training tokens")

    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters; initial held-out loss {held_out_loss(model, val, args.seq):.3f}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    train_start, history = time.perf_counter(), []
    for step in range(args.steps):
        x = windows(train, args.batch, args.seq, gen)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        history.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            recent = sum(history[-50:]) / len(history[-50:])
            print(f"step {step + 1}/{args.steps}: train loss {recent:.3f} ({time.perf_counter() - train_start:.0f} s)")
    train_s = time.perf_counter() - train_start
    final_val = held_out_loss(model, val, args.seq)
    print(f"held-out loss {final_val:.3f} after {train_s:.0f} s of training")

    record = {
        "name": "builtin:stdlib-llama",
        "parameters": n_params,
        "corpus": {
            "sources": [
                "Python standard library source (Lib/), quickstart modules, tests and site-packages excluded",
                "license texts: /usr/share/common-licenses/*, Lib/LICENSE.txt",
            ],
            "python": platform.python_version(),
            "excluded_top_level_modules": sorted(quickstart_modules()),
            "documents": len(docs),
            "characters": chars,
            "training_tokens_available": len(train),
            "held_out_documents": n_val,
        },
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tokenizer)},
        "training": {
            "steps": args.steps,
            "batch": args.batch,
            "seq": args.seq,
            "tokens_seen": args.steps * args.batch * args.seq,
            "lr": args.lr,
            "threads": args.threads,
            "train_s": round(train_s, 1),
            "total_s": round(time.perf_counter() - started, 1),
            "final_train_loss": round(sum(history[-50:]) / len(history[-50:]), 4),
            "held_out_loss": round(final_val, 4),
        },
        "weights_dtype": "float16",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}-", dir=args.out.parent))
    try:
        model.half().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.rename(args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
