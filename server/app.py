"""The fedtune ServerApp (Flower Message API).

``fedtune simulate`` builds one with :func:`make_server_app` around an already validated config and
run directory; ``fedtune coordinate`` (and ``flwr run``) uses the module-level ``app``, which reads the
campaign file named by the run config key ``campaign`` and, when given, resumes the run dir ``run-dir``.

Threat: on a coordinator, whoever can submit a run choosing the campaign. There the process holds the
session's run key (``FEDTUNE_RUN_KEY``, :mod:`fedtune.deploy.runkey`) and the run config must carry its token:
anything else is refused before the campaign is read, a run dir is created or a message is sent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import CampaignConfig, load_config
from fedtune.deploy.runkey import RUN_KEY_ENV, verify_run_config
from fedtune.rundir import RunDir, fresh_run_dir
from fedtune.strategies.driver import tune_reply_pulls

from .campaign import CampaignServer, Reporter


def make_server_app(
    cfg: CampaignConfig,
    run_dir: RunDir,
    reporter: Reporter | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """The ServerApp of ``fedtune simulate``; ``wrap_grid`` (optional) wraps the grid Flower hands it."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        CampaignServer(cfg, run_dir, reporter).run(grid if wrap_grid is None else wrap_grid(grid))

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    key = os.environ.get(RUN_KEY_ENV)
    if key is not None:  # on a coordinator: only the run `fedtune coordinate` signed
        verify_run_config(key, context.run_config)
    tune_reply_pulls()
    cfg = load_config(Path(str(context.run_config["campaign"])))
    requested = str(context.run_config.get("run-dir", ""))
    if requested:  # fedtune coordinate: the run dir is fixed, and an existing one is resumed
        run_dir = RunDir(Path(requested))
        cfg.campaign.run_dir = str(run_dir.root)
        if not run_dir.config.exists():
            run_dir.create(cfg.to_toml())
    else:
        run_dir = RunDir(fresh_run_dir(Path(cfg.campaign.run_dir)))
        run_dir.create(cfg.to_toml())
    CampaignServer(cfg, run_dir).run(grid)
