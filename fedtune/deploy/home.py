"""The coordinator's home: one identity (CA, server certificate, contributor allow-list) for every campaign.

Contributors pin the coordinator's CA certificate and the operator approves each contributor's key once, so
both belong to the coordinator, not to one run dir. Every ``fedtune coordinate`` on this machine reads them
from the same home (``~/.fedtune/coordinator``, or ``$FEDTUNE_COORDINATOR_HOME``, or ``--home``)::

    HOME/tls/ca.pem              the CA certificate contributors pass as --root-cert (public, fetched once)
    HOME/tls/ca.key              the CA's private key (0600; never leaves this machine)
    HOME/tls/server.pem, .key    the server certificate, re-issued from the CA when a new address is served
    HOME/contributors.allow      approved contributor keys, one OpenSSH ECDSA P-384 key (+ name) per line

Threat: an outsider who can write into the home could approve itself or replace the CA, so the folder is
created owner-only (0700) and private keys 0600. Pitfall: only ``coordinate`` creates a home; ``approve`` and
``doctor`` refuse a path that holds none, so a mistyped ``--home`` ends in an error instead of a fresh, empty
identity that no contributor trusts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedtune.deploy.keys import AllowedKey, clean_name, parse_public_key, read_allow_list, read_public_key_file
from fedtune.deploy.tls import TlsFiles, ensure_tls, tls_paths
from fedtune.files import atomic_write_text

HOME_ENV = "FEDTUNE_COORDINATOR_HOME"
DEFAULT_HOME = "~/.fedtune/coordinator"
ALLOW_FILE = "contributors.allow"
ALLOW_HEADER = """\
# Contributors allowed to join this coordinator's campaigns: one OpenSSH ECDSA P-384 public key per line,
# optionally followed by a name. Add one with `fedtune approve KEYFILE --name NAME`; a running coordinator
# registers new lines within seconds.
"""


class HomeError(ValueError):
    """A coordinator home that is missing or unusable; the message says what to do."""


def home_path(path: str | Path | None = None) -> Path:
    """The coordinator home: ``path`` if given, else ``$FEDTUNE_COORDINATOR_HOME``, else ``~/.fedtune/coordinator``."""
    chosen = path if path else os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class CoordinatorHome:
    """Paths of one coordinator home."""

    root: Path

    @property
    def tls(self) -> TlsFiles:
        return tls_paths(self.root / "tls")

    @property
    def allow_file(self) -> Path:
        return self.root / ALLOW_FILE


def ensure_home(path: str | Path | None, hosts: list[str] | tuple[str, ...]) -> CoordinatorHome:
    """Create the home on first use (owner-only), or reuse it; make sure the server certificate covers ``hosts``.

    The CA is created once and kept: every campaign after the first serves a certificate from the same CA,
    so contributors fetch ``ca.pem`` once.
    """
    home = CoordinatorHome(home_path(path))
    if not home.root.exists():
        home.root.mkdir(parents=True, mode=0o700)
    ensure_tls(home.root / "tls", list(hosts))
    if not home.allow_file.exists():
        atomic_write_text(home.allow_file, ALLOW_HEADER)
    return home


def existing_home(path: str | Path | None) -> CoordinatorHome:
    """The home at ``path`` (see :func:`home_path`); :class:`HomeError` if none was ever created there."""
    home = CoordinatorHome(home_path(path))
    if not home.allow_file.is_file() or not home.tls.ca.is_file():
        raise HomeError(
            f"no coordinator home at {home.root} (it holds no {ALLOW_FILE} and tls/ca.pem): check --home "
            f"(or ${HOME_ENV}), or start `fedtune coordinate` once, which creates it"
        )
    return home


def approve(key_file: Path, home: str | Path | None = None, name: str | None = None) -> AllowedKey:
    """Add a contributor's public key to the home's ``contributors.allow`` (idempotent); returns its entry.

    ``home`` must already be a coordinator home (:func:`existing_home`): a mistyped path is an error, never
    a new folder. ``ValueError`` carries one line for the operator.
    """
    text = read_public_key_file(key_file)
    try:
        key = parse_public_key(text)
    except ValueError as exc:
        raise ValueError(f"{key_file}: {exc}") from None
    allow = existing_home(home).allow_file
    label = clean_name(name or " ".join(text.split()[2:])) or "contributor"
    for entry in read_allow_list(allow):
        if entry.key == key:
            return entry
    current = allow.read_text(encoding="utf-8")
    atomic_write_text(allow, current + ("" if current.endswith("\n") else "\n") + f"{key} {label}\n")
    return AllowedKey(key, label)
