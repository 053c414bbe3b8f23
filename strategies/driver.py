"""One round over the grid, whichever way the updates are combined: the interface of the round drivers.

Job
    A :class:`RoundDriver` runs one training round for the campaign loop (``fedtune.server.campaign``): sample
    with the Flower strategy, exchange messages, combine the updates, take the strategy's server-optimizer
    step, and return a :class:`RoundResult`: the cohort, the new adapter (or ``None``: nothing applied), every
    node's :class:`NodeOutcome`, bytes and timings. :class:`~fedtune.strategies.plain.PlainRound` combines
    updates in the clear, :class:`~fedtune.strategies.secure.SecureRound` through SecAgg+. Both keep their
    per-node bookkeeping in :class:`NodeFates` and hand the combined update to Flower through
    :func:`aggregate`, so the campaign loop builds one metrics row and one set of ledger outcomes for both.

Threat
    A sampled node may answer with an error, with a malformed reply (:class:`~fedtune.wire.WireError`), with a
    decline, or not at all; each puts it out of the round with a reason, and only nodes whose input is in the
    applied aggregate are ``included`` (credited). A contributor's claimed example count never weighs more than
    the server assigned. Contributors report no wall time (it is a function of their data): the time the ledger
    checks is the coordinator's own measurement, from sending a node its training message to receiving its reply.

Pitfalls
    The first thing that goes wrong for a node is its fate; later ones are ignored. A node whose input is in
    the applied aggregate is ``included`` whatever happened to it afterwards (SecAgg+ recovers its masks).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.wire import (
    METRICS,
    TRAIN_LOSS,
    ContributorInfo,
    Decline,
    Layout,
    SecAggReply,
    TrainReply,
    TrainReport,
    TrainRequest,
    WireError,
    Work,
    read_reply,
    record_nbytes,
)

log = logging.getLogger("fedtune.server")

Status = Literal["included", "declined", "dropped", "failed"]


@dataclass(frozen=True)
class NodeOutcome:
    """What happened to one sampled node in a round (what the credit ledger records).

    Parameters
    ----------
    node_id : int
        The Flower node id.
    status : str
        ``included`` (its input is in the applied aggregate), ``declined``, ``dropped`` (no reply) or ``failed``.
    reason : str, optional
        Why it is not included.
    contributor : ContributorInfo, optional
        Who it said it is, when it said so.
    report : TrainReport, optional
        What it trained, when its input reached the aggregation.
    epsilon : float, optional
        The (coarse) ε it reported spent so far.
    error : bool
        It answered with an error (its ClientApp raised), as opposed to no reply or a refused reply.
    reply_s : float, optional
        Seconds from sending its training message to receiving its reply, measured by the coordinator.
    work : Work, optional
        The rank and batch it claimed to train with (checked by the driver; ``None``: the campaign's).
    """

    node_id: int
    status: Status
    reason: str | None = None
    contributor: ContributorInfo | None = None
    report: TrainReport | None = None
    epsilon: float | None = None
    error: bool = False
    reply_s: float | None = None
    work: Work | None = None

    @property
    def reported_wall_s(self) -> float | None:
        """The time the ledger checks for an included node (stored and checked, never paid): the coordinator's
        own measurement of its training exchange, an upper bound of the time it trained."""
        return self.reply_s if self.status == "included" else None


@dataclass
class RoundResult:
    """What one round produced, for the campaign loop's model update, metrics row and ledger.

    Parameters
    ----------
    cohort : list of int
        The sampled node ids.
    outcomes : list of NodeOutcome
        Every sampled node's fate.
    arrays : dict, optional
        The new shared adapter; ``None`` when the round applied nothing.
    train_metrics : MetricRecord, optional
        Flower's aggregated train metrics (``train_loss``, example-weighted).
    abort_reason : str, optional
        Why nothing was applied.
    bytes_up, bytes_down : int
        Payload bytes received from and sent to the cohort (adapter or masked-vector tensors).
    round_trip_s : float
        Seconds from the first message sent to the aggregate.
    extra : dict
        Driver-specific fields of the metrics row (SecAgg+: ``secure_aggregation``, ``survivors``,
        ``secagg_stage_s``).
    """

    cohort: list[int]
    outcomes: list[NodeOutcome]
    arrays: dict[str, np.ndarray] | None = None
    train_metrics: MetricRecord | None = None
    abort_reason: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    round_trip_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def applied(self) -> bool:
        return self.arrays is not None

    @property
    def train_loss(self) -> float | None:
        if self.train_metrics is None or TRAIN_LOSS not in self.train_metrics:
            return None
        return float(self.train_metrics[TRAIN_LOSS])


class RoundDriver(Protocol):
    """Runs one training round of a campaign over a Flower grid."""

    def run(self, grid: Grid, strategy: FedAvg, request: TrainRequest) -> RoundResult:
        """Sample with ``strategy``, send ``request``, combine the replies, take the strategy's step.

        Parameters
        ----------
        grid : Grid
            The Flower grid of the run.
        strategy : FedAvg
            The campaign's Flower strategy (its sampling and its server optimizer).
        request : TrainRequest
            The round's train request: round number, campaign, base fingerprint and current adapter.

        Returns
        -------
        RoundResult
            The round's outcome; ``arrays`` is ``None`` when nothing was applied.
        """
        ...


def failure_reason(reason: str | None, limit: int = 240) -> str:
    """A contributor's error reason as one line: the wrapped exception's own message.

    Flower wraps a ClientApp's exception in layers of its own (in simulation, a Ray traceback):
    ``Exception ClientAppException occurred. Message: <class 'ValueError'>:<'…'>``.
    """
    text = " ".join(str(reason or "no reason given").split())
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[-1]
    text = re.sub(r"^<class '[\w.]+'>:<'", "", text).removesuffix("'>").strip() or "no reason given"
    return text if len(text) <= limit else "..." + text[-limit:]


class NodeFates:
    """Per-node bookkeeping of one round: the first thing that went wrong, who each node is, what it trained.

    Parameters
    ----------
    server_round : int
        The round (for the log).
    cohort : iterable of int
        The sampled node ids.
    """

    def __init__(self, server_round: int, cohort: Iterable[int]) -> None:
        self.server_round, self.cohort = server_round, sorted(cohort)
        self.fate: dict[int, tuple[Status, str]] = {}
        self.who: dict[int, ContributorInfo] = {}
        self.epsilon: dict[int, float] = {}
        self.inputs: dict[int, TrainReport] = {}  # in the aggregate, if the round applies
        self.errors: set[int] = set()  # answered with an error (the ClientApp raised)
        self.reply_s: dict[int, float] = {}  # send -> reply of each node's first (training) exchange
        self.work: dict[int, Work] = {}

    def active(self) -> set[int]:
        """Cohort members with no fate yet."""
        return {n for n in self.cohort if n not in self.fate}

    def out(self, node: int, status: Status, reason: str) -> None:
        """Put ``node`` out of the round (its first fate wins)."""
        if node not in self.fate:
            log.warning("round %d: node %s %s: %s", self.server_round, node, status, reason)
            self.fate[node] = (status, reason)

    def contributed(self, node: int, report: TrainReport, who: ContributorInfo, work: Work | None = None) -> None:
        """``node``'s update goes into the aggregate (``work``: the rank and batch it claimed, if it says)."""
        self.who[node] = who
        self.inputs[node] = report
        if work is not None:
            self.work[node] = work
        if report.epsilon is not None:
            self.epsilon[node] = report.epsilon

    def read(
        self, message: Message, stage: str | None = None, like: ArrayRecord | None = None
    ) -> TrainReply | SecAggReply | None:
        """A reply's content, or ``None`` when it puts its node out (error, malformed, wrong sender, decline).

        ``stage`` None reads a plain train reply (tensors checked against ``like``), else a SecAgg+ stage's.
        """
        node, label = message.metadata.src_node_id, stage or "train"
        if message.has_error():
            self.errors.add(node)
            self.out(node, "failed", f"{label}: {failure_reason(message.error.reason)}")
            return None
        try:
            reply = read_reply(message.content, stage, like)
            if isinstance(reply, SecAggReply) and reply.sender != node:
                raise WireError(f"secagg {stage} reply: signed for node {reply.sender}")
        except WireError as exc:
            self.out(node, "failed", f"{label}: invalid reply: {exc}")
            return None
        if isinstance(reply, Decline):
            self.who[node] = reply.contributor
            if reply.epsilon is not None:
                self.epsilon[node] = reply.epsilon
            self.out(node, "declined", reply.reason)
            return None
        if reply.contributor is not None:
            self.who[node] = reply.contributor
        return reply

    def result(
        self,
        request: TrainRequest,
        arrays: dict[str, np.ndarray] | None,
        train_metrics: MetricRecord | None,
        abort_reason: str | None,
        bytes_up: int,
        round_trip_s: float,
        extra: dict[str, Any] | None = None,
    ) -> RoundResult:
        """The round's :class:`RoundResult`: what the driver computed, plus every node's outcome.

        ``arrays`` None means nothing was applied; ``abort_reason`` says why (default: the server optimizer
        produced no aggregate). The bytes sent are the request's adapter times the cohort.
        """
        if arrays is None:
            abort_reason = abort_reason or "the server optimizer produced no aggregate"
            log.warning("round %d: %s; no update applied", self.server_round, abort_reason)
        return RoundResult(
            cohort=self.cohort,
            outcomes=self.outcomes(arrays is not None, abort_reason),
            arrays=arrays,
            train_metrics=train_metrics,
            abort_reason=abort_reason if arrays is None else None,
            bytes_up=bytes_up,
            bytes_down=record_nbytes(request.arrays) * len(self.cohort),
            round_trip_s=round_trip_s,
            extra=extra or {},
        )

    def outcomes(self, applied: bool, abort_reason: str | None) -> list[NodeOutcome]:
        """Every cohort member's outcome: input in the applied aggregate: included; otherwise its fate."""
        not_applied: tuple[Status, str] = ("failed", f"round not applied: {abort_reason}")
        out = []
        for node in self.cohort:
            if node in self.inputs:
                status, reason = ("included", None) if applied else not_applied
            else:
                status, reason = self.fate.get(node, not_applied)
            out.append(
                NodeOutcome(
                    node,
                    status,
                    reason,
                    self.who.get(node),
                    self.inputs.get(node),
                    self.epsilon.get(node),
                    reply_s=self.reply_s.get(node),
                    error=node in self.errors,
                    work=self.work.get(node),
                )
            )
        return out


REPLY_OBJECT_PULL = {"initial_backoff": 0.05, "backoff_cap": 0.5}
"""How the coordinator's ServerApp retries a reply's objects that the SuperLink does not hold yet. The SuperLink
hands out a reply as soon as a SuperNode registers it, before its objects are pushed; Flower then retries each
missing object after 1, 2, 4 … 10 s (seen: ≈ 1 s lost per round on loopback, on every SecAgg+ stage too).
Flower's overall limit (``PULL_MAX_TIME``) stays; past it the node's reply is an error, as in Flower."""


def tune_reply_pulls() -> None:
    """Make the deployment grid (``HttpGrid``, in this ServerApp process) retry a reply's objects per
    :data:`REPLY_OBJECT_PULL` (idempotent). Only the deployed ServerApp needs it: the simulation's grid holds
    replies in memory."""
    import flwr.superlink.grid.http_grid as http_grid

    pull = http_grid.pull_objects
    if not isinstance(pull, functools.partial):
        http_grid.pull_objects = functools.partial(pull, **REPLY_OBJECT_PULL)


def send_and_receive(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    first_poll_s: float = 0.005,
    max_poll_s: float = 0.1,
    arrivals: dict[int, float] | None = None,
) -> list[Message]:
    """``Grid.send_and_receive`` (same push, pull and timeout) polling from every 5 ms, backing off to 100 ms.

    Why: Flower's grids sleep a fixed interval between pulls (0.1 s in simulation, 3 s on the deployment
    grid), which a one-exchange round pays once but SecAgg+ pays in each of its four protocol-only stages,
    whose replies come back within milliseconds. The back-off keeps long (training) exchanges at Flower's
    simulation polling rate. ``arrivals`` (optional) receives each replying node's seconds from push to pull.
    """
    sent = time.monotonic()
    pending = set(grid.push_messages(messages))
    end, wait, replies = sent + timeout, first_poll_s, []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        if arrivals is not None:
            arrivals.update({m.metadata.src_node_id: time.monotonic() - sent for m in got})
        pending -= {m.metadata.reply_to_message_id for m in got}
        left = end - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(wait, left))
        wait = min(1.25 * wait, max_poll_s)
    return replies


