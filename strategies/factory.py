"""Server optimizers: Flower's own Message-API strategies, configured from the campaign.

Clients return their new adapter tensors; Flower's FedAvg averages them weighted by
``num-examples``. In FFA-LoRA mode those tensors are the B matrices over a shared frozen A, so the
average is the exact average of the updates B·A; FedAdam/FedYogi/FedAvgM then treat
``average - current`` as the pseudo-gradient.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from fedtune.config import CampaignConfig


def build_strategy(cfg: CampaignConfig, available: int) -> FedAvg:
    """The campaign's strategy, sampling ``contributors_per_round`` of ``available`` nodes each round."""
    fed = cfg.federation
    common = dict(
        fraction_train=min(1.0, fed.contributors_per_round / max(available, 1)),
        fraction_evaluate=0.0,  # the server holds the eval split
        min_train_nodes=fed.contributors_per_round,
        min_evaluate_nodes=0,
        min_available_nodes=fed.contributors_per_round,
    )
    if fed.server_optimizer == "fedavg":
        return FedAvg(**common)
    if fed.server_optimizer == "fedavgm":
        return FedAvgM(**common, server_learning_rate=fed.server_learning_rate,
                       server_momentum=fed.server_momentum)
    opt_cls = FedAdam if fed.server_optimizer == "fedadam" else FedYogi
    return opt_cls(**common, eta=fed.server_learning_rate, eta_l=fed.learning_rate)
