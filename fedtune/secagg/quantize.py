"""Fixed-point encoding of float updates into Z_{2^32} for masking.

Each coordinate is clipped to [-c, c], shifted to [0, 2c] and stochastically rounded onto the
grid {0, ..., 2^bits - 1}, so the encoding is unbiased. Sums of n encodings stay below 2^32 as
long as n * 2^bits < 2^32, which makes the modular sum equal to the integer sum and lets the
server decode the mean exactly up to rounding noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "QuantConfig",
    "check_no_overflow",
    "dequantize_mean",
    "dequantize_sum",
    "max_bits",
    "quantize",
]

_MOD_BITS = 32
_CHUNK = 1 << 16  # elements per step of quantize(): float64 temporaries stay in L2 cache


@dataclass(frozen=True)
class QuantConfig:
    """Quantization parameters shared by all clients of a round.

    Parameters
    ----------
    clip : float
        Clip range c; pick about 10x the update's std (8.0, Flower's default, is coarse for LoRA).
    bits : int
        Bits per coordinate before summation, 1..31.
    """

    clip: float = 8.0
    bits: int = 16

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError("clip must be a positive finite float")
        if not 1 <= self.bits < _MOD_BITS:
            raise ValueError(f"bits must be in [1, {_MOD_BITS - 1}]")

    @property
    def levels(self) -> int:
        """Largest code value, 2^bits - 1."""
        return (1 << self.bits) - 1

    @property
    def scale(self) -> float:
        """Codes per unit of the clipped value."""
        return self.levels / (2.0 * self.clip)

    @property
    def mean_error_bound(self) -> float:
        """Worst-case per-coordinate error of the decoded mean (one grid step)."""
        return 1.0 / self.scale


def check_no_overflow(cohort_size: int, bits: int) -> None:
    """Refuse configurations whose sum could wrap around 2^32 and silently corrupt the mean."""
    if cohort_size < 1:
        raise ValueError("cohort_size must be positive")
    if cohort_size * (1 << bits) >= 1 << _MOD_BITS:
        raise ValueError(
            f"overflow: cohort of {cohort_size} x 2^{bits} >= 2^32; use at most {max_bits(cohort_size)} bits"
        )


def max_bits(cohort_size: int) -> int:
    """Largest ``bits`` that :func:`check_no_overflow` accepts for ``cohort_size`` clients."""
    return min(_MOD_BITS - 1, _MOD_BITS - cohort_size.bit_length())


def quantize(x: np.ndarray, cfg: QuantConfig, rng: np.random.Generator) -> np.ndarray:
    """Encode a float vector as uint32 codes in [0, 2^bits - 1] with unbiased stochastic rounding.

    Computation is in float64 (exact for codes above 2^24) over cache-sized chunks, which is
    several times faster on 10M-parameter updates than whole-array temporaries; the random stream
    is consumed in order, so the result does not depend on the chunk size.
    """
    flat = np.asarray(x).reshape(-1)
    out = np.empty(flat.size, dtype=np.uint32)
    for start in range(0, flat.size, _CHUNK):
        y = np.clip(flat[start : start + _CHUNK].astype(np.float64), -cfg.clip, cfg.clip)
        y += cfg.clip
        y *= cfg.scale
        floor = np.floor(y)
        y -= floor
        floor += rng.random(y.shape) < y
        np.minimum(floor, cfg.levels, out=floor)
        out[start : start + _CHUNK] = floor
    return out


def dequantize_sum(total: np.ndarray, cfg: QuantConfig, count: int) -> np.ndarray:
    """Decode the uint32 sum of ``count`` encodings into the float64 sum of clipped inputs."""
    return np.asarray(total, dtype=np.float64) / cfg.scale - count * cfg.clip


def dequantize_mean(total: np.ndarray, cfg: QuantConfig, count: int, total_weight: float | None = None) -> np.ndarray:
    """Decode a secure sum into a mean.

    Parameters
    ----------
    total : np.ndarray
        uint32 sum (mod 2^32) of the survivors' encodings, as returned by the server.
    cfg : QuantConfig
        The round's quantization parameters.
    count : int
        Number of survivors whose encodings are in ``total`` (removes the per-client offset c).
    total_weight : float, optional
        Divisor when clients uploaded already-weighted updates; defaults to ``count``.
    """
    divisor = float(count if total_weight is None else total_weight)
    if divisor <= 0:
        raise ValueError("cannot average over zero weight")
    return dequantize_sum(total, cfg, count) / divisor
