"""Test-only: a simulated campaign whose virtual contributors crash in chosen SecAgg+ stages.

    python tests/e2e/faulty_contributors.py CONFIG RUN_DIR STAGE:PARTITION[:ROUND] ...

Each fault makes the contributor of that partition raise in that stage (of that round, or of every round), as a
crashing client would; otherwise it runs fedtune's own ClientApp unchanged. The campaign runs through
:func:`fedtune.server.simulation.simulate` with that ClientApp, in its own process (Ray), like ``fedtune
simulate``; the exit code is 0 when every round was recorded. This script is ``__main__``, so the ClientApp's
handlers travel to the Ray actors by value and the actors never need to import the tests.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

Fault = tuple[str, int, int | None]  # stage, partition, round (None: every round)


def parse_fault(spec: str) -> Fault:
    stage, partition, *server_round = spec.split(":")
    return stage, int(partition), int(server_round[0]) if server_round else None


def crash_or_run(faults: list[Fault], stage: str, message: Message, context: Context) -> Message:
    """Raise where a fault says so, else answer with fedtune's own ClientApp."""
    from fedtune.clients.app import app as real
    from fedtune.wire import SecAggRequest

    partition = int(context.node_config.get("partition-id", -1))
    server_round = int(SecAggRequest.read(message.content, stage).msg["round"])
    for want_stage, want_partition, want_round in faults:
        if (want_stage, want_partition) == (stage, partition) and want_round in (None, server_round):
            raise RuntimeError(f"injected fault: partition {partition} crashes in {stage}, round {server_round}")
    return real(message, context)


def faulty_app(faults: list[Fault]) -> ClientApp:
    """fedtune's ClientApp behind a SecAgg+ stage handler that crashes where ``faults`` say."""
    from fedtune.secagg import STAGES
    from fedtune.wire import secagg_action

    app = ClientApp()
    for stage in STAGES:
        app.train(secagg_action(stage))(functools.partial(crash_or_run, faults, stage))
    return app


def main(argv: list[str]) -> int:
    from fedtune.config import load_config
    from fedtune.rundir import RunDir
    from fedtune.server.simulation import simulate

    config, run_dir, *specs = argv
    cfg = load_config(Path(config))
    run = RunDir(Path(run_dir).resolve())
    cfg.campaign.run_dir = str(run.root)
    run.create(cfg.to_toml())
    simulate(cfg, run, client_app=faulty_app([parse_fault(s) for s in specs]))
    return 0 if len(run.read_metrics()) == cfg.federation.rounds + 1 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
