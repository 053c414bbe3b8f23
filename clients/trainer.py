"""Local training on a contributor's shard: one loop, for plain training and for DP-SGD.

:func:`train_local` runs the steps the coordinator assigned, nothing more. Plain and private training differ
only in what the loop is handed: a :class:`PlainRun` and shuffled batches, or Opacus' DP wrapper
(:func:`fedtune.privacy.make_private`) and its Poisson ``DPDataLoader``. Each step is :func:`train_step`
either way, with the per-sequence mean loss (never HF's ``labels=`` loss, which couples the samples).

The randomness of batch sampling and DP noise comes from the :class:`Randomness` passed in. The ClientApp
draws it from the operating system for every round (:meth:`Randomness.secret`), or from a CSPRNG in secure mode
(:meth:`Randomness.csprng`). Threat: the coordinator is the adversary of the contributor's data; batches it can
recompute void the amplification by sampling the accounting assumes (the campaign's ε = 8 becomes ≈ 19–40), and
noise it can recompute is no noise at all. Pitfall: :meth:`Randomness.from_seed` is reproducible, hence
recomputable by whoever knows the seed: tests and the local-only simulation switch
(:func:`fedtune.clients.policy.simulation_seed`) use it, a contributor never derives it from a public value.

Small GPUs: a step may run its batch in micro-batches (``micro_batch_size``): the same logical batch and the
same optimizer step, in chunks that fit the memory. Without DP the chunk losses are summed over the batch's
rows; with DP each chunk's per-sample gradients are clipped and added to one sum (Opacus' virtual steps,
:meth:`fedtune.privacy.PrivateRun.accumulate`) and the noise is drawn once per logical batch, so accounting and
result are those of the whole batch. ``precision`` runs the forward pass under ``torch.autocast`` (bf16/fp16)
with the trainable adapter in float32, and fp16 on CUDA scales the loss (:class:`torch.amp.GradScaler`).
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from fedtune.ml.data import TokenizedSet
from fedtune.ml.losses import per_sequence_loss, token_counts
from fedtune.ml.precision import Precision
from fedtune.privacy import (
    ContributorPrivacy,
    PrivacyBudgetExceeded,
    batch_rows,
    make_private,
    poisson_loader,
    trainable_parameters,
)

from .optimizer_state import OptimizerState

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class TrainResult:
    """What a contributor reports about its local run (the update itself travels separately)."""

    examples: int
    tokens: int
    train_loss: float
    wall_s: float
    steps: int
    empty_batches: int = 0
    privacy: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Randomness:
    """Where a round's batch sampling (a CPU generator) and DP noise (one on the model's device) come from."""

    sampling: torch.Generator
    noise: torch.Generator

    @classmethod
    def secret(cls, device: torch.device | str = "cpu") -> Randomness:
        """Two generators seeded with 64 bits each from the operating system's CSPRNG (``secrets``), fresh per call.

        Nobody else can recompute the batches or the noise: the seeds never leave the process. The generators
        themselves are torch's (Mersenne Twister on CPU, Philox on CUDA), fast but not cryptographic; secure
        mode (:meth:`csprng`) replaces them.
        """
        sampling = torch.Generator().manual_seed(secrets.randbits(64))
        return cls(sampling, torch.Generator(device=device).manual_seed(secrets.randbits(64)))

    @classmethod
    def csprng(cls, device: torch.device | str = "cpu") -> Randomness:
        """Secure mode: both streams from ``torchcsprng``'s ``/dev/urandom`` generator (what Opacus' secure mode uses).

        Raises
        ------
        SecureModeUnavailable
            When ``torchcsprng`` cannot be imported (:func:`secure_mode_missing` says why).
        """
        missing = secure_mode_missing()
        if missing is not None:
            raise SecureModeUnavailable(missing)
        import torchcsprng  # type: ignore[import-not-found]

        if torch.device(device).type != "cpu":
            raise SecureModeUnavailable("secure mode draws its noise on the CPU: torchcsprng's urandom generator")
        generator = torchcsprng.create_random_device_generator("/dev/urandom")
        return cls(generator, generator)

    @classmethod
    def from_seed(cls, seed: int, device: torch.device | str = "cpu") -> Randomness:
        """Two independent streams derived from ``seed`` (reproducible, hence recomputable by whoever knows it).

        Parameters
        ----------
        seed
            Any non-negative integer.
        device
            Where the trainable parameters live: Opacus draws the noise there with this generator.
        """
        sampling, noise = (int(s.generate_state(1, np.uint64)[0]) for s in np.random.SeedSequence(seed).spawn(2))
        return cls(torch.Generator().manual_seed(sampling), torch.Generator(device=device).manual_seed(noise))


class SecureModeUnavailable(RuntimeError):
    """Secure mode was asked for where its cryptographically secure generator cannot be had."""


def secure_mode_missing() -> str | None:
    """Why Opacus' secure mode cannot run here (one actionable line), or ``None`` when it can.

    Secure mode needs ``torchcsprng`` (Opacus imports it for its ``/dev/urandom`` generator). Its last release,
    0.2.1 (2021), has wheels for CPython 3.6–3.9 built against torch 1.8 only: ``pip install torchcsprng`` finds
    nothing for this Python and torch.
    """
    import importlib.util

    if importlib.util.find_spec("torchcsprng") is not None:
        return None
    return (
        f"secure mode needs torchcsprng (Opacus' CSPRNG), which is not installed; its last release has no build for "
        f"Python {sys.version_info.major}.{sys.version_info.minor} and torch {torch.__version__}"
    )


class LocalRun(Protocol):
    """What :func:`train_step` needs: :class:`PlainRun` or :class:`fedtune.privacy.PrivateRun`."""

    module: nn.Module
    optimizer: Any
    device: torch.device
    steps_taken: int

    def backward(self, losses: torch.Tensor, batch_rows: int | None = None) -> torch.Tensor | None: ...

    def accumulate(self) -> None: ...

    def step(self) -> None: ...

    def empty_step(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class PlainRun:
    """The non-private counterpart of :class:`fedtune.privacy.PrivateRun`: the model and optimizer as they are.

    ``scaler`` (float16 on CUDA) scales the loss before backward and unscales before the step.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    steps_taken: int = 0
    scaler: torch.amp.GradScaler | None = None

    def backward(self, losses: torch.Tensor, batch_rows: int | None = None) -> torch.Tensor | None:
        """Gradient of the batch's mean loss; a micro-batch's ``losses`` are summed over ``batch_rows`` rows.

        Always ``None`` (no rows to run again): without DP the update is not private anyway.
        """
        loss = losses.mean() if batch_rows is None else losses.sum() / batch_rows
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        return None

    def accumulate(self) -> None:
        """Between micro-batches: gradients simply add up in ``.grad``."""

    def step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.steps_taken += 1

    def empty_step(self) -> None:
        """Nothing to hide without DP: an empty batch is skipped."""

    def close(self) -> None:
        """Nothing to undo."""


