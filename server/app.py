"""The fedtune ServerApp (Flower Message API).

``fedtune simulate`` builds one with :func:`make_server_app` around an already validated config and
run directory; ``flwr run .`` uses the module-level ``app``, which reads the campaign file named by
the run config key ``campaign``.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import CampaignConfig, load_config
from fedtune.rundir import RunDir, fresh_run_dir

from .round_loop import CampaignServer, Reporter


def make_server_app(cfg: CampaignConfig, run_dir: RunDir, reporter: Reporter | None = None) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        CampaignServer(cfg, run_dir, reporter).run(grid)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config(Path(str(context.run_config["campaign"])))
    run_dir = RunDir(fresh_run_dir(Path(cfg.campaign.run_dir)))
    run_dir.create(cfg.to_toml())
    CampaignServer(cfg, run_dir).run(grid)
