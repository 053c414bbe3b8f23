"""``fedtune simulate``: the whole campaign on one machine in Flower's simulation engine.

The launcher plays the contributors' side too: it writes each virtual contributor's own policy file and tells the
ClientApps where their state dirs are (``RUN/contributors/sim-NNN``) through the environment of this process,
which the Ray actors inherit. No message from the ServerApp can move a contributor's state or change its policy.
"""

from __future__ import annotations

import logging
import os

from flwr.clientapp import ClientApp

from fedtune.clients.policy import SIMULATION_STATE_ROOT_ENV, prepare_simulated_contributors
from fedtune.config import CampaignConfig
from fedtune.rundir import RunDir

from .app import make_server_app
from .campaign import Reporter


def simulate(
    cfg: CampaignConfig,
    run_dir: RunDir,
    reporter: Reporter | None = None,
    verbose: bool = False,
    client_app: ClientApp | None = None,
) -> None:
    """Run every round with ``[simulation] contributors`` virtual SuperNodes (Ray actors).

    Parameters
    ----------
    cfg : CampaignConfig
        The validated campaign.
    run_dir : RunDir
        The created run directory.
    reporter : Reporter, optional
        Receives progress (default: the ``fedtune.server`` log).
    verbose : bool
        Show Flower's and Ray's logs.
    client_app : ClientApp, optional
        What the virtual contributors run; default: fedtune's own (``fedtune.clients.app.app``). Tests pass
        one that wraps it to play crashing contributors; it is sent to the Ray actors, so it must pickle.
    """
    from flwr.simulation import run_simulation

    if client_app is None:
        from fedtune.clients.app import app as client_app

    if not verbose:
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
    contributors = run_dir.root / "contributors"
    prepare_simulated_contributors(cfg, contributors)
    os.environ[SIMULATION_STATE_ROOT_ENV] = str(contributors)  # before Ray starts: its workers inherit it
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sim = cfg.simulation
    backend_config = {
        "client_resources": {"num_cpus": sim.cpus_per_contributor, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "logging_level": "ERROR" if not verbose else "INFO",
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }
    run_simulation(
        server_app=make_server_app(cfg, run_dir, reporter),
        client_app=client_app,
        num_supernodes=sim.contributors,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