class ShuffledBatches(Sampler[list[int]]):
    """Endless batches of ``batch_size`` indices walking permutations drawn from ``generator`` (epochs roll over)."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator) -> None:
        if size < 1 or batch_size < 1:
            raise ValueError("size and batch_size must be >= 1")
        self.size, self.batch_size, self.generator = size, batch_size, generator

    def __iter__(self) -> Iterator[list[int]]:
        order: list[int] = []
        while True:
            if len(order) < self.batch_size:
                order += torch.randperm(self.size, generator=self.generator).tolist()
            batch, order = order[: self.batch_size], order[self.batch_size :]
            yield batch


def causal_lm_loss(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-sequence mean next-token loss, shape ``(batch,)``, from ``input_ids`` and ``attention_mask``.

    Only those two keys reach the model: HF's ``labels=`` loss averages over the whole batch and would
    couple the samples, so a ``labels`` entry is ignored on purpose.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    output = module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return per_sequence_loss(output.logits, input_ids, attention_mask)


def micro_batches(batch: Batch, size: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` split into chunks of at most ``size`` rows (``size`` 0: one chunk), each trimmed of the
    padding columns none of its rows needs (right padding; causal attention makes that exact)."""
    rows = batch_rows(batch)
    if size <= 0 or size >= rows:
        return [dict(batch)]
    chunks = []
    for start in range(0, rows, size):
        chunk = {k: v[start : start + size] for k, v in batch.items()}
        if "attention_mask" in chunk:
            width = int(chunk["attention_mask"].sum(dim=1).max())
            chunk = {k: v[:, :width] if v.dim() > 1 else v for k, v in chunk.items()}
        chunks.append(chunk)
    return chunks


