"""Record-level differential privacy for a contributor's local training (DP-SGD with Opacus).

The coordinator is not trusted, so the guarantee is made on the contributor: every local step clips each
sequence's gradient and adds Gaussian noise (DP-SGD), and one accountant covers the contributor's whole
participation, not a single round. The noise multiplier is computed once, for the planned number of rounds,
and the accountant's history is persisted in the contributor's state dir and reloaded before every round
(calling Opacus' ``make_private_with_epsilon`` each round would silently restart the budget).

Per round the trainer does::

    privacy = ContributorPrivacy.load(state_dir, params, shard_size=n, batch_size=b, local_steps=k)
    ok, reason = privacy.check_round(k)
    if not ok:
        ...  # decline the round, report ``reason``
    with privacy.make_private(model, optimizer, data_loader) as run:
        metrics = run.train_steps(k)       # Poisson batches, per-sample clipping, noise
    privacy.save()                          # before the update leaves the machine
    metrics |= privacy.summary()

Leaving the ``with`` block records the steps actually taken (also when training raised: the conservative
choice) and removes the Opacus hooks, so the same model object can be used again next round.

Pitfalls this module guards against (see DESIGN.md, "Differential privacy"):

- the loss is a per-sequence mean (:func:`fedtune.ml.losses.per_sequence_loss`), never HF's ``labels=`` loss,
  which averages tokens over the whole batch and couples samples;
- gradient checkpointing must be reentrant (:func:`enable_dp_gradient_checkpointing`); non-reentrant
  checkpointing is refused because per-sample gradients go missing;
- the model must be on its device before ``get_peft_model``; :func:`make_private` never moves it;
- batches are Poisson-sampled with rate ``batch_size / shard_size`` (what the accountant assumes); an empty
  batch still takes a noise-only step, so skipping it neither crashes the model nor leaks that it was empty.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedtune.ml.losses import per_sequence_loss

logger = logging.getLogger(__name__)

Mechanism = Literal["dp-sgd", "none"]
AccountantKind = Literal["prv", "rdp"]
GradSampleMode = Literal["hooks", "ghost"]
Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
History = tuple[tuple[float, float, int], ...]

STATE_FILE = "privacy_state.json"
SUMMARY_FILE = "privacy.json"
_STATE_FORMAT = 1


class PrivacyBudgetExceeded(RuntimeError):
    """Raised when training would take a contributor past its ε budget."""


@dataclass(frozen=True)
class PrivacyParams:
    """The ``[privacy]`` section of a campaign, plus the contributor's own stricter budget.

    Attributes
    ----------
    mechanism
        ``"dp-sgd"`` (record-level DP-SGD) or ``"none"``.
    target_epsilon
        Campaign ε for a contributor's whole planned participation; the noise multiplier is calibrated to it.
    target_delta
        δ; ``None`` picks :func:`default_delta` from the shard size.
    max_grad_norm
        Per-sample gradient L2 bound C.
    accountant
        ``"prv"`` (tight, default) or ``"rdp"``.
    planned_rounds
        Rounds a contributor is expected to join; with ``local_steps`` it sets the calibration horizon.
    grad_sample_mode
        ``"hooks"`` (materialises per-sample grads of the trainable params; cheap for LoRA) or ``"ghost"``
        (ghost clipping: per-sample norms only, two backward passes).
    update_clip_norm
        Optional L2 bound on the round's update (see :func:`clip_update`); ``None`` disables it.
    personal_max_epsilon
        A contributor's own ε cap; the effective budget is ``min(target_epsilon, personal_max_epsilon)``.
    """

    mechanism: Mechanism = "dp-sgd"
    target_epsilon: float = 8.0
    target_delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: AccountantKind = "prv"
    planned_rounds: int = 10
    grad_sample_mode: GradSampleMode = "hooks"
    update_clip_norm: float | None = None
    personal_max_epsilon: float | None = None

    def __post_init__(self) -> None:
        _require(
            self.mechanism in ("dp-sgd", "none"),
            f"mechanism must be 'dp-sgd' or 'none', not {self.mechanism!r}",
        )
        _require(self.accountant in ("prv", "rdp"), f"accountant must be 'prv' or 'rdp', not {self.accountant!r}")
        _require(
            self.grad_sample_mode in ("hooks", "ghost"),
            f"grad_sample_mode must be 'hooks' or 'ghost', not {self.grad_sample_mode!r}",
        )
        _require(self.target_epsilon > 0, "target_epsilon must be > 0")
        _require(self.target_delta is None or 0 < self.target_delta < 1, "target_delta must be in (0, 1)")
        _require(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        _require(self.planned_rounds >= 1, "planned_rounds must be >= 1")
        _require(self.update_clip_norm is None or self.update_clip_norm > 0, "update_clip_norm must be > 0")
        _require(
            self.personal_max_epsilon is None or self.personal_max_epsilon > 0,
            "personal_max_epsilon must be > 0",
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PrivacyParams:
        """Build from a config mapping (e.g. ``dataclasses.asdict(campaign.privacy)``); unknown keys raise."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        _require(not unknown, f"unknown [privacy] keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def from_campaign(
        cls, section: Any, *, campaign_rounds: int, personal_max_epsilon: float | None = None
    ) -> PrivacyParams:
        """Build from the campaign's ``[privacy]`` section (``fedtune.config.PrivacySection``).

        The section writes "derive it" as 0: ``delta = 0`` means :func:`default_delta`, ``planned_rounds = 0``
        the campaign's rounds, ``update_clip_norm = 0`` no update clipping. Its ``personal_max_epsilon`` is a
        per-partition table for simulation, so the contributor's own cap is passed in separately.
        """
        return cls(
            mechanism=section.mechanism,
            target_epsilon=section.target_epsilon,
            target_delta=section.delta or None,
            max_grad_norm=section.max_grad_norm,
            accountant=section.accountant,
            planned_rounds=section.planned_rounds or campaign_rounds,
            grad_sample_mode=section.grad_sample_mode,
            update_clip_norm=section.update_clip_norm or None,
            personal_max_epsilon=personal_max_epsilon,
        )

    @property
    def private(self) -> bool:
        return self.mechanism == "dp-sgd"

    @property
    def budget(self) -> float:
        """The ε this contributor may spend: the stricter of the campaign target and its own cap."""
        if self.personal_max_epsilon is None:
            return self.target_epsilon
        return min(self.target_epsilon, self.personal_max_epsilon)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def default_delta(shard_size: int) -> float:
    """δ = min(1e-5, 1 / (10 n)).

    δ must be well below 1/n (a mechanism that publishes one random record is (0, 1/n)-DP); 1e-5 is the
    customary ceiling for larger shards, so the stricter of the two is used.
    """
    _require(shard_size >= 1, "shard_size must be >= 1")
    return min(1e-5, 1.0 / (10 * shard_size))


