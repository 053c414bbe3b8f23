"""A contributor's lifetime privacy accounting: calibrate once, persist Opacus' accountant, refuse overspending.

Job: :class:`ContributorPrivacy` computes the noise multiplier once, for the contributor's whole planned
participation; keeps the composition of every DP-SGD step it took in an Opacus accountant
(``opacus.accountants.create_accountant``) whose own ``state_dict()`` is persisted in the contributor's state
dir and restored with ``load_state_dict()`` before every round; answers ε queries; and says whether a round
fits the budget.

Threat: the coordinator may ask for any number of rounds and steps. The budget is checked on the contributor,
against the state on its own disk, before it trains; a round that would pass it is declined.

Pitfalls:

- calling Opacus' ``make_private_with_epsilon`` each round silently restarts the budget: the noise multiplier
  and δ are fixed at calibration and stored, never recomputed;
- the state on disk, not an object kept in memory, is the source of truth across restarts and simulation
  workers: build with :meth:`ContributorPrivacy.load` every round, :meth:`~ContributorPrivacy.save` before the
  update leaves the machine;
- steps taken without noise (``mechanism = "none"``) have no finite ε, and stay in the history so a campaign
  that turns DP on later cannot pretend they did not happen;
- the PRV accountant costs tens of milliseconds per ε query, so answers are cached per accountant state;
- the PRV accountant's grid grows with ε and the horizon (about 1 GB per million points; ε = 1000 over 160 steps
  did not fit in 11 GB), and the coordinator chooses both: calibration refuses a grid past
  :data:`PRV_MAX_GRID_POINTS` (:func:`prv_grid_points`) before building it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.files import atomic_write_text

from .params import AccountantKind, PrivacyParams, require, resolve_delta, sample_rate_for

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

logger = logging.getLogger(__name__)

STATE_FILE = "privacy_state.json"
SUMMARY_FILE = "privacy.json"
_STATE_FORMAT = 1
_ALPHA_WARNING = "Optimal order is the"  # largest or smallest α: the bound is still valid, only looser


class PrivacyBudgetExceeded(RuntimeError):
    """Raised when training would take a contributor past its ε budget."""


PRV_MAX_GRID_POINTS = 4_000_000
"""The largest discretisation of the PRV accountant a calibration may build. Opacus sizes the grid from ε, δ and the
horizon; measured peaks (q = 16/600, 160 steps, δ = 1e-5): ε = 64, 0.77M points, 1.1 GB; ε = 256, 2.8M points, 2.9 GB
(39 s); ε = 1000, 8.9M points, past 11 GB. Without a bound, a campaign's ε (chosen by the coordinator) could exhaust a
contributor's memory. Larger ε or horizons can use the RDP accountant, whose cost does not grow with them."""


