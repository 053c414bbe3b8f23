"""fedtune: federated LoRA fine-tuning on community GPUs, with DP-SGD on every contributor and SecAgg+.

One round's path through the code: the coordinator's ``fedtune.server`` samples a cohort and sends the round
(``fedtune.wire``); each contributor's ``fedtune.clients`` checks it against its own policy, trains with
``fedtune.ml`` and ``fedtune.privacy``, and answers; ``fedtune.strategies`` combines the answers (in the clear
or through ``fedtune.secagg``); the server applies, evaluates, checkpoints and credits (``fedtune.credit``).
``fedtune.deploy`` holds what the deployment engine needs (bundle guard, keys, TLS, processes) and
``fedtune.cli`` the commands. Importing this package loads nothing heavy.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
