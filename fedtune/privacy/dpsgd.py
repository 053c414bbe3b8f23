"""DP-SGD with Opacus: what makes one local training step private, and the Poisson batches it runs on.

Job: :func:`make_private` wraps a model and optimizer with Opacus' ``GradSampleModule`` + ``DPOptimizer``
(``"hooks"``) or their ghost-clipping variants (``"ghost"``) into a :class:`PrivateRun`, which knows how a DP
step does its backward pass, how it steps, and how it steps on an empty batch; :func:`poisson_loader` is
Opacus' own ``DPDataLoader`` at the given rate. The loop that drives them is
:func:`fedtune.clients.trainer.train_local`, the same loop as for plain training; the accounting is
:class:`fedtune.privacy.ContributorPrivacy`.

Threat: the coordinator learns the update, so every step must clip each sequence's gradient and add noise
calibrated to the clip, and the batches must be Poisson-sampled with randomness the coordinator cannot
recompute (the generators are passed in; batches recomputable from public seeds void the amplification).

Pitfalls (see DESIGN.md, "Differential privacy"):

- the loss is a per-sequence mean, never HF's ``labels=`` loss (it averages tokens over the whole batch and
  couples samples); the step checks it gets one loss per sequence;
- gradient checkpointing must be reentrant, with input grads enabled (:func:`enable_dp_gradient_checkpointing`);
  non-reentrant checkpointing is refused because per-sample gradients go missing;
- the model must be on its device before ``get_peft_model`` (opacus issue 820); nothing here moves it, and
  the noise generator must live on that device too (Opacus does not move generators);
- Opacus' ``PrivacyEngine`` derives the sample rate as ``1 / len(loader)``: the pieces are used directly so
  the rate is ``batch_size / n`` and the optimizer divides by the expected batch size ``q · n``;
- ``DPDataLoader`` handles empty batches with ``CollateFnWithEmpty``, which learns the batch structure from
  the first non-empty batch: later empty batches are the same mapping with zero rows, but when the *first*
  batch is empty it returns a list of zero-length tensors (one per item of ``dataset[0]``), not a mapping.
  :func:`batch_rows` reads both as empty. It also reads ``dataset[0]`` when built, so the dataset must be
  non-empty and its items iterable;
- an empty batch still takes a noise-only step (:meth:`PrivateRun.empty_step`): skipping it would reveal
  that the batch was empty, which the accounting does not cover;
- a sequence whose gradient is not finite must contribute nothing, not NaN: clipping scales by ``C / norm``,
  which leaves NaN and turns ∞ into ``0 · ∞``, and one NaN row poisons the whole noised sum. The coordinator
  chooses the adapter, and a crafted one overflows on chosen content (a token, a phrase), so a NaN update
  would tell it, outside any ε, that a sampled record held it. Dropping such rows is itself a clipping
  function (norm 0 ≤ C), so the guarantee stands: hooks mode zeroes their per-sample gradients; ghost mode
  cannot separate them from its clipped sum, so :meth:`PrivateRun.backward` discards the chunk's sum and
  names the rows, and :func:`fedtune.clients.trainer.train_step` runs the chunk again without them (a
  pass the coordinator could time; hooks mode has no such signal).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fedtune.ml.model import enable_gradient_checkpointing

from .params import GradSampleMode, require

if TYPE_CHECKING:
    from opacus.data_loader import DPDataLoader


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a local round trains (the adapter), in model order."""
    return [p for p in model.parameters() if p.requires_grad]


