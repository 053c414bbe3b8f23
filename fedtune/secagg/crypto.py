"""Cryptographic primitives for SecAgg+, all taken from the ``cryptography`` package.

Nothing here is a home-made cipher: key agreement is X25519 followed by HKDF-SHA256, mask
streams are the ChaCha20 keystream (the encryption of zeros) keyed by the full 256-bit secret,
shares travel under ChaCha20-Poly1305 with associated data naming campaign, round, sender and
receiver, and ephemeral public keys are signed with each client's long-term Ed25519 identity.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

__all__ = [
    "KEY_BYTES",
    "SecAggCryptoError",
    "SecAggError",
    "X25519KeyPair",
    "add_mask_into",
    "aead_decrypt",
    "aead_encrypt",
    "agree",
    "associated_data",
    "generate_identity",
    "identity_public_bytes",
    "mask_stream",
    "sign",
    "verify",
]

KEY_BYTES = 32
"""Length of every symmetric secret (mask seeds, pairwise keys, AEAD keys)."""

_NONCE_BYTES = 12
_STREAM_NONCE = bytes(16)  # counter 0 + zero nonce: every stream key is used for exactly one stream
_CHUNK_WORDS = 1 << 16  # 256 KiB of keystream per step keeps the add cache-resident


class SecAggError(ValueError):
    """Base class of every secure-aggregation failure (a ``ValueError`` for callers that validate)."""


class SecAggCryptoError(SecAggError):
    """A signature, tag or key failed verification: the message must be dropped."""


class X25519KeyPair:
    """An ephemeral X25519 key pair with its raw 32-byte public key.

    Parameters
    ----------
    private : X25519PrivateKey, optional
        Existing private key; a fresh one is generated when omitted.
    """

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self.private = private if private is not None else X25519PrivateKey.generate()
        self.public_bytes = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def private_bytes(self) -> bytes:
        """Raw 32-byte private key, the form that is Shamir-shared for dropout recovery."""
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> X25519KeyPair:
        """Rebuild a key pair from a reconstructed raw private key."""
        return cls(X25519PrivateKey.from_private_bytes(raw))


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """Derive a 256-bit key shared with a peer.

    The raw X25519 output is not uniformly random, so it goes through HKDF-SHA256; ``info``
    separates purposes (mask key vs. share-encryption key) and binds campaign and round.
    """
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        shared = private.exchange(peer)
    except ValueError as exc:  # wrong length or low-order point
        raise SecAggCryptoError(f"invalid X25519 public key: {exc}") from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"mask keys must be {KEY_BYTES} bytes, got {len(key)}")


def add_mask_into(acc: np.ndarray, key: bytes, sign: int = 1) -> None:
    """Add (``sign=1``) or subtract (``sign=-1``) the mask stream of ``key`` into ``acc`` mod 2^32.

    The keystream is produced chunk by chunk into one reused buffer so that a 10M-word mask never
    allocates a second 40 MB array; uint32 wrap-around gives the modular arithmetic for free.
    """
    _check_key(key)
    if acc.dtype != np.uint32 or acc.ndim != 1:
        raise TypeError("accumulator must be a 1-D uint32 array")
    if sign not in (1, -1):
        raise ValueError("sign must be +1 or -1")
    encryptor = Cipher(algorithms.ChaCha20(key, _STREAM_NONCE), mode=None).encryptor()
    chunk = min(_CHUNK_WORDS, acc.size)
    zeros = memoryview(bytes(4 * chunk))
    buf = bytearray(4 * chunk + 63)
    words = np.frombuffer(buf, dtype=np.uint8)[: 4 * chunk].view(np.uint32)
    op = np.add if sign == 1 else np.subtract
    for start in range(0, acc.size, chunk):
        stop = min(acc.size, start + chunk)
        n = stop - start
        encryptor.update_into(zeros[: 4 * n], buf)
        view = acc[start:stop]
        op(view, words[:n], out=view)


def mask_stream(key: bytes, length: int) -> np.ndarray:
    """Return the ``length``-word uint32 mask stream of ``key`` (uniform over Z_{2^32})."""
    out = np.zeros(length, dtype=np.uint32)
    if length:
        add_mask_into(out, key)
    return out


def associated_data(campaign_id: str, round_id: int, sender: int, receiver: int, label: bytes) -> bytes:
    """Canonical AEAD associated data; binding all four fields stops replay and reflection."""
    campaign = campaign_id.encode()
    return b"".join(
        [label, struct.pack(">I", len(campaign)), campaign, struct.pack(">QQQ", round_id, sender, receiver)]
    )


def aead_encrypt(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext``; the random nonce is prepended to the ciphertext."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def aead_decrypt(key: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Decrypt a ciphertext of :func:`aead_encrypt`, raising if it or its context was altered."""
    if len(ciphertext) < _NONCE_BYTES + 16:
        raise SecAggCryptoError("ciphertext too short")
    try:
        return ChaCha20Poly1305(key).decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], ad)
    except InvalidTag as exc:
        raise SecAggCryptoError("share ciphertext failed authentication") from exc


def generate_identity() -> tuple[Ed25519PrivateKey, bytes]:
    """Create a long-term Ed25519 identity key and its raw public key for the registry."""
    key = Ed25519PrivateKey.generate()
    return key, identity_public_bytes(key)


def identity_public_bytes(key: Ed25519PrivateKey) -> bytes:
    """Raw 32-byte public key of an identity key, the form stored in the registry."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Sign ``message`` with a long-term identity key."""
    return key.sign(message)


def verify(identity_public: bytes, signature: bytes, message: bytes) -> None:
    """Check an identity signature, raising :class:`SecAggCryptoError` when it does not hold."""
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise SecAggCryptoError("identity signature verification failed") from exc
