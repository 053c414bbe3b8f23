"""Contributor keys and the coordinator's allow-list.

A contributor has two keys in its state dir: ``supernode.key`` (OpenSSH ECDSA P-384), which authenticates its
SuperNode to the SuperLink and whose public half the coordinator approves, and ``identity.key`` (Ed25519), whose
fingerprint is its contributor id in the credit ledger and which signs its secure-aggregation keys. The
coordinator keeps approved SuperNode keys in its home's ``contributors.allow`` (:mod:`fedtune.deploy.home`,
which also holds ``approve``), one OpenSSH line (plus a name) each, shared by every campaign it runs.

Private keys are written owner-readable only, through the one atomic writer, so a crash never leaves a
truncated key behind. Pitfall: an operator handed the wrong file (the private ``supernode.key``, a binary, a
key of another type) gets one line saying which file to ask for.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedtune.files import atomic_write_bytes, atomic_write_text
from fedtune.identity import contributor_id


@dataclass(frozen=True)
class ContributorKeys:
    """A contributor's keys: the SuperNode auth key pair (P-384) and the long-term identity (Ed25519)."""

    auth_private: Path
    auth_public: Path
    identity_private: Path
    public_line: str
    contributor_id: str


def load_identity_key(state_dir: Path) -> ed25519.Ed25519PrivateKey:
    """The contributor's long-term Ed25519 identity key (signs its secure-aggregation keys)."""
    key = serialization.load_pem_private_key((Path(state_dir) / "identity.key").read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{state_dir / 'identity.key'}: not an Ed25519 key")
    return key


def ensure_keys(state_dir: Path, name: str = "") -> ContributorKeys:
    """Create the contributor's keys on first use, load them afterwards (a restart keeps its identity).

    ``supernode.key`` (OpenSSH ECDSA P-384) authenticates the SuperNode to the SuperLink, and its public
    half ``supernode.pub`` is what the coordinator approves. ``identity.key`` (Ed25519) is the key whose
    fingerprint is the contributor id in the credit ledger.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    auth_private, auth_public = state_dir / "supernode.key", state_dir / "supernode.pub"
    ident = state_dir / "identity.key"
    if not auth_private.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        atomic_write_bytes(auth_private, pem, mode=0o600)
    loaded = serialization.load_ssh_private_key(auth_private.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp384r1":
        raise ValueError(f"{auth_private}: expected an ECDSA P-384 key in OpenSSH format")
    line = loaded.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    comment = "".join(c for c in name if c.isalnum() or c in "-_.@") or "contributor"
    atomic_write_text(auth_public, f"{line} {comment}\n")
    if not ident.exists():
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write_bytes(ident, pem, mode=0o600)
    identity = load_identity_key(state_dir)
    return ContributorKeys(auth_private, auth_public, ident, f"{line} {comment}", contributor_id(identity.public_key()))


@dataclass(frozen=True)
class AllowedKey:
    """One approved contributor: its OpenSSH public key (``type base64``) and a display name."""

    key: str
    name: str


def parse_public_key(text: str) -> str:
    """The ``ecdsa-sha2-nistp384 BASE64`` part of an OpenSSH public key line, after checking the key."""
    fields = text.strip().split()
    if len(fields) < 2:
        raise ValueError("not an OpenSSH public key line")
    line = f"{fields[0]} {fields[1]}"
    try:
        key = serialization.load_ssh_public_key(line.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ValueError("SuperNode authentication needs an ECDSA P-384 key (ecdsa-sha2-nistp384)")
    return line


def clean_name(name: str) -> str:
    """A display name safe for the allow-list and the ledger (letters, digits, `_.@-`; at most 64)."""
    return re.sub(r"[^A-Za-z0-9_.@-]", "-", name.strip())[:64]


def read_allow_list(path: Path) -> list[AllowedKey]:
    """Approved keys; comment lines and blank lines are skipped, bad lines are reported and skipped."""
    out: list[AllowedKey] = []
    if not path.exists():
        return out
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            key = parse_public_key(raw)
        except ValueError as exc:
            print(f"warning: {path}:{n}: skipped ({exc})", file=sys.stderr)
            continue
        fields = raw.split()
        out.append(AllowedKey(key, clean_name(" ".join(fields[2:])) or f"contributor-{n}"))
    return out


def read_public_key_file(key_file: Path) -> str:
    """The text of a contributor's public key file; ValueError (one line, with the fix) for anything else."""
    key_file = Path(key_file)
    if not key_file.is_file():
        raise ValueError(f"{key_file}: no such file (ask the contributor for the supernode.pub that join printed)")
    data = key_file.read_bytes()[:65536]
    if b"PRIVATE KEY" in data:
        raise ValueError(
            f"{key_file} is a private key: approve the contributor's public key (supernode.pub); "
            "the private key must never leave their machine"
        )
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{key_file}: not a text file; expected an OpenSSH public key (supernode.pub)") from None
