"""fedtune: federated LoRA fine-tuning on community GPUs, with DP-SGD on every contributor and SecAgg+.

One round's path through the code: the coordinator's ``fedtune.server`` samples a cohort and sends the round
(``fedtune.wire``); each contributor's ``fedtune.clients`` checks it against its own policy, trains with
``fedtune.ml`` and ``fedtune.privacy``, and answers; ``fedtune.strategies`` combines the answers (in the clear
or through ``fedtune.secagg``); the server applies, evaluates, checkpoints and credits (``fedtune.credit``).
``fedtune.deploy`` holds what the deployment engine needs (bundle guard, keys, TLS, processes) and
``fedtune.cli`` the commands. Importing this package loads nothing heavy.

It does one thing on import: Flower's telemetry is turned off (``FLWR_TELEMETRY_ENABLED=0``) for this process and
every process it starts, unless the user set the variable. Flower otherwise posts an event to
``telemetry.flower.ai`` from each SuperLink, SuperNode, simulation and ``flwr`` CLI call, carrying a persistent
per-machine id (``~/.flwr/source``) and the platform: a contributor's machine would report to a third party each
time it joined or trained, and a test run would reach beyond loopback. Flower reads the variable when its
telemetry module is imported, so it is set here, before any fedtune code imports ``flwr``.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"
os.environ.setdefault(TELEMETRY_ENV, "0")

try:
    __version__ = version("fedtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["TELEMETRY_ENV", "__version__"]
