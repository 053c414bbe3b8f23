"""Stable contributor identities for the credit ledger.

Credit must follow a contributor across rounds, reconnects and coordinator restarts, and must not be
claimable by someone else. In deployment the id is therefore the fingerprint of the contributor's long-term
public key (the key that signs its secure-aggregation keys): the first 16 bytes of SHA-256 over the raw key
bytes, as 32 hex characters. Display name and team are free text chosen by the contributor and carry no
authority. In simulation there is no key, so each virtual contributor gets an id derived deterministically
from the campaign name and its partition id: re-running a campaign credits the same virtual contributors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

ID_BYTES = 16
"""Bytes of SHA-256 kept in a contributor id (128 bits: collision-free for any realistic community)."""

_SIM_DOMAIN = b"fedtune/simulated-contributor/v1\x00"

PublicKey = ed25519.Ed25519PublicKey | x25519.X25519PublicKey


@dataclass(frozen=True)
class Identity:
    """Who a contributor is to the ledger: a stable ``id``, a display ``name`` and an optional ``team``."""

    id: str
    name: str
    team: str | None = None


def public_key_bytes(key: bytes | PublicKey) -> bytes:
    """Raw bytes of a public key: 32-byte Ed25519/X25519 keys as-is, key objects encoded raw."""
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key)
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def contributor_id(public_key: bytes | PublicKey) -> str:
    """Fingerprint of a long-term public key: hex of the first 16 bytes of SHA-256 over its raw bytes."""
    raw = public_key_bytes(public_key)
    if not raw:
        raise ValueError("empty public key")
    return hashlib.sha256(raw).digest()[:ID_BYTES].hex()


def simulated_contributor_id(campaign: str, partition_id: int) -> str:
    """Deterministic id of virtual contributor ``partition_id`` in ``campaign`` (same shape as a real id)."""
    if partition_id < 0:
        raise ValueError(f"partition_id must be >= 0, got {partition_id}")
    material = _SIM_DOMAIN + campaign.encode("utf-8") + b"\x00" + str(int(partition_id)).encode("ascii")
    return hashlib.sha256(material).digest()[:ID_BYTES].hex()


def simulated_identity(campaign: str, partition_id: int, team: str | None = None) -> Identity:
    """Identity of a virtual contributor: derived id, name ``sim-<partition>``."""
    return Identity(simulated_contributor_id(campaign, partition_id), f"sim-{partition_id:03d}", team)
