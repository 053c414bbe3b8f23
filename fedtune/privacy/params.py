"""The privacy parameters of a round: what the campaign asks for, bounded by the contributor's own cap.

Job: validate the ``[privacy]`` section into :class:`PrivacyParams`, and derive the two numbers the accounting
rests on, δ (:data:`DEFAULT_DELTA` unless the campaign names one) and the Poisson sampling rate
(:func:`sample_rate_for`).

Threat: the coordinator sends the campaign config, so it chooses these values. Nothing here trusts them further
than the contributor does: the budget actually spent is the stricter of the campaign's target and the
contributor's own cap (its policy, :mod:`fedtune.clients.policy`), and unknown or out-of-range values are
refused, not defaulted.

Pitfalls:

- δ must stay well below ``1/n``: a mechanism that publishes one random record is (0, 1/n)-DP. δ used to be
  derived from the shard size (``1/(10 n)``), which put ``n`` in every reported (ε, δ); it is now a public
  value (the campaign's, or :data:`DEFAULT_DELTA`) and the contributor checks ``δ ≤ 1/(10 n)`` itself
  (:func:`delta_fits`);
- the sampling rate is ``batch_size / n``, what the accountant assumes, not ``1 / len(loader)`` (what Opacus'
  ``PrivacyEngine`` derives), which differs unless the batch size divides ``n``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Mechanism = Literal["dp-sgd", "none"]
AccountantKind = Literal["prv", "rdp"]
GradSampleMode = Literal["hooks", "ghost"]


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` holds (a one-line, actionable refusal)."""
    if not condition:
        raise ValueError(message)


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
        δ; ``None`` means :data:`DEFAULT_DELTA` (public, never derived from the shard).
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
        Optional L2 bound on the round's update (see :func:`fedtune.privacy.clip_update`); ``None`` disables it.
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
        require(
            self.mechanism in ("dp-sgd", "none"),
            f"mechanism must be 'dp-sgd' or 'none', not {self.mechanism!r}",
        )
        require(self.accountant in ("prv", "rdp"), f"accountant must be 'prv' or 'rdp', not {self.accountant!r}")
        require(
            self.grad_sample_mode in ("hooks", "ghost"),
            f"grad_sample_mode must be 'hooks' or 'ghost', not {self.grad_sample_mode!r}",
        )
        require(self.target_epsilon > 0, "target_epsilon must be > 0")
        require(self.target_delta is None or 0 < self.target_delta < 1, "target_delta must be in (0, 1)")
        require(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        require(self.planned_rounds >= 1, "planned_rounds must be >= 1")
        require(self.update_clip_norm is None or self.update_clip_norm > 0, "update_clip_norm must be > 0")
        require(
            self.personal_max_epsilon is None or self.personal_max_epsilon > 0,
            "personal_max_epsilon must be > 0",
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PrivacyParams:
        """Build from a config mapping (e.g. ``dataclasses.asdict(campaign.privacy)``); unknown keys raise."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        require(not unknown, f"unknown [privacy] keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def from_campaign(
        cls, section: Any, *, campaign_rounds: int, personal_max_epsilon: float | None = None
    ) -> PrivacyParams:
        """Build from the campaign's ``[privacy]`` section (``fedtune.config.PrivacySection``).

        The section writes "derive it" as 0: ``delta = 0`` means :data:`DEFAULT_DELTA`, ``planned_rounds = 0``
        the campaign's rounds, ``update_clip_norm = 0`` no update clipping. Its ``personal_max_epsilon`` is a
        per-partition table that only the simulation launcher reads (it writes it into the virtual contributors'
        policies); the contributor's own cap is passed in separately.
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
        """Whether local training is DP-SGD (``mechanism = "dp-sgd"``)."""
        return self.mechanism == "dp-sgd"

    @property
    def budget(self) -> float:
        """The ε this contributor may spend: the stricter of the campaign target and its own cap."""
        if self.personal_max_epsilon is None:
            return self.target_epsilon
        return min(self.target_epsilon, self.personal_max_epsilon)


DEFAULT_DELTA = 1e-5
"""δ when the campaign leaves it to fedtune (``delta = 0``): public, the same for every contributor."""


def resolve_delta(target_delta: float | None) -> float:
    """The δ a contributor calibrates and reports at: the campaign's, else :data:`DEFAULT_DELTA`."""
    return DEFAULT_DELTA if target_delta is None else target_delta


def delta_fits(delta: float, shard_size: int) -> bool:
    """Whether δ ≤ 1/(10 n): δ must stay well below 1/n, or publishing one random record would satisfy it.

    Parameters
    ----------
    delta
        The δ the guarantee is stated at.
    shard_size
        Number of records ``n`` in the contributor's shard.
    """
    require(shard_size >= 1, "shard_size must be >= 1")
    return delta * 10 * shard_size <= 1.0


def sample_rate_for(batch_size: int, shard_size: int) -> float:
    """Poisson sampling rate q = batch_size / shard_size (capped at 1): expected batch = ``batch_size``.

    Parameters
    ----------
    batch_size
        The campaign's (expected) batch size.
    shard_size
        Number of records in the contributor's shard.

    Returns
    -------
    float
        The probability with which each record joins each batch.
    """
    require(batch_size >= 1 and shard_size >= 1, "batch_size and shard_size must be >= 1")
    return min(1.0, batch_size / shard_size)
