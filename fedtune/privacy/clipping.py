"""Update clipping: bound how far one contributor's round can move the shared adapter.

Job: :func:`clip_update` scales a round's update (after − before, per parameter) to a global L2 norm of at
most ``bound``, after local training and before quantization and masking.

Threat: a contributor may cheat; with secure aggregation nobody sees its update, so its influence on the
sum is bounded on the contributor by this clip, which also fixes the range secure aggregation quantizes.

Pitfalls: this is not the record-level guarantee (that comes from DP-SGD, :mod:`fedtune.privacy.dpsgd`);
a non-finite update is refused rather than silently scaled to NaN; dtypes and shapes are kept, so the
clipped update quantizes exactly like the unclipped one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .params import require


def clip_update(update: Mapping[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale a round's update so its global L2 norm is at most ``bound``.

    Parameters
    ----------
    update
        Per-parameter difference after − before.
    bound
        The L2 bound (> 0).

    Returns
    -------
    (clipped, norm_before)
        New arrays (same keys, dtypes and shapes) and the update's norm before clipping.
    """
    require(bound > 0, "bound must be > 0")
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))
    require(math.isfinite(norm), "update has a non-finite norm")
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    clipped = {k: (np.asarray(v) * scale).astype(np.asarray(v).dtype, copy=False) for k, v in update.items()}
    return clipped, norm