def _check_optimizer_matches(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable parameter must be optimised and vice versa, or clipping would miss a gradient."""
    trainable = {id(p) for p in trainable_parameters(model)}
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    require(trainable == optimised, "the optimizer's parameters must be exactly the model's trainable parameters")
    require(bool(trainable), "the model has no trainable parameters")


def _check_checkpointing(model: nn.Module) -> None:
    """Refuse non-reentrant gradient checkpointing: Opacus' hooks then miss per-sample gradients."""
    for module in model.modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is True:
            continue
        raise ValueError(
            "gradient checkpointing is on without use_reentrant=True; per-sample gradients would be missing. "
            "Use fedtune.privacy.enable_dp_gradient_checkpointing(model)."
        )


def enable_dp_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on gradient checkpointing in the form DP-SGD needs: reentrant, with input grads enabled.

    Non-reentrant checkpointing recomputes activations outside Opacus' hooks, so per-sample gradients of
    the checkpointed layers go missing; reentrant checkpointing needs the embedding output to require grad.
    It is :func:`fedtune.ml.model.enable_gradient_checkpointing` (what ``[model] gradient_checkpointing`` turns on).

    Parameters
    ----------
    model
        A Hugging Face causal LM, or a PEFT model around one.
    """
    enable_gradient_checkpointing(model)


def batch_rows(batch: Any) -> int:
    """Number of sequences in a batch: a mapping of tensors, or what ``DPDataLoader`` gives for an empty one.

    A first-empty Poisson batch comes as a (possibly empty) list of zero-length tensors; anything else that
    is not a mapping is refused rather than trained on.
    """
    if isinstance(batch, Mapping):
        return len(next(iter(batch.values()))) if batch else 0
    if batch is None:
        return 0
    require(
        isinstance(batch, list | tuple) and all(torch.is_tensor(t) and len(t) == 0 for t in batch),
        f"expected a mapping of tensors (or an empty Poisson batch), got {type(batch).__name__}",
    )
    return 0


@dataclass
class PrivateRun:
    """One round's DP-SGD objects: use ``module`` for forward passes; :meth:`backward` then :meth:`step`.

    Attributes
    ----------
    module
        Opacus ``GradSampleModule`` (forwards ``*args, **kwargs`` to the wrapped HF/PEFT model).
    optimizer
        Opacus ``DPOptimizer`` (clips, adds noise, divides by the expected batch size).
    grad_sample_mode
        ``"hooks"`` or ``"ghost"``.
    device
        Where the trainable parameters (and so the batches) live.
    steps_taken
        Noised optimizer steps so far, counted by the optimizer's step hook once the noise is drawn.
    """

    module: nn.Module
    optimizer: Any  # opacus DPOptimizer or DPOptimizerFastGradientClipping
    grad_sample_mode: GradSampleMode
    device: torch.device
    steps_taken: int = 0
    _closed: bool = False

    def _count_step(self, _optimizer: Any = None) -> None:
        self.steps_taken += 1

    def backward(self, losses: torch.Tensor, batch_rows: int | None = None) -> torch.Tensor | None:
        """Per-sample gradients (hooks) or norms plus the clipped sum (ghost) of per-sequence ``losses``.

        ``losses`` may be one micro-batch of a larger batch (``batch_rows``): Opacus rescales the chunk's mean
        loss to per-sample gradients either way, and the noised sum is divided by the expected batch size.
        Rows whose loss or gradient is not finite contribute nothing (module docstring). Returns ``None``, or
        in ghost mode the mask of such rows after discarding the chunk's sum: the caller runs the chunk again
        without them.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if self.grad_sample_mode == "ghost":
                from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

                DPTensorFastGradientClipping(self.module, self.optimizer, losses, "mean").backward()  # type: ignore[arg-type]
            else:
                losses.mean().backward()
        bad = ~torch.isfinite(losses.detach())
        if self.grad_sample_mode == "ghost":
            bad |= ~torch.isfinite(self.module.per_sample_gradient_norms.to(bad.device))  # type: ignore[union-attr]
            if not bool(bad.any()):
                return None
            for p in self.optimizer.params:
                p.grad = torch.zeros_like(p)  # the chunk's sum is gone; an all-bad chunk adds nothing
            return bad
        samples = [p.grad_sample for p in self.optimizer.params if p.grad_sample is not None]
        for g in samples:
            bad |= ~torch.isfinite(g.reshape(len(g), -1)).all(dim=1).to(bad.device)
        if bool(bad.any()):
            for g in samples:
                g[bad.to(g.device)] = 0.0
        return None

    def accumulate(self) -> None:
        """Between micro-batches: clip this chunk's per-sample gradients into the step's sum, draw no noise.

        Opacus' virtual step: ``signal_skip_step`` makes the next ``step()`` only clip and accumulate into
        ``summed_grad`` (kept by ``zero_grad`` after a skipped step); the final :meth:`step` adds the noise once.
        """
        self.optimizer.signal_skip_step(do_skip=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Clip, noise, and apply the update (counted in :attr:`steps_taken`)."""
        self.optimizer.step()

    def empty_step(self) -> None:
        """DP step for an empty Poisson batch: a zero clipped sum plus noise, counted like any other step."""
        for p in self.optimizer.params:
            if self.grad_sample_mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()

    def close(self) -> None:
        """Remove Opacus' hooks, so the same model object can be wrapped again next round (idempotent)."""
        if not self._closed:
            self._closed = True
            self.module.cleanup()  # type: ignore[operator]


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    grad_sample_mode: GradSampleMode = "hooks",
    noise_generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> PrivateRun:
    """Wrap a model and its optimizer for DP-SGD with a given noise multiplier (no accounting here).

    The model is used where it is (no ``.to``): PEFT must have been attached after moving it. It is put in
    training mode, since Opacus captures activations only then.

    Parameters
    ----------
    model
        The model with its trainable adapter; exactly ``optimizer``'s parameters may require grad.
    optimizer
        The plain optimizer over the trainable parameters.
    noise_multiplier, max_grad_norm
        σ and the per-sample clip C (noise std = σ·C).
    expected_batch_size
        ``sample_rate × shard_size``: the clipped, noised sum is divided by it (``loss_reduction="mean"``).
    grad_sample_mode
        ``"hooks"`` or ``"ghost"``.
    noise_generator
        Source of the Gaussian noise, on the trainable parameters' device; ``None`` uses torch's global one.
    secure_mode
        Opacus' noise that resists floating-point attacks (each draw is the sum of 4 Gaussians, halved;
        Mironov 2012, Holohan et al. 2021). Its other half, a cryptographically secure generator, is the
        caller's: :meth:`fedtune.clients.trainer.Randomness.csprng`.

    Returns
    -------
    PrivateRun
        Close it to remove the hooks.
    """
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    _check_optimizer_matches(model, optimizer)
    _check_checkpointing(model)
    require(expected_batch_size > 0, "expected_batch_size must be > 0")
    device = trainable_parameters(model)[0].device
    require(
        noise_generator is None or noise_generator.device.type == device.type,
        f"the noise generator is on {noise_generator.device if noise_generator else None}, "
        f"the trainable parameters on {device}: create it there",
    )
    model.train()  # Opacus only captures activations in training mode
    if grad_sample_mode == "hooks":
        module: nn.Module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer_class: type[DPOptimizer] = DPOptimizer
    elif grad_sample_mode == "ghost":
        module = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="mean",
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=True,
        )
        optimizer_class = DPOptimizerFastGradientClipping
    else:
        raise ValueError(f"grad_sample_mode must be 'hooks' or 'ghost', not {grad_sample_mode!r}")
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=secure_mode,
    )
    module.forbid_grad_accumulation()  # type: ignore[operator]
    run = PrivateRun(module, dp_optimizer, grad_sample_mode, device)
    dp_optimizer.attach_step_hook(run._count_step)
    return run


def poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    collate_fn: Callable[[list[Any]], Any],
    generator: torch.Generator | None,
) -> DPDataLoader:
    """Opacus' ``DPDataLoader``: each record joins each batch independently with probability ``sample_rate``.

    One pass yields ``int(1 / sample_rate)`` batches; iterate it again for more (the generator carries on).
    Empty batches come out as described in the module docstring; count them with :func:`batch_rows`.

    Parameters
    ----------
    dataset
        A non-empty map-style dataset whose items are iterable (``DPDataLoader`` inspects ``dataset[0]``).
    sample_rate
        q in (0, 1], the rate the accountant assumes.
    collate_fn
        Turns a non-empty list of items into a batch.
    generator
        Source of the sampling (CPU); ``None`` uses torch's global one.
    """
    from opacus.data_loader import DPDataLoader

    require(isinstance(dataset, Sized) and len(dataset) >= 1, "cannot Poisson-sample an empty dataset")
    require(0 < sample_rate <= 1, "sample_rate must be in (0, 1]")
    return DPDataLoader(dataset, sample_rate=sample_rate, collate_fn=collate_fn, generator=generator)
