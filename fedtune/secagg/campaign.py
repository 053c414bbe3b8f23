"""SecAgg+ for a campaign: its quantization, neighbour degree and setup check, and the vector each contributor masks.

Job: what both the coordinator's secure round driver (``fedtune.strategies.secure``) and the contributor's stage
handlers (``fedtune.clients.secagg_client``) derive from the campaign, so a contributor never loads coordinator
code. The messages themselves are :mod:`fedtune.wire`'s; the protocol is :mod:`fedtune.secagg.protocol`'s.

Threat: the coordinator chooses the campaign, so :func:`check_setup` is what it refuses to run with; each
contributor applies its own minimum cohort on top (see the stage handlers).

Pitfalls: both sides must flatten tensors in the same order (sorted names, never record order); the
quantization must fit the update (see ``fedtune.strategies.secure`` on the clip range) and ``n · 2^bits``
must stay below 2^32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedtune.config import CampaignConfig, ConfigError

from .protocol import SecAggAbort, default_neighbours, default_threshold, effective_degree
from .quantize import QuantConfig, check_no_overflow, dequantize_sum


def quant_config(cfg: CampaignConfig) -> QuantConfig:
    """Clip range and bits of the campaign (``fedtune.strategies.secure``'s docstring says why this clip range)."""
    sec = cfg.secure_aggregation
    clip = sec.clip_range or cfg.privacy.update_clip_norm or 1.0
    return QuantConfig(clip=float(clip), bits=sec.bits)


def round_degree(cfg: CampaignConfig, cohort_size: int) -> tuple[int, int]:
    """(neighbours k, threshold t) for a cohort, applying the campaign's 0 = automatic defaults."""
    sec = cfg.secure_aggregation
    k = sec.neighbours or default_neighbours(cohort_size)
    return k, sec.threshold or default_threshold(effective_degree(cohort_size, k))


def check_setup(cfg: CampaignConfig) -> None:
    """Refuse, before any round, a secure-aggregation setup that cannot work for the campaign's cohort.

    Raises
    ------
    ConfigError
        When the cohort's sum could overflow 2^32, the threshold does not fit the neighbour graph, or the
        cohort is below the secure-aggregation minimum.
    """
    sec, n, src = cfg.secure_aggregation, cfg.federation.contributors_per_round, cfg.source_file or "<campaign>"
    if n < sec.min_cohort:
        raise ConfigError(
            src,
            "[federation] contributors_per_round",
            f"at least [secure_aggregation] min_cohort ({sec.min_cohort}) for secure aggregation",
            n,
        )
    try:
        check_no_overflow(n, sec.bits)
    except ValueError as exc:
        raise ConfigError(src, "[secure_aggregation] bits", f"no overflow of the 32-bit sum: {exc}", sec.bits) from None
    k, t = round_degree(cfg, n)
    degree = effective_degree(n, k)
    if not degree / 2 < t <= degree:
        raise ConfigError(
            src,
            "[secure_aggregation] threshold",
            f"a threshold t with {degree}/2 < t <= {degree} (the neighbour degree for a cohort of {n})",
            sec.threshold,
        )


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Tensors concatenated in sorted-name order (both sides agree without trusting record order)."""
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).reshape(-1) for k in sorted(arrays)])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten` with the shapes and dtypes of ``like``."""
    out, pos = {}, 0
    for name in sorted(like):
        ref = np.asarray(like[name])
        out[name] = vector[pos : pos + ref.size].reshape(ref.shape).astype(ref.dtype)
        pos += ref.size
    if pos != vector.size:
        raise ValueError(f"vector has {vector.size} values, tensors need {pos}")
    return out


def encode_update(
    start: Mapping[str, np.ndarray], end: Mapping[str, np.ndarray], weight_ratio: float, clip: float
) -> np.ndarray:
    """The float vector a contributor masks: ``[r · clip(end − start, ±c), r · c]``."""
    if not 0 < weight_ratio <= 1:
        raise ValueError(f"weight ratio must be in (0, 1], got {weight_ratio}")
    delta = np.clip(flatten(end) - flatten(start), -clip, clip)
    return np.append(weight_ratio * delta, weight_ratio * clip)


def decode_mean(total: np.ndarray, quant: QuantConfig, survivors: int) -> tuple[np.ndarray, float]:
    """Weighted mean update and ``Σ r_i`` from the unmasked sum of :func:`encode_update` vectors."""
    sums = dequantize_sum(total, quant, survivors)
    weight = float(sums[-1]) / quant.clip
    if weight <= 0:
        raise SecAggAbort(f"decoded total weight {weight:.3g} is not positive")
    return sums[:-1] / weight, weight