def train_step(
    run: LocalRun,
    batch: Any,
    loss_fn: LossFn = causal_lm_loss,
    *,
    micro_batch_size: int = 0,
    precision: Precision | None = None,
) -> float | None:
    """One optimizer step on ``batch``; the mean per-sequence loss, or ``None`` for an empty batch.

    An empty batch (see :func:`fedtune.privacy.batch_rows`) takes ``run.empty_step()``: a noise-only step under
    DP, nothing without. ``loss_fn(module, batch)`` must return one loss per sequence (shape ``(batch,)``):
    their mean is the ``loss_reduction="mean"`` Opacus assumes when it rescales per-sample gradients.

    Parameters
    ----------
    run
        The wrapped model and optimizer.
    batch
        A mapping of tensors (``input_ids``, ``attention_mask``; right padding is fine), moved to ``run.device``.
    loss_fn
        Per-sequence loss; defaults to :func:`causal_lm_loss`.
    micro_batch_size
        > 0: forward and backward in chunks of this many rows, one optimizer step (and, under DP, one noise
        draw) for the whole batch.
    precision
        Autocast dtype of the forward pass (default float32, no autocast).
    """
    run.optimizer.zero_grad(set_to_none=True)
    rows = batch_rows(batch)
    if rows == 0:
        run.empty_step()
        return None
    chunks = micro_batches({k: v.to(run.device, non_blocking=True) for k, v in batch.items()}, micro_batch_size)
    total = 0.0
    for i, chunk in enumerate(chunks):
        losses = _chunk_losses(run, chunk, loss_fn, precision)
        redo = run.backward(losses, rows if len(chunks) > 1 else None)
        if redo is not None and not bool(redo.all()):  # DP, ghost mode: the chunk again without non-finite rows
            keep = (~redo).nonzero().flatten().to(run.device)
            run.backward(_chunk_losses(run, {k: v[keep] for k, v in chunk.items()}, loss_fn, precision), rows)
        total += float(losses.detach().float().sum())
        if i < len(chunks) - 1:
            run.accumulate()
    run.step()
    return total / rows


def _chunk_losses(run: LocalRun, chunk: Batch, loss_fn: LossFn, precision: Precision | None) -> torch.Tensor:
    with (precision or Precision()).autocast():
        losses = loss_fn(run.module, chunk)
    if losses.dim() != 1:
        raise ValueError(f"loss_fn must return per-sample losses of shape (batch,), got {tuple(losses.shape)}")
    return losses


def _endless(loader: Iterable[Any]) -> Iterator[Any]:
    while True:
        yield from loader


def _optimizer(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable_parameters(model), lr=learning_rate, weight_decay=0.0)