def prv_grid_points(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Points in the grid Opacus' PRV accountant builds for an ε query at ``delta`` on this history (its own
    formula: a domain as wide as the RDP bound, a mesh that shrinks with √steps), computed without building it."""
    import numpy as np
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
    from opacus.accountants.analysis.prv.domain import compute_safe_domain_size

    eps_error, delta_error = 0.01, delta / 1000  # Opacus' PRVAccountant.get_epsilon defaults
    prv = PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ALPHA_WARNING)
        half_width = compute_safe_domain_size([prv], [steps], eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / np.sqrt(steps * np.log(12 / delta_error) / 2)
    return float(2 * half_width / mesh)


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: AccountantKind
) -> float:
    """Noise multiplier that spends exactly ``target_epsilon`` (within 0.01) after ``steps`` steps.

    Done once per contributor for its whole planned participation, never per round.

    Parameters
    ----------
    target_epsilon, delta
        The guarantee to reach at the end of the horizon.
    sample_rate
        Poisson sampling rate of every step.
    steps
        The horizon: local steps × planned rounds.
    accountant
        ``"prv"`` or ``"rdp"``.

    Returns
    -------
    float
        The noise multiplier σ (noise std = σ × max_grad_norm).
    """
    from opacus.accountants.utils import get_noise_multiplier

    def sigma(kind: AccountantKind) -> float:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ALPHA_WARNING)
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=kind,
                )
            )

    try:
        if accountant == "prv":  # RDP is looser, so its σ is an upper bound on PRV's: the grid at it, a lower bound
            points = prv_grid_points(sigma("rdp"), sample_rate, steps, delta)
            if points > PRV_MAX_GRID_POINTS:
                raise ValueError(
                    f"the PRV accountant would need a grid of {points / 1e6:.0f}M points (about "
                    f'{points / 1e6:.0f} GB; at most {PRV_MAX_GRID_POINTS / 1e6:.0f}M): use accountant = "rdp", '
                    "or a smaller ε or horizon"
                )
        return sigma(accountant)
    except ValueError as exc:
        raise ValueError(
            f"cannot reach ε={target_epsilon}, δ={delta:g} with q={sample_rate:g} over {steps} steps: {exc}"
        ) from exc


def new_accountant(kind: AccountantKind) -> IAccountant:
    """An empty Opacus accountant (``create_accountant``); Opacus is imported only when privacy is used."""
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=kind)


def restore_accountant(state: Mapping[str, Any], kind: AccountantKind) -> IAccountant:
    """An Opacus accountant of ``kind`` loaded from a saved ``state_dict()``.

    PRV and RDP keep the same history (noise multiplier, sample rate, steps), so a state kept by one is
    re-evaluated by the other when the campaign changes accountant, rather than refused or restarted.
    """
    if state.get("mechanism") != kind:
        logger.warning(
            "privacy state was kept with the %s accountant; re-evaluating its history with %s",
            state.get("mechanism"),
            kind,
        )
        state = {**state, "mechanism": kind}
    accountant = new_accountant(kind)
    accountant.load_state_dict(dict(state))
    return accountant


def _steps_in(accountant: IAccountant) -> int:
    return sum(int(steps) for *_, steps in accountant.history)


def _step(accountant: IAccountant, noise_multiplier: float, sample_rate: float, steps: int) -> None:
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)


def epsilon_of(accountant: IAccountant, delta: float) -> float:
    """ε of everything ``accountant`` recorded, at ``delta``; ``inf`` once a step was taken without noise."""
    if _steps_in(accountant) == 0:
        return 0.0
    if any(noise <= 0 for noise, _, steps in accountant.history if steps > 0):
        return math.inf
    return _cached_epsilon(json.dumps(accountant.state_dict(), sort_keys=True), delta)


@functools.lru_cache(maxsize=256)
def _cached_epsilon(state: str, delta: float) -> float:
    saved = json.loads(state)
    accountant = new_accountant(saved["mechanism"])
    accountant.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ALPHA_WARNING)
        return float(accountant.get_epsilon(delta=delta))


def _atomic_write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


@dataclass
class ContributorPrivacy:
    """A contributor's lifetime DP-SGD accounting: calibration, Opacus accountant, budget, persistence.

    Build it with :meth:`load` (which calibrates on first use); the constructor is the raw state holder.
    ``noise_multiplier`` and ``delta`` are fixed at calibration and never change afterwards, so the ε
    reported is always for one consistent guarantee; ``sample_rate`` follows the current shard and batch
    size (a heterogeneous history is fine for both accountants). ``accountant`` is Opacus' own, of the
    kind ``params.accountant`` names.
    """

    params: PrivacyParams
    noise_multiplier: float
    delta: float
    sample_rate: float
    calibration: dict[str, Any]
    accountant: IAccountant
    rounds: int = 0
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        require(
            self.accountant.mechanism() == self.params.accountant,
            f"accountant is {self.accountant.mechanism()!r}, params say {self.params.accountant!r}",
        )

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

        Nothing is written until :meth:`save`. Once calibrated, the noise multiplier and δ stay as stored;
        a changed ``target_epsilon`` or ``personal_max_epsilon`` only moves the budget, and a changed shard
        or batch size only the sample rate of future steps.

        Parameters
        ----------
        state_dir
            The contributor's own state folder (``privacy_state.json`` lives there).
        params
            This round's privacy parameters, already bounded by the contributor's own cap.
        shard_size, batch_size
            Set the Poisson sampling rate ``batch_size / shard_size``.
        local_steps
            Steps per round; with ``params.planned_rounds`` the calibration horizon.

        Returns
        -------
        ContributorPrivacy
            The state to check, train under, and save.
        """
        state_dir = Path(state_dir)
        sample_rate = sample_rate_for(batch_size, shard_size)
        state_path = state_dir / STATE_FILE
        if state_path.exists():
            state = json.loads(state_path.read_text(encoding="utf-8"))
            require(state.get("format") == _STATE_FORMAT, f"{state_path}: unsupported format {state.get('format')}")
            if state["mechanism"] != params.mechanism:
                logger.warning("privacy mechanism changed from %s to %s", state["mechanism"], params.mechanism)
            if params.target_delta is not None and params.target_delta != state["delta"]:
                logger.warning("keeping δ=%g from calibration, not %g", state["delta"], params.target_delta)
            return cls(
                params=params,
                noise_multiplier=float(state["noise_multiplier"]),
                delta=float(state["delta"]),
                sample_rate=sample_rate,
                calibration=dict(state["calibration"]),
                accountant=restore_accountant(state["accountant"], params.accountant),
                rounds=int(state["rounds"]),
                state_dir=state_dir,
            )
        delta = resolve_delta(params.target_delta)
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
        accountant = new_accountant(params.accountant)
        return cls(params, noise, delta, sample_rate, calibration, accountant, state_dir=state_dir)

    def save(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        """Persist the accountant's ``state_dict()`` (``privacy_state.json``) and a summary (``privacy.json``)."""
        target = Path(state_dir) if state_dir is not None else self.state_dir
        if target is None:
            raise ValueError("no state_dir: pass one to save() or build with load()")
        state = {
            "format": _STATE_FORMAT,
            "mechanism": self.params.mechanism,
            "accountant": dict(self.accountant.state_dict()),
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
        return _steps_in(self.accountant)

    @property
    def budget(self) -> float:
        """The ε this contributor may spend (see :attr:`PrivacyParams.budget`)."""
        return self.params.budget

    def epsilon_spent(self) -> float:
        """ε spent so far at this contributor's δ (``inf`` when training without DP)."""
        return self.epsilon_after(0)

    def epsilon_after(self, extra_steps: int) -> float:
        """ε the contributor would have spent after ``extra_steps`` more steps at the current sample rate."""
        require(extra_steps >= 0, "extra_steps must be >= 0")
        if not self.params.private:
            return math.inf if self.steps + extra_steps > 0 else 0.0
        ahead = restore_accountant(self.accountant.state_dict(), self.params.accountant)
        _step(ahead, self.noise_multiplier, self.sample_rate, extra_steps)
        return epsilon_of(ahead, self.delta)

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
        """Step the accountant by the steps actually taken this round (without DP: steps with no noise)."""
        require(steps >= 0, "steps must be >= 0")
        if steps == 0:
            return
        noise = self.noise_multiplier if self.params.private else 0.0
        _step(self.accountant, noise, self.sample_rate, steps)
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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
