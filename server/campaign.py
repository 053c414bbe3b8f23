"""The coordinator's round loop: sample, send, collect, aggregate, evaluate, checkpoint, record.

fedtune owns the loop (rather than ``Strategy.start``) because each round must also handle declined
contributors, write the run directory and report progress; the sampling, weighted averaging and
server optimizer are Flower's strategy methods, called as they are.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.config import CampaignConfig
from fedtune.console import campaign_round_line
from fedtune.credit.ledger import Ledger, resolve_url
from fedtune.credit.recorder import CreditKeeper
from fedtune.files import atomic_write_dir
from fedtune.ml.evaluation import Evaluator
from fedtune.ml.model import base_fingerprint, build_model, count_parameters, load_trainable, trainable_arrays
from fedtune.rundir import RunDir
from fedtune.strategies.secure import SecAggWorkflow
from fedtune.strategies.server_optimizer import build_strategy, restore_strategy_state, strategy_state
from fedtune.wire import (
    Outcome,
    arrays_from_record,
    arrays_to_record,
    campaign_to_record,
    contributor_of,
    record_nbytes,
)

log = logging.getLogger("fedtune.server")
SERVER_STATE = "server_state.npz"


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


@dataclass
class RoundReplies:
    """A round's replies sorted by outcome."""

    accepted: list[Message] = field(default_factory=list)
    declined: list[tuple[int, str]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)

    @classmethod
    def sort(cls, replies: Iterable[Message]) -> RoundReplies:
        out = cls()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                out.failed.append((node, msg.error.reason))
            elif int(msg.content["metrics"].get("declined", 0)):
                out.declined.append((node, str(msg.content["reason"]["reason"])))
            else:
                out.accepted.append(msg)
        return out

    def outcomes(self, messages: list[Message], replies: list[Message], applied: bool) -> list[Outcome]:
        """Every sampled node's fate this round, for the credit ledger."""
        out = [
            Outcome(
                m.metadata.src_node_id,
                "included" if applied else "failed",
                None if applied else "round not applied: too few updates",
                m,
            )
            for m in self.accepted
        ]
        by_node = {m.metadata.src_node_id: m for m in replies}
        out += [Outcome(node, "declined", reason, by_node[node]) for node, reason in self.declined]
        out += [Outcome(node, "failed", reason) for node, reason in self.failed]
        answered = set(by_node)
        out += [
            Outcome(m.metadata.dst_node_id, "dropped", "no reply within the round timeout")
            for m in messages
            if m.metadata.dst_node_id not in answered
        ]
        return out


