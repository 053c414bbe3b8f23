"""DP-SGD overhead on LoRA: step time and peak memory of hooks / ghost clipping / secure mode vs a non-private step.

Not a test. Every mode trains the same FFA-LoRA model (A frozen, B trains) on the same fixed, right-padded
batch with the project's per-sequence loss, so the only difference is DP: per-sample gradients (hooks) or
per-sample norms and a second backward (ghost), clipping and noise. ``hooks-secure`` is ``hooks`` with Opacus'
secure-mode noise (each draw the sum of 4 Gaussians, halved: the floating-point-attack defence) from an
OS-seeded generator, i.e. every part of secure mode except ``torchcsprng``'s generator, which has no build for
this Python and torch (see ``fedtune.clients.trainer.secure_mode_missing``). ``--noise-params`` also times the
noise draw alone for adapters of those sizes. Poisson sampling is left out on purpose (it would make the batches,
not the method, differ).

- time: the modes run interleaved in one process, ``--repeats`` times ``--steps`` steps each after a
  warm-up; step time is the median over repeats, the ratio the median of per-repeat ratios to ``plain``.
- memory: each mode runs in its own subprocess. On CUDA, ``torch.cuda.max_memory_allocated``. On CPU, the
  process's peak RSS (VmHWM), reset once the model is built (``/proc/self/clear_refs``), with glibc's mmap
  threshold pinned so freed tensors leave the RSS; ``total`` is that peak, ``step`` the peak minus the RSS
  before the first step (the training working set, i.e. what DP can add to).

Usage::

    python bench/bench_dp.py --out bench-dp.json                      # tiny model + a bigger local config
    python bench/bench_dp.py --device cuda --model PATH --dtype bfloat16 --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtune.clients.trainer import LocalRun, PlainRun, Randomness, train_step
from fedtune.config import is_builtin
from fedtune.ml.tiny import TINY_LLAMA, builtin_path
from fedtune.privacy import make_private

MODES = ("plain", "hooks", "ghost", "hooks-secure")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TIME_TARGET, MEMORY_TARGET = 1.15, 1.2
BIG = "local:llama-h512-l4"  # built in-process: hidden 512, 4 layers, byte-level vocabulary


@dataclass(frozen=True)
class Setup:
    model: str
    device: str
    dtype: str
    batch: int
    seq: int
    seed: int = 0


def load_base(setup: Setup) -> nn.Module:
    """The base causal LM of ``setup.model``, on its device, in its dtype, with deterministic weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, setup.dtype)
    torch.manual_seed(setup.seed)
    if setup.model == BIG:
        config = LlamaConfig(
            vocab_size=259,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            pad_token_id=256,
        )
        model = LlamaForCausalLM(config).to(dtype)
    else:
        path = builtin_path(setup.model) if is_builtin(setup.model) else setup.model
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(setup.device)


