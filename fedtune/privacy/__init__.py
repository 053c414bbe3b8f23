"""Record-level differential privacy for a contributor's local training (DP-SGD with Opacus).

The coordinator is not trusted, so the guarantee is made on the contributor: every local step clips each
sequence's gradient and adds Gaussian noise, and one Opacus accountant covers the contributor's whole
participation, not a single round. One job per module:

- :mod:`~fedtune.privacy.params`: the ``[privacy]`` parameters, δ and the Poisson sampling rate;
- :mod:`~fedtune.privacy.release`: the coarsened figures a contributor may report besides its noised update;
- :mod:`~fedtune.privacy.accounting`: one-time calibration, the accountant persisted in the contributor's
  state dir, ε queries and the budget check (:class:`ContributorPrivacy`);
- :mod:`~fedtune.privacy.dpsgd`: Opacus' wrappers for a private step and its ``DPDataLoader``;
- :mod:`~fedtune.privacy.clipping`: bounding the round's update before it is masked.

The loop is :func:`fedtune.clients.trainer.train_local`, one for plain and DP training. Per round::

    privacy = ContributorPrivacy.load(state_dir, params, shard_size=n, batch_size=b, local_steps=k)
    ok, reason = privacy.check_round(k)            # decline the round if not ok
    result = train_local(model, shard, steps=k, ..., randomness=randomness, privacy=privacy)
    # train_local records the steps taken (also when training raised) and saves before it returns
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .accounting import (
        STATE_FILE,
        SUMMARY_FILE,
        ContributorPrivacy,
        PrivacyBudgetExceeded,
        calibrate_noise,
        epsilon_of,
        restore_accountant,
    )
    from .clipping import clip_update
    from .dpsgd import (
        PrivateRun,
        batch_rows,
        enable_dp_gradient_checkpointing,
        make_private,
        poisson_loader,
        trainable_parameters,
    )
    from .params import (
        DEFAULT_DELTA,
        AccountantKind,
        GradSampleMode,
        Mechanism,
        PrivacyParams,
        delta_fits,
        resolve_delta,
        sample_rate_for,
    )
    from .release import EPSILON_STEP, LOSS_MAX, LOSS_STEP, coarse_epsilon, coarse_loss

_HOME = {
    "STATE_FILE": "accounting",
    "SUMMARY_FILE": "accounting",
    "ContributorPrivacy": "accounting",
    "PrivacyBudgetExceeded": "accounting",
    "calibrate_noise": "accounting",
    "epsilon_of": "accounting",
    "restore_accountant": "accounting",
    "clip_update": "clipping",
    "PrivateRun": "dpsgd",
    "batch_rows": "dpsgd",
    "enable_dp_gradient_checkpointing": "dpsgd",
    "make_private": "dpsgd",
    "poisson_loader": "dpsgd",
    "trainable_parameters": "dpsgd",
    "DEFAULT_DELTA": "params",
    "AccountantKind": "params",
    "GradSampleMode": "params",
    "Mechanism": "params",
    "PrivacyParams": "params",
    "delta_fits": "params",
    "resolve_delta": "params",
    "sample_rate_for": "params",
    "EPSILON_STEP": "release",
    "LOSS_MAX": "release",
    "LOSS_STEP": "release",
    "coarse_epsilon": "release",
    "coarse_loss": "release",
}
"""Where each name lives: the package loads a submodule when one of its names is first used, so a light user
(the join agent's policy check reads only :mod:`.params`) does not import Opacus and transformers."""


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_DELTA",
    "EPSILON_STEP",
    "LOSS_MAX",
    "LOSS_STEP",
    "STATE_FILE",
    "SUMMARY_FILE",
    "AccountantKind",
    "ContributorPrivacy",
    "GradSampleMode",
    "Mechanism",
    "PrivacyBudgetExceeded",
    "PrivacyParams",
    "PrivateRun",
    "batch_rows",
    "calibrate_noise",
    "clip_update",
    "coarse_epsilon",
    "coarse_loss",
    "delta_fits",
    "enable_dp_gradient_checkpointing",
    "epsilon_of",
    "make_private",
    "poisson_loader",
    "resolve_delta",
    "restore_accountant",
    "sample_rate_for",
    "trainable_parameters",
]