def sample_rate_for(batch_size: int, shard_size: int) -> float:
    """Poisson sampling rate q = batch_size / shard_size (capped at 1): expected batch = ``batch_size``."""
    _require(batch_size >= 1 and shard_size >= 1, "batch_size and shard_size must be >= 1")
    return min(1.0, batch_size / shard_size)


def _make_accountant(kind: AccountantKind) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return PRVAccountant() if kind == "prv" else RDPAccountant()


@functools.lru_cache(maxsize=256)
def epsilon_for(kind: AccountantKind, history: History, delta: float) -> float:
    """ε of a composition history ``((noise_multiplier, sample_rate, steps), ...)`` under ``kind``.

    Cached: the PRV accountant costs tens of milliseconds per call and the same history is asked about
    repeatedly (``epsilon_spent``, ``check_round``, ``summary``).
    """
    if sum(steps for _, _, steps in history) == 0:
        return 0.0
    if any(noise <= 0 and steps > 0 for noise, _, steps in history):
        return math.inf  # steps taken without noise (e.g. under mechanism "none") have no finite ε
    accountant = _make_accountant(kind)
    accountant.history = [tuple(entry) for entry in history if entry[2] > 0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta=delta))


def extend_history(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """Append ``steps`` steps of (noise_multiplier, sample_rate), merging with an identical last entry.

    Merging keeps the history as short as Opacus' own ``step()`` would, so ε is computed on exactly the
    composition an independent accountant would see.
    """
    _require(steps >= 0, "steps must be >= 0")
    if steps == 0:
        return history
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        return (*history[:-1], (noise_multiplier, sample_rate, history[-1][2] + steps))
    return (*history, (noise_multiplier, sample_rate, steps))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: AccountantKind
) -> float:
    """Noise multiplier that spends exactly ``target_epsilon`` (within 0.01) after ``steps`` steps.

    Done once per contributor for its whole planned participation, never per round.
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
    except ValueError as exc:
        raise ValueError(
            f"cannot reach ε={target_epsilon}, δ={delta:g} with q={sample_rate:g} over {steps} steps: {exc}"
        ) from exc


def _atomic_write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON through a temp file + ``os.replace`` so a crash never leaves a truncated state file."""
    from fedtune.files import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