def exchange(grid: Grid, messages: list[Message], timeout: float, fates: NodeFates, label: str) -> list[Message]:
    """Send ``messages`` and collect the replies; a node that does not answer in time is dropped.

    The first exchange of a round (the one that trains) times each reply for :attr:`NodeOutcome.reply_s`.
    """
    arrivals: dict[int, float] = {}
    replies = send_and_receive(grid, messages, timeout, arrivals=arrivals)
    for node, seconds in arrivals.items():
        fates.reply_s.setdefault(node, seconds)
    answered = {m.metadata.src_node_id for m in replies}
    for msg in messages:
        if msg.metadata.dst_node_id not in answered:
            fates.out(msg.metadata.dst_node_id, "dropped", f"no {label} reply within {timeout:g} s")
    return replies


@dataclass(frozen=True)
class Update:
    """One input to :func:`aggregate`: a node's adapter (or the secure mean), its weight and its train loss."""

    node: int
    arrays: ArrayRecord
    weight: int
    train_loss: float | None  # None: the contributor keeps its loss to itself


def mean_train_loss(weighted: Sequence[tuple[float, float | None]]) -> float | None:
    """The weight-averaged loss of the contributors that sent one (``None`` when none did)."""
    sent = [(w, loss) for w, loss in weighted if loss is not None]
    total = sum(w for w, _ in sent)
    return sum(w * loss for w, loss in sent) / total if sent and total > 0 else None