def lora(base: nn.Module, seed: int) -> nn.Module:
    """FFA-LoRA on every projection, attached after the move to the device (opacus issue 820)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
        elif "lora_B" in name:  # non-zero B, so gradients flow through every adapter as mid-training
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def make_batch(setup: Setup, vocab_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Random tokens, lengths between seq/2 and seq, right-padded: the shape of a real padded batch."""
    generator = torch.Generator().manual_seed(setup.seed + 1)
    lengths = torch.randint(setup.seq // 2, setup.seq + 1, (setup.batch,), generator=generator)
    lengths[0] = setup.seq
    input_ids = torch.randint(0, min(vocab_size, 256), (setup.batch, setup.seq), generator=generator)
    attention_mask = (torch.arange(setup.seq)[None, :] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    return {"input_ids": input_ids.to(setup.device), "attention_mask": attention_mask.to(setup.device)}


def build_run(setup: Setup, mode: str) -> tuple[LocalRun, dict[str, torch.Tensor]]:
    """The trainer's own wrappers: :class:`PlainRun` or Opacus' (expected batch = the fixed batch's size)."""
    model = lora(load_base(setup), setup.seed)
    config = model.get_base_model().config
    batch = make_batch(setup, config.vocab_size, config.pad_token_id or 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if mode == "plain":
        model.train()
        return PlainRun(model, optimizer, torch.device(setup.device)), batch
    secure = mode == "hooks-secure"
    run = make_private(
        model,
        optimizer,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=setup.batch,
        grad_sample_mode="hooks" if secure else mode,  # type: ignore[arg-type]
        noise_generator=Randomness.secret(setup.device).noise,
        secure_mode=secure,
    )
    return run, batch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(run: LocalRun, batch: dict[str, torch.Tensor], steps: int, device: str) -> float:
    """Mean wall time of one step over ``steps`` steps."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(run, batch)
    synchronize(device)
    return (time.perf_counter() - started) / steps


def measure_time(setup: Setup, steps: int, repeats: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Interleave the modes so drift in the machine's speed hits them all alike; medians over repeats."""
    runs = {mode: build_run(setup, mode) for mode in MODES}
    for run, batch in runs.values():
        timed_steps(run, batch, warmup, setup.device)
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        order = MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]
        for mode in order:
            samples[mode].append(timed_steps(*runs[mode], steps, setup.device))
    for run, _ in runs.values():
        run.close()
    return {
        mode: {
            "step_ms": 1e3 * statistics.median(values),
            "step_ms_all": [1e3 * v for v in values],
            # paired within a repeat (adjacent in time), so a change in machine load cancels out
            "time_ratio": statistics.median(v / p for v, p in zip(values, samples["plain"], strict=True)),
        }
        for mode, values in samples.items()
    }


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(setup: Setup, mode: str, steps: int) -> dict[str, float]:
    """Peak memory of ``steps`` training steps in this (fresh) process; MiB."""
    importlib.import_module("opacus")  # loaded in every mode, so library code is not counted as DP's cost
    run, batch = build_run(setup, mode)
    if setup.device.startswith("cuda"):
        synchronize(setup.device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        timed_steps(run, batch, steps, setup.device)
        peak = torch.cuda.max_memory_allocated()
        return {"total_mib": peak / 2**20, "step_mib": (peak - before) / 2**20}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    timed_steps(run, batch, steps, setup.device)
    peak = _rss_kib("VmHWM")
    return {"total_mib": peak / 1024, "step_mib": (peak - before) / 1024}


def measure_memory(setup: Setup, steps: int) -> dict[str, dict[str, float]]:
    """One subprocess per mode: peaks are per process and must not see another mode's allocations."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--worker", mode, "--setup", json.dumps(asdict(setup))]
        command += ["--steps", str(steps), "--threads", str(torch.get_num_threads())]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker {mode} failed:\n{done.stderr[-4000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    for mode in MODES:
        for key in ("total", "step"):
            plain = results["plain"][f"{key}_mib"]
            results[mode][f"{key}_ratio"] = results[mode][f"{key}_mib"] / plain if plain > 0 else float("nan")
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    head = (
        "| model | params (trainable) | mode | step ms | time ratio | peak MiB | peak ratio "
        "| step MiB | step ratio |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for result in results:
        for mode in MODES:
            t, m = result["time"][mode], result["memory"][mode]
            ok_t = "" if mode == "plain" else (" ✓" if t["time_ratio"] <= TIME_TARGET else " ✗")
            ok_m = "" if mode == "plain" else (" ✓" if m["total_ratio"] <= MEMORY_TARGET else " ✗")
            rows.append(
                f"| {result['model']} | {result['params'] / 1e6:.2f}M ({result['trainable'] / 1e3:.0f}k) "
                f"| {mode} | {t['step_ms']:.1f} | {t['time_ratio']:.2f}{ok_t} | {m['total_mib']:.0f} "
                f"| {m['total_ratio']:.3f}{ok_m} | {m['step_mib']:.1f} | {m['step_ratio']:.2f} |"
            )
    return "\n".join(rows)


def noise_draws(sizes: list[int], device: str, repeats: int) -> list[dict[str, Any]]:
    """Median time of one noise draw for a trainable vector of each size, plain vs secure mode (Opacus' own)."""
    from opacus.optimizers.optimizer import _generate_noise

    generator = Randomness.secret(device).noise
    out = []
    for size in sizes:
        reference = torch.zeros(size, device=device)
        row: dict[str, Any] = {"params": size}
        for secure in (False, True):
            times = []
            for _ in range(repeats):
                synchronize(device)
                started = time.perf_counter()
                _generate_noise(1.0, reference, generator=generator, secure_mode=secure)
                synchronize(device)
                times.append(time.perf_counter() - started)
            row["secure_ms" if secure else "plain_ms"] = 1e3 * statistics.median(times)
        row["ratio"] = row["secure_ms"] / row["plain_ms"]
        out.append(row)
    return out


def bench(setup: Setup, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    probe = lora(load_base(setup), setup.seed)
    counts = {
        "params": sum(p.numel() for p in probe.parameters()),
        "trainable": sum(p.numel() for p in probe.parameters() if p.requires_grad),
    }
    del probe
    return {
        "model": setup.model,
        **counts,
        "setup": asdict(setup),
        "time": measure_time(setup, steps, repeats, warmup),
        "memory": measure_memory(setup, max(2, steps // 2)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", action="append", help=f"model path or {TINY_LLAMA} (repeatable)")
    parser.add_argument("--no-big", action="store_true", help=f"skip the locally built {BIG}")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--noise-params", type=int, nargs="*", default=[10**5, 10**6, 10**7], help="adapter sizes for the noise table"
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(memory_worker(Setup(**json.loads(args.setup)), args.worker, args.steps)))
        return
    models = args.model or [TINY_LLAMA]
    if not args.no_big:
        models.append(BIG)
    results = []
    for model in models:
        setup = Setup(model, args.device, args.dtype, args.batch, args.seq)
        print(f"benchmarking {model} ...", file=sys.stderr, flush=True)
        results.append(bench(setup, args.steps, args.repeats, args.warmup))
    report = {
        "targets": {"time_ratio": TIME_TARGET, "peak_memory_ratio": MEMORY_TARGET},
        "host": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "results": results,
    }
    noise = noise_draws(args.noise_params, args.device, args.repeats) if args.noise_params else []
    report["noise"] = noise
    print(markdown(results))
    if noise:
        print("\n| trainable params | noise draw ms | secure-mode draw ms | ratio |\n|---|---|---|---|")
        for row in noise:
            print(f"| {row['params']:,} | {row['plain_ms']:.2f} | {row['secure_ms']:.2f} | {row['ratio']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
