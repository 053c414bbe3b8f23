"""Shamir secret sharing of 32-byte secrets over the Mersenne prime field GF(2^521 - 1).

A 256-bit secret fits in one field element, so one share is one element (66 bytes) and there is
no chunking or padding. Evaluation points are small positive integers chosen by the caller (the
protocol uses a client's 1-based position in the cohort).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

__all__ = ["PRIME", "SECRET_BYTES", "SHARE_BYTES", "combine", "split"]

PRIME = (1 << 521) - 1
"""Field modulus; a prime larger than any 256-bit secret."""

SECRET_BYTES = 32
SHARE_BYTES = (PRIME.bit_length() + 7) // 8


def _check_points(points: Iterable[int]) -> list[int]:
    xs = list(points)
    if len(set(xs)) != len(xs):
        raise ValueError("share evaluation points must be distinct")
    if any(not 0 < x < PRIME for x in xs):
        raise ValueError("share evaluation points must lie in [1, p)")
    return xs


def split(secret: bytes, threshold: int, points: Iterable[int]) -> dict[int, bytes]:
    """Split ``secret`` so that any ``threshold`` of the returned shares recover it.

    Parameters
    ----------
    secret : bytes
        Exactly 32 bytes (a mask seed or a raw X25519 private key).
    threshold : int
        Number of shares needed; fewer reveal nothing about the secret.
    points : iterable of int
        Distinct non-zero evaluation points, one per share holder.

    Returns
    -------
    dict
        Evaluation point -> share (big-endian field element of ``SHARE_BYTES`` bytes).
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes")
    xs = _check_points(points)
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares[x] = acc.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares by Lagrange interpolation at 0.

    Only the first ``threshold`` shares (by evaluation point) are used. Raises ``ValueError``
    when too few shares are given or the interpolated value is not a 256-bit secret (a sign of
    corrupted shares).
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    xs = _check_points(sorted(shares)[:threshold])
    ys = []
    for x in xs:
        if len(shares[x]) != SHARE_BYTES:
            raise ValueError("malformed share")
        ys.append(int.from_bytes(shares[x], "big"))
    secret = 0
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent: reconstructed value is not a 256-bit secret")
    return secret.to_bytes(SECRET_BYTES, "big")