def aggregate(
    strategy: FedAvg, server_round: int, updates: Sequence[Update], layout: Layout
) -> tuple[dict[str, np.ndarray] | None, MetricRecord | None]:
    """Flower's ``aggregate_train`` on ``updates``, each passed as a train reply that carries only them.

    Rebuilding the replies keeps whatever else a contributor put in its metrics (keys others lack) from
    making Flower refuse the whole round as inconsistent. FedAvg averages the tensors weighted by
    ``weight``; FedAdam/FedYogi/FedAvgM then treat ``average − current`` as the pseudo-gradient. The updates
    are packed adapters (:class:`~fedtune.wire.Layout`); the result is unpacked with ``layout``. The train loss is
    the weighted mean of those contributors that sent one (most keep it: ``report_train_loss``), added after
    Flower's aggregation so that a round where only some sent one is still one Flower accepts.
    """
    replies = [
        Message(
            content=RecordDict(
                {strategy.arrayrecord_key: u.arrays, METRICS: MetricRecord({strategy.weighted_by_key: u.weight})}
            ),
            dst_node_id=u.node,
            message_type=MessageType.TRAIN,
        )
        for u in updates
    ]
    record, metrics = strategy.aggregate_train(server_round, replies)
    train_loss = mean_train_loss([(u.weight, u.train_loss) for u in updates])
    if metrics is not None and train_loss is not None:
        metrics[TRAIN_LOSS] = train_loss
    return (None if record is None else layout.unpack(record, "aggregate", cast=True)), metrics