@dataclass
class ContributorPrivacy:
    """A contributor's lifetime DP-SGD accounting: calibration, accountant history, budget, persistence.

    Build it with :meth:`load` (which calibrates on first use); the constructor is the raw state holder.
    ``noise_multiplier`` and ``delta`` are fixed at calibration and never change afterwards, so the ε
    reported is always for one consistent guarantee; ``sample_rate`` follows the current shard and batch
    size (a heterogeneous history is fine for both accountants).
    """

    params: PrivacyParams
    noise_multiplier: float
    delta: float
    sample_rate: float
    calibration: dict[str, Any]
    history: History = ()
    rounds: int = 0
    state_dir: Path | None = None

    # -- construction and persistence ---------------------------------------------------------------

    @classmethod
    def load(
        cls,
        state_dir: str | os.PathLike[str],
        params: PrivacyParams,
        *,
        shard_size: int,
        batch_size: int,
        local_steps: int,
    ) -> ContributorPrivacy:
        """Restore the contributor's privacy state from ``state_dir``, or calibrate a fresh one.

        Nothing is written until :meth:`save`. Call it before every round: the state on disk, not an object
        kept in memory, is the source of truth across restarts and simulation workers. Once calibrated, the
        noise multiplier and δ stay as stored; a changed ``target_epsilon`` or ``personal_max_epsilon``
        only moves the budget, and a changed shard or batch size only the sample rate of future steps.
        """
        state_dir = Path(state_dir)
        sample_rate = sample_rate_for(batch_size, shard_size)
        state_path = state_dir / STATE_FILE
        if state_path.exists():
            state = json.loads(state_path.read_text(encoding="utf-8"))
            _require(
                state.get("format") == _STATE_FORMAT,
                f"{state_path}: unsupported format {state.get('format')}",
            )
            accountant_state = state["accountant"]
            if accountant_state.get("mechanism") != params.accountant:
                logger.warning(
                    "privacy state was kept with the %s accountant; re-evaluating its history with %s",
                    accountant_state.get("mechanism"),
                    params.accountant,
                )
            if state["mechanism"] != params.mechanism:
                logger.warning("privacy mechanism changed from %s to %s", state["mechanism"], params.mechanism)
            if params.target_delta is not None and params.target_delta != state["delta"]:
                logger.warning("keeping δ=%g from calibration, not %g", state["delta"], params.target_delta)
            history = tuple((float(s), float(q), int(k)) for s, q, k in accountant_state["history"])
            return cls(
                params=params,
                noise_multiplier=float(state["noise_multiplier"]),
                delta=float(state["delta"]),
                sample_rate=sample_rate,
                calibration=dict(state["calibration"]),
                history=history,
                rounds=int(state["rounds"]),
                state_dir=state_dir,
            )
        delta = params.target_delta if params.target_delta is not None else default_delta(shard_size)
        horizon = local_steps * params.planned_rounds
        noise = (
            calibrate_noise(params.target_epsilon, delta, sample_rate, horizon, params.accountant)
            if params.private
            else 0.0
        )
        calibration = {
            "target_epsilon": params.target_epsilon,
            "sample_rate": sample_rate,
            "steps": horizon,
            "planned_rounds": params.planned_rounds,
            "local_steps": local_steps,
            "shard_size": shard_size,
            "batch_size": batch_size,
            "accountant": params.accountant,
        }
        return cls(params, noise, delta, sample_rate, calibration, state_dir=state_dir)

    def save(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        """Persist the accountant state (``privacy_state.json``) and a readable summary (``privacy.json``)."""
        target = Path(state_dir) if state_dir is not None else self.state_dir
        _require(target is not None, "no state_dir: pass one to save() or build with load()")
        accountant = _make_accountant(self.params.accountant)
        accountant.history = [list(entry) for entry in self.history]
        state = {
            "format": _STATE_FORMAT,
            "mechanism": self.params.mechanism,
            "accountant": dict(accountant.state_dict()),
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "calibration": self.calibration,
            "rounds": self.rounds,
        }
        _atomic_write_json(target / STATE_FILE, state)
        _atomic_write_json(target / SUMMARY_FILE, self.summary() | {"updated": _now()})

    # -- accounting -----------------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """DP-SGD steps taken over the contributor's whole participation."""
        return sum(k for _, _, k in self.history)

    @property
    def budget(self) -> float:
        return self.params.budget

    def epsilon_spent(self) -> float:
        """ε spent so far at this contributor's δ (``inf`` when training without DP)."""
        return self.epsilon_after(0)

    def epsilon_after(self, extra_steps: int) -> float:
        """ε the contributor would have spent after ``extra_steps`` more steps at the current sample rate."""
        if not self.params.private:
            return math.inf if self.steps + extra_steps > 0 else 0.0
        history = extend_history(self.history, self.noise_multiplier, self.sample_rate, extra_steps)
        return epsilon_for(self.params.accountant, history, self.delta)

    def check_round(self, steps: int) -> tuple[bool, str]:
        """Whether a round of ``steps`` steps keeps the contributor within its budget, and why (not)."""
        if not self.params.private:
            if self.params.personal_max_epsilon is not None:
                return False, (
                    f"campaign trains without DP but this contributor caps ε at {self.params.personal_max_epsilon}"
                )
            return True, "campaign trains without differential privacy"
        spent = self.epsilon_spent()
        after = self.epsilon_after(steps)
        if after > self.budget:
            return False, (
                f"round of {steps} steps would raise ε from {spent:.3f} to {after:.3f}, "
                f"over the budget {self.budget:.3f} (δ={self.delta:.2e})"
            )
        return True, f"ε {spent:.3f} -> {after:.3f} of budget {self.budget:.3f} (δ={self.delta:.2e})"

    def record_round(self, steps: int) -> None:
        """Add the steps actually taken this round to the persistent history (called by ``TrainingRun``)."""
        if steps <= 0:
            return
        if self.params.private:
            self.history = extend_history(self.history, self.noise_multiplier, self.sample_rate, steps)
        else:
            self.history = extend_history(self.history, 0.0, self.sample_rate, steps)
        self.rounds += 1

    def summary(self) -> dict[str, Any]:
        """Human-readable figures, also suitable as round metrics."""
        return {
            "mechanism": self.params.mechanism,
            "accountant": self.params.accountant,
            "epsilon_spent": self.epsilon_spent(),
            "delta": self.delta,
            "budget": self.budget,
            "target_epsilon": self.params.target_epsilon,
            "personal_max_epsilon": self.params.personal_max_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.params.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "rounds": self.rounds,
            "planned_rounds": self.params.planned_rounds,
        }

    # -- training ---------------------------------------------------------------------------------------

    def make_private(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        *,
        noise_generator: torch.Generator | None = None,
        sample_generator: torch.Generator | None = None,
    ) -> TrainingRun:
        """Wrap model, optimizer and loader for this round with the calibrated noise (:func:`make_private`).

        The returned run records its steps into this object when its ``with`` block exits.
        """
        if not self.params.private:
            run = non_private_run(model, optimizer, data_loader)
        else:
            run = make_private(
                model,
                optimizer,
                data_loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.params.max_grad_norm,
                grad_sample_mode=self.params.grad_sample_mode,
                sample_rate=self.sample_rate,
                noise_generator=noise_generator,
                sample_generator=sample_generator,
            )
        run.privacy = self
        return run


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------------
# Wrapping model / optimizer / loader
# ------------------------------------------------------------------------------------------------------


class _CollateOrNone:
    """Collate wrapper returning ``None`` for an empty Poisson batch instead of failing in ``collate_fn``."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        return self.collate_fn(samples) if samples else None


def poisson_loader(data_loader: DataLoader, sample_rate: float, generator: torch.Generator | None = None) -> DataLoader:
    """A loader over the same dataset and collate function that draws each batch by Poisson sampling.

    Each record joins each batch independently with probability ``sample_rate`` (what the accountant
    assumes); the loader never ends, so a round can take any number of steps. Empty batches come out as
    ``None``.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(
        num_samples=len(data_loader.dataset),  # type: ignore[arg-type]
        sample_rate=sample_rate,
        generator=generator,
        steps=2**62,
    )
    return DataLoader(
        data_loader.dataset,
        batch_sampler=sampler,
        collate_fn=_CollateOrNone(data_loader.collate_fn),
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
    )


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _check_optimizer_matches(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable parameter must be optimised and vice versa, or clipping would miss a gradient."""
    trainable = {id(p) for p in _trainable_parameters(model)}
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    _require(trainable == optimised, "the optimizer's parameters must be exactly the model's trainable parameters")
    _require(bool(trainable), "the model has no trainable parameters")


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
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": True}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.enable_input_require_grads()


@dataclass
class TrainingRun:
    """One round's training objects: use ``module`` for forward passes, ``optimizer`` to step.

    Attributes
    ----------
    module
        Opacus ``GradSampleModule`` (forwards ``*args, **kwargs`` to the wrapped HF/PEFT model) or, without
        DP, the model itself.
    optimizer
        Opacus ``DPOptimizer`` (clips, adds noise, divides by the expected batch size) or the plain one.
    data_loader
        Poisson-sampled, endless loader (``None`` for an empty batch); the original loader without DP.
    grad_sample_mode
        ``"hooks"``, ``"ghost"`` or ``None`` (no DP).
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader
    grad_sample_mode: GradSampleMode | None
    privacy: ContributorPrivacy | None = None
    device: torch.device = torch.device("cpu")
    steps_taken: int = 0
    empty_batches: int = 0
    _batches: Iterator[Any] | None = None
    _closed: bool = False

    @property
    def private(self) -> bool:
        return self.grad_sample_mode is not None

    def _count_step(self, _optimizer: Any = None) -> None:
        self.steps_taken += 1

    def next_batch(self) -> Any:
        """Next batch, restarting the underlying loader when it is exhausted."""
        if self._batches is None:
            self._batches = iter(self.data_loader)
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.data_loader)
            return next(self._batches)

    def train_steps(self, steps: int, loss_fn: LossFn | None = None) -> dict[str, float]:
        """Run ``steps`` optimizer steps; see :func:`dp_train_steps`."""
        return dp_train_steps(self, steps, loss_fn)

    def close(self) -> None:
        """Record the steps taken into the contributor's accountant and remove Opacus' hooks (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.privacy is not None:
            self.privacy.record_round(self.steps_taken)
        if self.private:
            self.module.cleanup()  # type: ignore[operator]

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: GradSampleMode = "hooks",
    sample_rate: float | None = None,
    noise_generator: torch.Generator | None = None,
    sample_generator: torch.Generator | None = None,
) -> TrainingRun:
    """Wrap for DP-SGD with a given noise multiplier (no accounting; :class:`ContributorPrivacy` does that).

    Uses Opacus' lower-level pieces rather than ``PrivacyEngine`` because the engine derives the sample
    rate as ``1 / len(loader)``, which is not ``batch_size / n`` unless the batch size divides n, and would
    keep a second accountant. Here ``sample_rate`` defaults to ``data_loader.batch_size / len(dataset)``
    and the optimizer divides the clipped, noised sum by the expected batch size ``sample_rate * n``.

    The model is used where it is (no ``.to``): PEFT must have been attached after moving it. It is put in
    training mode, since Opacus captures activations only then.
    """
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    _check_optimizer_matches(model, optimizer)
    _check_checkpointing(model)
    model.train()  # Opacus only captures activations in training mode
    dataset_size = len(data_loader.dataset)  # type: ignore[arg-type]
    if sample_rate is None:
        _require(data_loader.batch_size is not None, "data_loader needs a batch_size to derive the sample rate")
        sample_rate = sample_rate_for(int(data_loader.batch_size), dataset_size)  # type: ignore[arg-type]
    _require(0 < sample_rate <= 1, "sample_rate must be in (0, 1]")
    expected_batch_size = sample_rate * dataset_size
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
    )
    module.forbid_grad_accumulation()  # type: ignore[operator]
    loader = poisson_loader(data_loader, sample_rate, sample_generator)
    run = TrainingRun(module, dp_optimizer, loader, grad_sample_mode, device=_trainable_parameters(model)[0].device)
    dp_optimizer.attach_step_hook(run._count_step)
    return run


def non_private_run(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader) -> TrainingRun:
    """The same interface without DP (``mechanism = "none"``, and the benchmark's baseline)."""
    _check_optimizer_matches(model, optimizer)
    model.train()
    return TrainingRun(model, optimizer, data_loader, None, device=_trainable_parameters(model)[0].device)


# ------------------------------------------------------------------------------------------------------
# Training steps
# ------------------------------------------------------------------------------------------------------


def causal_lm_loss(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-sequence mean next-token loss, shape ``(batch,)``, from ``input_ids`` and ``attention_mask``.

    Only those two keys reach the model: HF's ``labels=`` loss averages over the whole batch and would
    couple the samples, so a ``labels`` entry is ignored on purpose.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    output = module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return per_sequence_loss(output.logits, input_ids, attention_mask)


def _to_device(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _noise_only_step(run: TrainingRun) -> None:
    """DP step for an empty Poisson batch: zero clipped sum, plus noise, counted by the accountant.

    Skipping the step outright would reveal that the batch was empty, which the accounting does not cover.
    """
    for p in run.optimizer.params:  # type: ignore[attr-defined]
        if run.grad_sample_mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))
    run.optimizer.step()


def train_step(run: TrainingRun, batch: Batch | None, loss_fn: LossFn | None = None) -> float | None:
    """One optimizer step on ``batch``; returns the mean per-sequence loss, or ``None`` for an empty batch.

    ``loss_fn(module, batch)`` must return one loss per sequence (shape ``(batch,)``): the step averages
    it, which is the ``loss_reduction="mean"`` Opacus assumes when it rescales per-sample gradients.
    """
    loss_fn = loss_fn or causal_lm_loss
    run.optimizer.zero_grad(set_to_none=True)
    if batch is None or len(next(iter(batch.values()))) == 0:
        run.empty_batches += 1
        if run.private:
            _noise_only_step(run)
        return None
    losses = loss_fn(run.module, _to_device(batch, run.device))
    _require(
        losses.dim() == 1,
        f"loss_fn must return per-sample losses of shape (batch,), got {tuple(losses.shape)}",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if run.grad_sample_mode == "ghost":
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

            DPTensorFastGradientClipping(run.module, run.optimizer, losses, "mean").backward()  # type: ignore[arg-type]
        else:
            losses.mean().backward()
    run.optimizer.step()
    if not run.private:
        run._count_step()
    return float(losses.detach().mean())


def dp_train_steps(run: TrainingRun, steps: int, loss_fn: LossFn | None = None) -> dict[str, float]:
    """Run ``steps`` DP-SGD steps drawing batches from ``run.data_loader``.

    Batches are mappings of tensors (``input_ids``, ``attention_mask``, right padding is fine) and are moved
    to the device of the trainable parameters. If the run belongs to a :class:`ContributorPrivacy`, the
    budget is checked first and :class:`PrivacyBudgetExceeded` raised rather than overspent.

    Returns
    -------
    dict
        ``steps``, ``empty_batches``, ``samples`` (sequences seen), ``loss`` (mean over non-empty steps,
        NaN if none) and ``seconds``.
    """
    _require(steps >= 0, "steps must be >= 0")
    if run.privacy is not None:
        ok, reason = run.privacy.check_round(run.steps_taken + steps)
        if not ok:
            raise PrivacyBudgetExceeded(reason)
    run.module.train()
    started, empty_before, losses, samples = time.perf_counter(), run.empty_batches, [], 0
    for _ in range(steps):
        batch = run.next_batch()
        loss = train_step(run, batch, loss_fn)
        if loss is not None:
            losses.append(loss)
            samples += len(next(iter(batch.values())))
    return {
        "steps": float(steps),
        "empty_batches": float(run.empty_batches - empty_before),
        "samples": float(samples),
        "loss": float(np.mean(losses)) if losses else math.nan,
        "seconds": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------------------
# Update clipping
# ------------------------------------------------------------------------------------------------------


def clip_update(update: Mapping[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale a round's update (after − before, per parameter) so its global L2 norm is at most ``bound``.

    This bounds one contributor's influence on the aggregate and fixes the range secure aggregation has
    to quantize; the record-level DP guarantee comes from DP-SGD, not from this clip.

    Returns
    -------
    (clipped, norm_before)
        New arrays (same keys, dtypes and shapes) and the update's norm before clipping.
    """
    _require(bound > 0, "bound must be > 0")
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))
    _require(math.isfinite(norm), "update has a non-finite norm")
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    clipped = {k: (np.asarray(v) * scale).astype(np.asarray(v).dtype, copy=False) for k, v in update.items()}
    return clipped, norm