class CampaignServer:
    """Runs a campaign's rounds against a Flower grid and writes the run directory."""

    def __init__(self, cfg: CampaignConfig, run_dir: RunDir, reporter: Reporter | None = None) -> None:
        self.cfg, self.run_dir, self.reporter = cfg, run_dir, reporter or LogReporter()
        # validates the setup (sum overflow, threshold) before anything is built or written; None: plain aggregation
        self.secure = SecAggWorkflow(cfg, run_dir.root) if cfg.secure_aggregation.protocol == "secagg+" else None
        self.model, tokenizer = build_model(cfg)
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
        rows = self.run_dir.read_metrics()
        for row in reversed(rows):
            state_file = self.run_dir.checkpoint(row["round"]) / SERVER_STATE
            if not state_file.is_file():
                continue
            with np.load(state_file) as npz:
                state = {k: npz[k] for k in npz.files}
            load_trainable(self.model, {k[len("adapter/") :]: v for k, v in state.items() if k.startswith("adapter/")})
            restore_strategy_state(strategy, {k: v for k, v in state.items() if not k.startswith("adapter/")})
            return row["round"], [r for r in rows if r["round"] <= row["round"]]
        return None

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
            row0 = {
                "round": 0,
                **self.evaluate(),
                "train_loss": None,
                "participants": 0,
                "declined": 0,
                "failed": 0,
                "bytes_up": 0,
                "bytes_down": 0,
                "wall_s": 0.0,
            }
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

    @staticmethod
    def privacy_metrics(replies: list[Message]) -> dict[str, Any]:
        """ε each contributor reported (spent so far), by name, and the largest."""
        spent = {}
        for msg in replies:
            if msg.has_error() or "epsilon" not in msg.content["metrics"]:
                continue
            who = contributor_of(msg)
            spent[who.name if who else str(msg.metadata.src_node_id)] = float(msg.content["metrics"]["epsilon"])
        return {"epsilon_max": max(spent.values()), "epsilon": spent} if spent else {}

    def run_round(self, server_round: int, strategy: FedAvg, grid: Grid) -> dict[str, Any]:
        """One round: sample, send, collect, aggregate, evaluate, checkpoint, credit, record."""
        cfg, fed = self.cfg, self.cfg.federation
        start = time.perf_counter()
        arrays = trainable_arrays(self.model)
        record = arrays_to_record(arrays)
        config = campaign_to_record(
            cfg, **{"base-fingerprint": self.fingerprint, "state-root": str(self.run_dir.root / "contributors")}
        )
        if self.secure is not None:
            return self.run_secure_round(server_round, strategy, grid, start, record, config)
        messages = list(strategy.configure_train(server_round, record, config, grid))
        raw_replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
        round_trip_s = time.perf_counter() - start
        replies = RoundReplies.sort(raw_replies)
        for node, reason in replies.declined:
            log.warning("round %d: contributor %s declined: %s", server_round, node, reason)
        for node, reason in replies.failed:
            log.warning("round %d: contributor %s failed: %s", server_round, node, reason)
        applied = len(replies.accepted) >= fed.min_cohort
        train_loss = None
        if applied:
            new_record, train_metrics = strategy.aggregate_train(server_round, replies.accepted)
            arrays = arrays_from_record(new_record)
            load_trainable(self.model, arrays)
            train_loss = float(train_metrics["train_loss"]) if train_metrics else None
        else:
            log.warning(
                "round %d: %d accepted replies, below the minimum cohort %d; no update applied",
                server_round,
                len(replies.accepted),
                fed.min_cohort,
            )
        row = {
            "round": server_round,
            **self.evaluate(server_round),
            "train_loss": train_loss,
            "applied": applied,
            "participants": len(replies.accepted) if applied else 0,
            "sampled": len(messages),
            "declined": len(replies.declined),
            "failed": len(messages) - len(replies.accepted) - len(replies.declined),  # errors + no reply
            "examples": sum(int(m.content["metrics"]["num-examples"]) for m in replies.accepted),
            "tokens": sum(int(m.content["metrics"]["tokens"]) for m in replies.accepted),
            "bytes_down": record_nbytes(record) * len(messages),
            "bytes_up": sum(record_nbytes(m.content["arrays"]) for m in replies.accepted),
            "round_trip_s": round_trip_s,
            "wall_s": time.perf_counter() - start,
            **self.privacy_metrics(raw_replies),
        }
        return self.close_round(server_round, strategy, arrays, row, replies.outcomes(messages, raw_replies, applied))

    def close_round(
        self,
        server_round: int,
        strategy: FedAvg,
        arrays: dict[str, np.ndarray],
        row: dict[str, Any],
        outcomes: list[Outcome],
    ) -> dict[str, Any]:
        """Checkpoint, credit and record a finished round (applied or not): the same for every protocol."""
        self.save_checkpoint(server_round, arrays, strategy)
        self.credits.record(server_round, outcomes)
        self.run_dir.append_metrics(row)
        return row

    def run_secure_round(
        self, server_round: int, strategy: FedAvg, grid: Grid, start: float, record: ArrayRecord, config: ConfigRecord
    ) -> dict[str, Any]:
        """One SecAgg+ round: the server only ever sees the survivors' sum; an aborted round changes nothing.

        Only survivors whose masked input is in the applied sum are credited ("included"); an abort (fewer
        than the threshold or the minimum cohort left) leaves adapter and optimizer state as they were.
        """
        assert self.secure is not None
        result = self.secure.run_round(grid, strategy, server_round, record, config)
        arrays = arrays_from_record(record)
        if result.arrays is not None:
            arrays = result.arrays
            load_trainable(self.model, arrays)
        participants = len(result.survivors) if result.applied else 0
        train_loss = result.train_metrics.get("train_loss") if result.train_metrics else None
        row = {
            "round": server_round,
            **self.evaluate(server_round),
            "applied": result.applied,
            "train_loss": None if train_loss is None else float(train_loss),
            "participants": participants,
            "sampled": len(result.cohort),
            "declined": result.declined,
            "failed": len(result.cohort) - participants - result.declined,  # errors + no reply + aborted
            "examples": result.examples if result.applied else 0,
            "tokens": result.tokens if result.applied else 0,
            "bytes_down": result.bytes_down,
            "bytes_up": result.bytes_up,
            "round_trip_s": result.round_trip_s,
            "wall_s": time.perf_counter() - start,
            "secure_aggregation": True,
            "survivors": len(result.survivors),
            "secagg_stage_s": {k: round(v, 4) for k, v in result.stage_s.items()},
            **({"abort_reason": result.abort_reason} if result.abort_reason else {}),
            **self.privacy_metrics(result.replies),
        }
        return self.close_round(server_round, strategy, arrays, row, result.outcomes)
