"""Test-only: with this folder on ``PYTHONPATH``, every simulated contributor (a Ray worker) fails its training with
the error an unreachable ε gives, the same way each time. Preflight refuses a truly unreachable ε before any worker
starts, so this is how a test makes every contributor fail inside a running campaign. Other processes (the
``fedtune`` CLI itself) are left alone."""

from __future__ import annotations

import sys

if sys.argv and sys.argv[0].endswith("default_worker.py"):
    import fedtune.clients.app as _app

    def _fail(*_args: object, **_kwargs: object) -> None:
        raise ValueError("cannot reach ε=0.001, δ=1e-05 with q=0.04 over 6 steps: The privacy budget is too low.")

    _app.train_local = _fail
