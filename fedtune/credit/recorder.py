"""Turns a round's outcome into credit-ledger entries, from what the server itself assigned.

Under secure aggregation the server never sees one contributor's update, so credit cannot come from
inspecting it, and claimed run time is gameable. A contributor earns the nominal FLOPs of the work the
server assigned (``local_steps × batch_size × max_seq_len`` tokens, the round's token budget) only if its
input is in the applied aggregate; its reported wall time is stored and checked, never paid.

A contributor may take on less than the campaign assigns (a smaller batch or LoRA rank on a small GPU): it is then
credited for the examples it was weighted by (never more than assigned) at the FLOPs per token of its rank, as the
round driver checked them (``fedtune.wire.Work``; without a claim, the campaign's rank).

The round drivers (``fedtune.strategies``) produce the outcomes; :class:`Outcome` says what the ledger reads
of one, so the ledger does not depend on how a round was run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fedtune.config import CampaignConfig
from fedtune.credit.formula import train_flops_per_token, train_flops_per_token_at_rank
from fedtune.credit.ledger import Contributor, Ledger, RoundEntry, Status
from fedtune.wire import ContributorInfo, TrainReport, Work


class Outcome(Protocol):
    """What happened to one sampled node in a round (``fedtune.strategies.driver.NodeOutcome``)."""

    @property
    def node_id(self) -> int: ...

    @property
    def status(self) -> Status: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def contributor(self) -> ContributorInfo | None: ...

    @property
    def reported_wall_s(self) -> float | None: ...

    @property
    def report(self) -> TrainReport | None: ...

    @property
    def work(self) -> Work | None: ...


class CreditKeeper:
    """Records every round of a campaign in the ledger; idempotent per (campaign, round, contributor)."""

    def __init__(self, cfg: CampaignConfig, ledger: Ledger, n_base: int, n_adapter: int, n_trainable: int) -> None:
        self.cfg, self.ledger = cfg, ledger
        self.counts = (n_base, n_adapter, n_trainable)
        self.flops_per_token = train_flops_per_token(n_base, n_adapter, n_trainable)
        self.known: dict[int, Contributor] = {}

    def assigned(self) -> tuple[int, int]:
        """(examples, tokens) the server asks of each cohort member in a round."""
        fed = self.cfg.federation
        examples = fed.local_steps * fed.batch_size
        return examples, examples * self.cfg.data.max_seq_len

    def work_of(self, outcome: Outcome) -> dict[str, int | float | None]:
        """The work one outcome is credited for: the campaign's assignment, or less when the contributor said so.

        Examples are what the contributor was weighted by, capped at the assignment; the FLOPs per token are
        those of the rank it claimed (``None``: the round's, at the campaign's rank).
        """
        examples, _ = self.assigned()
        report, work = outcome.report, outcome.work
        if outcome.status == "included" and report is not None:
            examples = min(report.num_examples, examples)
        flops = None
        if work is not None and work.rank < self.cfg.lora.rank:
            flops = train_flops_per_token_at_rank(*self.counts, work.rank, self.cfg.lora.rank)
        return {
            "assigned_examples": examples,
            "assigned_tokens": examples * self.cfg.data.max_seq_len,
            "flops_per_token": flops,
        }

    def record(self, server_round: int, outcomes: Sequence[Outcome]) -> int:
        """Write the round; returns how many rows were new (0 when the round was already recorded)."""
        for o in outcomes:
            who = o.contributor
            if who is not None:
                self.known[o.node_id] = Contributor(who.id, who.name, who.team, who.declared_peak_flops)
            elif o.node_id not in self.known:
                self.known[o.node_id] = Contributor(id=f"node-{o.node_id}", name=f"node-{o.node_id}")
        self.ledger.register_contributors({self.known[o.node_id].id: self.known[o.node_id] for o in outcomes}.values())
        entries = [
            RoundEntry(
                contributor_id=self.known[o.node_id].id,
                status=o.status,
                reported_wall_s=o.reported_wall_s,
                reason=o.reason,
                **self.work_of(o),
            )
            for o in outcomes
        ]
        written = self.ledger.record_round(
            self.cfg.campaign.name, server_round, entries, flops_per_token=self.flops_per_token
        )
        return len(written)
