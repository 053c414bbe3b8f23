"""Server optimizers: Flower's own Message-API strategies, configured from the campaign.

Clients return their new adapter tensors; Flower's FedAvg averages them weighted by
``num-examples``: the strategies address records and the weight by fedtune's wire keys
(:data:`fedtune.wire.ARRAYS`, :data:`~fedtune.wire.CONFIG`, :data:`~fedtune.wire.NUM_EXAMPLES`), passed
explicitly so a change of Flower's defaults cannot split the two. In FFA-LoRA mode those tensors are the
B matrices over a shared frozen A, so the average is the exact average of the updates B·A;
FedAdam/FedYogi/FedAvgM then treat ``average - current`` as the pseudo-gradient.
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from fedtune.config import CampaignConfig
from fedtune.wire import ARRAYS, CONFIG, NUM_EXAMPLES


def build_strategy(cfg: CampaignConfig, available: int) -> FedAvg:
    """The campaign's strategy, sampling ``contributors_per_round`` of ``available`` nodes each round.

    Flower samples ``max(int(fraction × online), min_train_nodes)`` nodes and waits until that many are online,
    so the minimum is the campaign's ``min_cohort``: a contributor that vanished shrinks the cohort instead of
    stalling the campaign.
    """
    fed = cfg.federation
    common = dict(
        fraction_train=min(1.0, fed.contributors_per_round / max(available, 1) + 1e-9),
        fraction_evaluate=0.0,  # the server holds the eval split
        min_train_nodes=fed.min_cohort,
        min_evaluate_nodes=0,
        min_available_nodes=fed.min_cohort,
        weighted_by_key=NUM_EXAMPLES,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
    )
    if fed.server_optimizer == "fedavg":
        return FedAvg(**common)
    if fed.server_optimizer == "fedavgm":
        return FedAvgM(**common, server_learning_rate=fed.server_learning_rate, server_momentum=fed.server_momentum)
    opt_cls = FedAdam if fed.server_optimizer == "fedadam" else FedYogi
    return opt_cls(**common, eta=fed.server_learning_rate, eta_l=fed.learning_rate)


_STATE_ATTRS = ("m_t", "v_t", "momentum_vector")


def strategy_state(strategy: FedAvg) -> dict[str, np.ndarray]:
    """The server optimizer's moments, flattened to named arrays (what a resumed coordinator needs)."""
    out: dict[str, np.ndarray] = {}
    for attr in _STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if isinstance(value, dict):
            out.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, list):
            out.update({f"{attr}/{i}": np.asarray(v) for i, v in enumerate(value)})
    return out


def restore_strategy_state(strategy: FedAvg, state: dict[str, np.ndarray]) -> None:
    """Inverse of :func:`strategy_state`."""
    for attr in _STATE_ATTRS:
        items = {k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == attr}
        if not items:
            continue
        if attr == "momentum_vector":
            setattr(strategy, attr, [items[str(i)] for i in range(len(items))])
        else:
            setattr(strategy, attr, items)
