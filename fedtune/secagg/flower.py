"""SecAgg+ on Flower's Message API: the wire format and campaign settings both sides share.

The coordinator's workflow (``fedtune.strategies.secure``) and the contributor's stage handlers
(``fedtune.clients.secagg_client``) both import from here, so a contributor never loads coordinator code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict

from fedtune.config import CampaignConfig, ConfigError

from .protocol import STAGES, SecAggAbort, default_neighbours, default_threshold, effective_degree
from .quantize import QuantConfig, check_no_overflow, dequantize_sum

ADVERTISE, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK = STAGES
SECAGG_RECORD = "secagg"  # ConfigRecord: the protocol message's scalar and list fields
SECAGG_ARRAYS = "secagg-arrays"  # ArrayRecord: its numpy fields (the masked uint32 upload)


def message_type(stage: str) -> str:
    """Flower message type of a stage; the ClientApp registers ``@app.train("secagg_<stage>")``."""
    return f"{MessageType.TRAIN}.secagg_{stage}"


def quant_config(cfg: CampaignConfig) -> QuantConfig:
    """Clip range and bits of the campaign (see the module docstring for why this clip range)."""
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


def to_content(msg: Mapping[str, Any]) -> RecordDict:
    """A protocol message as Flower records: numpy fields in an ArrayRecord, the rest in a ConfigRecord."""
    arrays = {k: v for k, v in msg.items() if isinstance(v, np.ndarray)}
    content = RecordDict({SECAGG_RECORD: ConfigRecord({k: v for k, v in msg.items() if k not in arrays})})
    if arrays:
        content[SECAGG_ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return content


def from_content(content: RecordDict) -> dict[str, Any]:
    """Inverse of :func:`to_content`."""
    msg = dict(content[SECAGG_RECORD])
    if SECAGG_ARRAYS in content.array_records:
        msg.update({k: a.numpy() for k, a in content[SECAGG_ARRAYS].items()})
    return msg
