"""A plain round: every sampled contributor sends its new adapter in the clear and Flower's strategy averages them.

Job
    :class:`PlainRound` is the :class:`~fedtune.strategies.driver.RoundDriver` of campaigns without secure
    aggregation: Flower's ``configure_train`` samples the cohort and addresses the train request, one exchange
    collects the replies, Flower's ``aggregate_train`` averages the adapters weighted by examples and takes the
    server optimizer's step. A round with fewer updates than ``[federation] min_cohort`` applies nothing.

Threat
    The coordinator sees each update (use SecAgg+ where it must not). A contributor may cheat: a reply whose
    tensors do not match the request's names, shapes and dtypes is refused (the node fails), and a claimed
    example count is capped at what the server assigned, so no contributor outweighs an honest one.

    A contributor that took on less (its own rank r and batch b, :class:`~fedtune.wire.Work`) is weighted by the
    examples it claims, and its claim is checked: ``num_examples`` must be ``local_steps × b`` and its update may
    not touch B's columns beyond r (they are the zero padding of a rank-r update). A claim that fails either check
    fails the node.

Pitfalls
    Honest contributors always report the assigned count (``local_steps × batch_size``, whatever their Poisson
    draws were), so the cap never changes an honest round.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.config import CampaignConfig
from fedtune.wire import TrainReply, TrainRequest, WireError, Work, record_nbytes

from .driver import NodeFates, RoundResult, Update, aggregate, exchange


class PlainRound:
    """Runs plain (in the clear) rounds of a campaign over a Flower grid.

    Parameters
    ----------
    cfg : CampaignConfig
        The campaign: its round timeout, minimum cohort and assigned work.
    """

    def __init__(self, cfg: CampaignConfig) -> None:
        self.cfg = cfg
        fed = cfg.federation
        self.assigned_examples = fed.local_steps * fed.batch_size

    def run(self, grid: Grid, strategy: FedAvg, request: TrainRequest) -> RoundResult:
        """Sample, send the train request, collect, average with the strategy (see :class:`RoundDriver`)."""
        fed, server_round = self.cfg.federation, request.server_round
        start = time.perf_counter()
        messages = list(strategy.configure_train(server_round, request.arrays, request.config(), grid))
        fates = NodeFates(server_round, (m.metadata.dst_node_id for m in messages))
        trained: dict[int, TrainReply] = {}
        replies = exchange(grid, messages, fed.round_timeout_s, fates, "train")
        round_trip_s = time.perf_counter() - start
        for message in replies:
            reply = fates.read(message, like=request.arrays)
            if isinstance(reply, TrainReply):
                node = message.metadata.src_node_id
                try:
                    work = self.checked_work(message.content, reply, request)
                except WireError as exc:
                    fates.out(node, "failed", f"train: invalid reply: {exc}")
                    continue
                trained[node] = reply
                fates.contributed(node, reply.report, reply.contributor, work)
        abort_reason, arrays, metrics = None, None, None
        if len(trained) < fed.min_cohort:
            abort_reason = f"{len(trained)} updates, below the minimum cohort {fed.min_cohort}"
        else:
            updates = [
                Update(node, r.arrays, min(r.report.num_examples, self.assigned_examples), r.report.train_loss)
                for node, r in sorted(trained.items())
            ]
            arrays, metrics = aggregate(strategy, server_round, updates, request.layout)
        bytes_up = sum(record_nbytes(r.arrays) for r in trained.values())
        return fates.result(request, arrays, metrics, abort_reason, bytes_up, round_trip_s)

    def checked_work(self, content: RecordDict, reply: TrainReply, request: TrainRequest) -> Work | None:
        """The reply's work claim, checked against its report and its update (raises :class:`WireError`)."""
        work = Work.parse(content, "train reply")
        if work is None:
            return None
        work.check(self.cfg, "train reply", reply.report.num_examples)
        start, end = request.tensors(), request.layout.unpack(reply.arrays, "train reply")
        for name, before in start.items():
            if "lora_B" in name and not np.array_equal(before[:, work.rank :], end[name][:, work.rank :]):
                raise WireError(f"work: rank {work.rank} claimed, but {name} changed beyond column {work.rank}")
        return work
