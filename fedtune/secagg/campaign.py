"""SecAgg+ for a campaign: its quantization, neighbour degree and setup check, and the vector each contributor masks.

Job: what both the coordinator's secure round driver (``fedtune.strategies.secure``) and the contributor's stage
handlers (``fedtune.clients.secagg_client``) derive from the campaign, so a contributor never loads coordinator
code. The messages themselves are :mod:`fedtune.wire`'s; the protocol is :mod:`fedtune.secagg.protocol`'s.

Threat: the coordinator chooses the campaign, so :func:`check_setup` is what it refuses to run with, and
:func:`round_degree` sizes k and t with the contributors' default policy (:mod:`fedtune.secagg.sizing`) so that an
honest coordinator sends parameters they accept; each contributor checks them against its own policy anyway (see
the stage handlers). A contributor may upload an out-of-range input or weight: SecAgg+ hides who, so
:func:`decode_mean` refuses an aggregate whose sum, weight or mean is out of range, naming what is wrong.

Pitfalls: both sides must flatten tensors in the same order (sorted names, never record order); the
quantization must fit the update (see ``fedtune.strategies.secure`` on the clip range) and ``n · 2^bits``
must stay below 2^32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedtune.config import CampaignConfig, ConfigError

from .protocol import SecAggAbort
from .quantize import QuantConfig, check_no_overflow, dequantize_sum
from .sizing import SecAggPolicy, check_sizing, effective_degree, size_round, smallest_threshold


def quant_config(cfg: CampaignConfig) -> QuantConfig:
    """Clip range and bits of the campaign (``fedtune.strategies.secure``'s docstring says why this clip range)."""
    sec = cfg.secure_aggregation
    clip = sec.clip_range or cfg.privacy.update_clip_norm or 1.0
    return QuantConfig(clip=float(clip), bits=sec.bits)


def round_degree(cfg: CampaignConfig, cohort_size: int, policy: SecAggPolicy | None = None) -> tuple[int, int]:
    """(neighbours k, threshold t) for a cohort: the campaign's values, or 0 = sized for ``policy``.

    ``policy`` defaults to the contributors' default policy (σ = 40, γ = δ = 0.2), so an honest coordinator's
    rounds pass every contributor that keeps the defaults.
    """
    sec, policy = cfg.secure_aggregation, policy or SecAggPolicy()
    k, t = size_round(cohort_size, policy)
    if sec.neighbours:
        k = sec.neighbours
        degree = effective_degree(cohort_size, k)
        t = smallest_threshold(cohort_size, degree, policy) or degree // 2 + 1
    return k, sec.threshold or t


def check_setup(cfg: CampaignConfig) -> None:
    """Refuse, before any round, a secure-aggregation setup that cannot work for the campaign's cohort.

    Raises
    ------
    ConfigError
        When the cohort's sum could overflow 2^32, the threshold does not fit the neighbour graph, the cohort is
        below the secure-aggregation minimum, or contributors with the default policy would refuse k and t.
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
    refused = check_sizing(n, k, t, SecAggPolicy(min_cohort=sec.min_cohort))
    if refused is not None:
        key = "threshold" if sec.threshold else "neighbours"
        raise ConfigError(
            src,
            f"[secure_aggregation] {key}",
            f"values contributors with the default policy accept (0 = sized for them); they would refuse: {refused}",
            sec.threshold or sec.neighbours,
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


def decode_mean(
    total: np.ndarray, quant: QuantConfig, survivors: int, expected_weight: float | None = None
) -> tuple[np.ndarray, float]:
    """Weighted mean update and ``Σ r_i`` from the unmasked sum of :func:`encode_update` vectors, range-checked.

    Every honest encoding has each code in ``[0, 2^bits − 1]`` and ``r_i ∈ (0, 1]``, so the sum of ``survivors``
    of them has every code sum at most ``survivors · (2^bits − 1)``, a weight ``Σ r_i`` in ``(0, survivors]`` and a
    mean within the clip range (up to the rounding bound). ``expected_weight`` (``Σ r_i`` from the weights the
    server assigned) must match the decoded weight within rounding.

    Raises
    ------
    SecAggAbort
        When the aggregate is out of range (some survivor's input or weight was); the message names the check
        and the coordinate. SecAgg+ hides which survivor it was.
    """
    n, levels = survivors, quant.levels
    over = np.flatnonzero(np.asarray(total, dtype=np.uint64) > n * levels)
    if over.size:
        i = int(over[0])
        what = "the weight coordinate" if i == total.size - 1 else f"coordinate {i}"
        raise SecAggAbort(
            f"aggregate out of range: {what} of the unmasked sum is {int(total[i])} > {n} x {levels} "
            f"({over.size} coordinates): a survivor's masked input was out of range; not applied"
        )
    sums = dequantize_sum(total, quant, n)
    weight = float(sums[-1]) / quant.clip
    slack = n * 2.0 / levels  # one rounding step per survivor, in units of r
    if not 0 < weight <= n + 1e-9:
        raise SecAggAbort(f"decoded total weight {weight:.6g} is outside (0, {n}] for {n} survivors; not applied")
    if expected_weight is not None and abs(weight - expected_weight) > slack + 1e-9:
        raise SecAggAbort(
            f"decoded total weight {weight:.6g} differs from the {expected_weight:.6g} the server assigned to the "
            f"{n} survivors (rounding allows {slack:.2g}): a survivor's weight coordinate is wrong; not applied"
        )
    mean = sums[:-1] / weight
    bound = quant.clip + 2.0 * n * quant.mean_error_bound / weight
    worst = int(np.argmax(np.abs(mean))) if mean.size else 0
    if mean.size and abs(mean[worst]) > bound:
        raise SecAggAbort(
            f"decoded mean out of range: coordinate {worst} is {mean[worst]:.6g}, beyond the clip range "
            f"±{quant.clip:g} (+{bound - quant.clip:.2g} rounding); not applied"
        )
    return mean, weight