def train_local(
    model: nn.Module,
    shard: TokenizedSet,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    randomness: Randomness,
    privacy: ContributorPrivacy | None = None,
    loss_fn: LossFn = causal_lm_loss,
    secure_mode: bool = False,
    micro_batch_size: int = 0,
    precision: Precision | None = None,
    optimizer_state: OptimizerState | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps on the trainable adapter; DP-SGD (DP-AdamW) when ``privacy`` says so.

    Without DP the batches are ``batch_size`` shuffled examples. With DP they are Poisson-sampled at
    ``privacy.sample_rate`` (expected size ``batch_size``), every step clips and noises, an empty batch takes a
    noise-only step, and the contributor's accountant records the steps actually taken (also when training
    raises) and is saved to its state dir before this returns, so the ε spent is on disk before the update
    leaves the machine.

    Parameters
    ----------
    model
        The model with its adapter attached; its parameters that require grad are trained.
    shard
        The contributor's tokenized examples.
    steps, batch_size, learning_rate
        What the coordinator assigned.
    randomness
        Sources of batch sampling and DP noise.
    privacy
        The contributor's accounting (``None``: no accountant at all, as when the campaign trains without DP).
    loss_fn
        Per-sequence loss; defaults to :func:`causal_lm_loss`.
    secure_mode
        Opacus' floating-point-attack-resistant noise (pass :meth:`Randomness.csprng` with it).
    micro_batch_size
        > 0: run each batch in chunks of at most this many sequences (same steps, same result, less memory).
    precision
        Autocast dtype of the forward passes (default float32); float16 is refused under DP.
    optimizer_state
        Where the contributor keeps its AdamW moments between rounds (``None``: start cold, keep nothing): they
        are restored before the first step and saved after the last (not when training raises).

    Returns
    -------
    TrainResult
        Sequences and tokens seen, the mean loss over non-empty steps (0 if none), wall time, steps and, with
        ``privacy``, its summary.

    Raises
    ------
    PrivacyBudgetExceeded
        Before any step, when ``steps`` more would take the contributor past its budget.
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    if len(shard) == 0:
        raise ValueError("the shard is empty: nothing to train on")
    if privacy is not None:
        ok, reason = privacy.check_round(steps)
        if not ok:
            raise PrivacyBudgetExceeded(reason)
    private = privacy is not None and privacy.params.private
    if private and precision is not None and precision.dtype == torch.float16:
        raise ValueError("float16 training needs loss scaling, which DP-SGD's per-sample clipping would see: use bf16")
    optimizer = _optimizer(model, learning_rate)
    if optimizer_state is not None:
        optimizer_state.restore(optimizer)  # before Opacus wraps it: the wrapper steps this optimizer's state
    run: LocalRun
    if private:
        assert privacy is not None
        run = make_private(
            model,
            optimizer,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.params.max_grad_norm,
            expected_batch_size=privacy.sample_rate * len(shard),
            grad_sample_mode=privacy.params.grad_sample_mode,
            noise_generator=randomness.noise,
            secure_mode=secure_mode,
        )
        loader: Iterable[Any] = poisson_loader(shard, privacy.sample_rate, shard.pad, randomness.sampling)
    else:
        model.train()
        scaler = precision.scaler() if precision is not None else None
        run = PlainRun(model, optimizer, trainable_parameters(model)[0].device, scaler=scaler)
        batches = ShuffledBatches(len(shard), batch_size, randomness.sampling)
        loader = DataLoader(shard, batch_sampler=batches, collate_fn=shard.pad)
    start = time.perf_counter()
    losses: list[float] = []
    examples = tokens = empty = 0
    try:
        batches_iter = _endless(loader)
        for _ in range(steps):
            batch = next(batches_iter)
            loss = train_step(run, batch, loss_fn, micro_batch_size=micro_batch_size, precision=precision)
            if loss is None:
                empty += 1
                continue
            losses.append(loss)
            examples += batch_rows(batch)
            tokens += int(token_counts(batch["attention_mask"]).sum())
        if optimizer_state is not None:
            optimizer_state.save(optimizer)
    finally:
        run.close()  # Opacus' hooks off, so the same model can be wrapped again next round
        if privacy is not None:
            privacy.record_round(run.steps_taken)
            privacy.save()
    return TrainResult(
        examples=examples,
        tokens=tokens,
        train_loss=float(np.mean(losses)) if losses else 0.0,
        wall_s=time.perf_counter() - start,
        steps=steps,
        empty_batches=empty,
        privacy=privacy.summary() if privacy is not None else {},
    )
