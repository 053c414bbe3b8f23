"""The coordinator's campaign loop: for each round, a round driver, then evaluate, checkpoint, credit, record.

Job
    fedtune owns the loop (rather than ``Strategy.start``) because each round must also handle declined and
    failed contributors, write the run directory and report progress. The round itself (sampling, exchange,
    aggregation, the server optimizer's step) is a :class:`~fedtune.strategies.driver.RoundDriver`'s:
    :class:`~fedtune.strategies.plain.PlainRound` or :class:`~fedtune.strategies.secure.SecureRound`. Whatever
    the driver, :func:`round_row` builds the round's ``metrics.jsonl`` row from its
    :class:`~fedtune.strategies.driver.RoundResult` and the credit ledger records its outcomes.

Threat
    Credit goes only to contributors whose input is in the applied aggregate, computed from the work the server
    assigned (``fedtune.credit.recorder``). A round that applies nothing leaves adapter and optimizer state as
    they were and is still checkpointed, credited and recorded, so a resumed campaign never re-runs it.

Pitfalls
    Flower samples cohorts with the global RNG: it is seeded from the campaign seed and the round a run
    starts after, so a resumed campaign samples as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.config import CampaignConfig
from fedtune.console import campaign_round_line
from fedtune.credit.ledger import Ledger, resolve_url
from fedtune.credit.recorder import CreditKeeper
from fedtune.files import atomic_write_dir
from fedtune.ml.evaluation import Evaluator
from fedtune.ml.model import base_fingerprint, build_model, count_parameters, load_trainable, trainable_arrays
from fedtune.rundir import SERVER_STATE, RunDir
from fedtune.strategies.driver import NodeOutcome, RoundDriver, RoundResult
from fedtune.strategies.plain import PlainRound
from fedtune.strategies.secure import SecureRound
from fedtune.strategies.server_optimizer import build_strategy, restore_strategy_state, strategy_state
from fedtune.wire import TrainRequest

from .failures import stop_if_hopeless

log = logging.getLogger("fedtune.server")


class Reporter(Protocol):
    """Receives progress; the CLI draws it, tests collect it."""

    def on_start(self, cfg: CampaignConfig, row0: dict[str, Any]) -> None: ...

    def on_round(self, row: dict[str, Any]) -> None: ...


class LogReporter:
    """Progress to the ``fedtune.server`` log (the ServerApp under ``coordinate`` or ``flwr run``)."""

    def on_start(self, cfg: CampaignConfig, row0: dict[str, Any]) -> None:
        log.info("campaign %s: %s", cfg.campaign.name, campaign_round_line(row0))

    def on_round(self, row: dict[str, Any]) -> None:
        log.info("%s", campaign_round_line(row))


def initial_row(evaluation: Mapping[str, float]) -> dict[str, Any]:
    """Round 0 of ``metrics.jsonl``: the initial adapter, evaluated."""
    return {
        "round": 0,
        **evaluation,
        "train_loss": None,
        "participants": 0,
        "declined": 0,
        "failed": 0,
        "bytes_up": 0,
        "bytes_down": 0,
        "wall_s": 0.0,
    }


def privacy_metrics(outcomes: Sequence[NodeOutcome]) -> dict[str, Any]:
    """ε each contributor reported (spent so far, trained or declined), by name, and the largest."""
    spent = {
        (o.contributor.name if o.contributor else str(o.node_id)): o.epsilon for o in outcomes if o.epsilon is not None
    }
    return {"epsilon_max": max(spent.values()), "epsilon": spent} if spent else {}


def round_row(server_round: int, result: RoundResult, evaluation: Mapping[str, float], wall_s: float) -> dict[str, Any]:
    """A finished round's ``metrics.jsonl`` row, whichever driver ran it (README lists the fields).

    ``participants`` are the included contributors (their input is in the applied aggregate), ``failed``
    everyone sampled who is neither included nor declined (errors, no reply, a round not applied);
    ``examples`` is the work assigned to the included contributors (they report no token counts). The driver
    adds its own fields (SecAgg+: ``secure_aggregation``, ``survivors``, ``secagg_stage_s``); ``abort_reason``
    says why a round applied nothing; ``epsilon``/``epsilon_max`` (coarse, as reported) appear when
    contributors train with DP-SGD.
    """
    included = [o for o in result.outcomes if o.status == "included"]
    declined = sum(o.status == "declined" for o in result.outcomes)
    return {
        "round": server_round,
        **evaluation,
        "train_loss": result.train_loss,
        "applied": result.applied,
        "participants": len(included),
        "sampled": len(result.cohort),
        "declined": declined,
        "failed": len(result.cohort) - len(included) - declined,
        "examples": sum(o.report.num_examples for o in included if o.report is not None),
        "bytes_down": result.bytes_down,
        "bytes_up": result.bytes_up,
        "round_trip_s": result.round_trip_s,
        "wall_s": wall_s,
        **result.extra,
        **({"abort_reason": result.abort_reason} if result.abort_reason else {}),
        **privacy_metrics(result.outcomes),
    }


class CampaignServer:
    """Runs a campaign's rounds against a Flower grid and writes the run directory."""

    def __init__(self, cfg: CampaignConfig, run_dir: RunDir, reporter: Reporter | None = None) -> None:
        self.cfg, self.run_dir, self.reporter = cfg, run_dir, reporter or LogReporter()
        # SecureRound validates the setup (sum overflow, threshold) before anything is built or written
        self.driver: RoundDriver = (
            SecureRound(cfg, run_dir.root) if cfg.secure_aggregation.protocol == "secagg+" else PlainRound(cfg)
        )
        self.model, tokenizer = build_model(cfg, quantize=False)  # evaluated and counted on the unquantized base
        self.evaluator = Evaluator(cfg, tokenizer)  # eval set, tasks, pinned threads: [evaluation]
        self.fingerprint = base_fingerprint(cfg.model)
        self.ledger = Ledger.open(resolve_url(run_dir.root, cfg.credit.db or None))
        n_base, n_adapter = count_parameters(self.model)
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.credits = CreditKeeper(cfg, self.ledger, n_base, n_adapter, n_trainable)

    def evaluate(self, server_round: int = 0) -> dict[str, Any]:
        return self.evaluator.run(self.model, server_round)

    def save_checkpoint(self, server_round: int, arrays: dict[str, np.ndarray], strategy: FedAvg) -> None:
        """The shared adapter (PEFT format) plus what a restarted coordinator needs to carry on."""

        def fill(folder: Path) -> None:
            self.model.save_pretrained(folder)
            state = {f"adapter/{k}": v for k, v in arrays.items()} | strategy_state(strategy)
            np.savez(folder / SERVER_STATE, **state)

        atomic_write_dir(self.run_dir.checkpoint(server_round), fill)
        atomic_write_dir(self.run_dir.adapter, self.model.save_pretrained)

    def resume_point(self, strategy: FedAvg) -> tuple[int, list[dict[str, Any]]] | None:
        """The last round whose metrics and checkpoint are both complete, restored into model and strategy."""
        point = self.run_dir.resume_point()
        if point is None:
            return None
        load_trainable(self.model, point.adapter)
        restore_strategy_state(strategy, point.strategy_state)
        return point.round, point.rows

    def wait_for_contributors(self, grid: Grid) -> int:
        """Wait (up to one round timeout) until a full cohort is online; returns how many are.

        Later rounds sample from whoever is online, down to ``min_cohort``, so a vanished contributor shrinks
        the cohort instead of stalling the campaign; the first round should not start with the early birds.
        """
        fed = self.cfg.federation
        deadline = time.monotonic() + fed.round_timeout_s
        while (online := len(list(grid.get_node_ids()))) < fed.contributors_per_round and time.monotonic() < deadline:
            time.sleep(1.0)
        return online

    def run(self, grid: Grid) -> list[dict[str, Any]]:
        """Run the remaining rounds; a run dir with completed rounds is resumed after the last of them."""
        cfg, fed = self.cfg, self.cfg.federation
        strategy = build_strategy(cfg, self.wait_for_contributors(grid))
        resumed = self.resume_point(strategy)
        if resumed is None:
            row0 = initial_row(self.evaluate())
            self.save_checkpoint(0, trainable_arrays(self.model), strategy)
            self.run_dir.append_metrics(row0)
            done, rows = 0, [row0]
        else:
            done, rows = resumed
            log.warning("resuming campaign %s after round %d", cfg.campaign.name, done)
        random.seed(f"{cfg.campaign.seed}:{done}")  # Flower samples cohorts with the global RNG
        self.reporter.on_start(cfg, rows[-1])
        for server_round in range(done + 1, fed.rounds + 1):
            row = self.run_round(server_round, strategy, grid)
            self.reporter.on_round(row)
            rows.append(row)
        self.ledger.close()
        return rows

    def run_round(self, server_round: int, strategy: FedAvg, grid: Grid) -> dict[str, Any]:
        """One round: the driver samples, exchanges and aggregates; then evaluate, checkpoint, credit, record."""
        start = time.perf_counter()
        current = trainable_arrays(self.model)
        request = TrainRequest.of(self.cfg, self.fingerprint, server_round, current)
        result = self.driver.run(grid, strategy, request)
        stop_if_hopeless(server_round, result.outcomes)  # every contributor failed the same way: stop, record nothing
        if result.arrays is not None:
            load_trainable(self.model, result.arrays)
        row = round_row(server_round, result, self.evaluate(server_round), time.perf_counter() - start)
        self.save_checkpoint(server_round, current if result.arrays is None else result.arrays, strategy)
        self.credits.record(server_round, result.outcomes)
        self.run_dir.append_metrics(row)
        return row
