"""The coordinator's ServerApp runs only the campaign ``fedtune coordinate`` submitted: a run bound by a secret.

``fedtune coordinate`` draws a random run key for its session and hands it, in the environment only, to the
SuperExec it starts (and through it to the ``flwr-serverapp`` processes it launches). It submits its run with
a run config that carries ``token = HMAC-SHA256(key, run config + SHA-256 of the campaign file)``. The
ServerApp checks the token before it reads the campaign, creates a run dir or sends a message: a run someone
else submitted (another bundle, another campaign file, another run dir, a campaign file edited after the
submission) is refused.

Threat: anyone who reaches the SuperLink's Control API (a local user of the coordinator host; the network
only sees the Fleet API, :mod:`fedtune.deploy.front`) submitting a code-free bundle whose run config names a
campaign of their choosing. The guarded ``flwr-serverapp`` (:mod:`fedtune.deploy.bundle`) refuses to start
without a key, so the check cannot be skipped on the coordinator. Pitfalls: the key never goes on a command
line (``/proc/PID/cmdline`` is world-readable) or into the run dir; the comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from pathlib import Path

RUN_KEY_ENV = "FEDTUNE_RUN_KEY"
"""Environment variable holding the session's run key (hex) in the SuperExec and the ServerApp."""

TOKEN = "token"
"""Run config key of the binding token."""


class RunRefused(RuntimeError):
    """A run whose run config was not signed by this coordinator session."""


def new_run_key() -> str:
    """A fresh 256-bit run key, hex-encoded."""
    return secrets.token_hex(32)


def _digest(key: str, run_config: Mapping[str, object], campaign: bytes) -> str:
    fields = {k: v for k, v in run_config.items() if k != TOKEN}
    message = json.dumps(fields, sort_keys=True, default=str).encode() + b"\n" + hashlib.sha256(campaign).digest()
    return hmac.new(bytes.fromhex(key), b"fedtune-run/1\n" + message, hashlib.sha256).hexdigest()


def sign_run_config(key: str, run_config: Mapping[str, object]) -> str:
    """The token for ``run_config``, whose ``campaign`` names the campaign file as it is now."""
    campaign = Path(str(run_config["campaign"])).read_bytes()
    return _digest(key, run_config, campaign)


def verify_run_config(key: str, run_config: Mapping[str, object]) -> None:
    """Raise :class:`RunRefused` unless ``run_config`` carries this key's token for its campaign file."""
    token = str(run_config.get(TOKEN, ""))
    path = Path(str(run_config.get("campaign", "")))
    try:
        campaign = path.read_bytes() if path.is_file() else None
    except OSError:
        campaign = None
    if not token or campaign is None or not hmac.compare_digest(token, _digest(key, run_config, campaign)):
        raise RunRefused(
            "refused a run that `fedtune coordinate` did not submit (its run config or campaign file is not the "
            f"one this coordinator signed: campaign={str(path)!r}); nothing was created or sent"
        )
