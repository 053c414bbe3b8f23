"""What an aggregate of LoRA adapters means: the effective weight updates ΔW = scale · B·A.

Flower's FedAvg averages each tensor on its own. With FFA-LoRA every contributor shares the frozen A,
so mean(B)·A = mean(B·A) exactly. In plain LoRA mode both factors are averaged separately and
mean(B)·mean(A) ≠ mean(B·A); :func:`relative_error` measures by how much.
"""

from __future__ import annotations

import numpy as np


def effective_updates(
    arrays: dict[str, np.ndarray], frozen: dict[str, np.ndarray] | None = None, scale: float = 1.0
) -> dict[str, np.ndarray]:
    """ΔW per adapted module from a dict of ``…lora_A…``/``…lora_B…`` tensors.

    ``frozen`` supplies the A matrices that do not travel (FFA mode).
    """
    tensors = {**(frozen or {}), **arrays}
    out = {}
    for name, b in tensors.items():
        if ".lora_B." not in name:
            continue
        a = tensors[name.replace(".lora_B.", ".lora_A.")]
        out[name.split(".lora_B.")[0]] = scale * (b.astype(np.float64) @ a.astype(np.float64))
    return out


def weighted_mean(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    total = float(sum(weights))
    return {k: sum(w * u[k] for u, w in zip(updates, weights, strict=True)) / total for k in updates[0]}


def relative_error(approx: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> float:
    """‖approx − exact‖ / ‖exact‖ over all modules together (Frobenius)."""
    num = sum(float(np.sum((approx[k] - exact[k]) ** 2)) for k in exact)
    den = sum(float(np.sum(exact[k] ** 2)) for k in exact)
    return float(np.sqrt(num / den))
