"""Both round drivers behind one interface: the same fates give the same metrics row and the same ledger outcomes.

A cohort of 8 goes through Flower's own strategy (sampling, ``aggregate_train``) and fedtune's own ClientApp
handlers (plain ``train`` and the five SecAgg+ stages) on an in-process grid; only local training is replaced by
a fixed update per contributor. Five contributors train, one declines, one crashes, one never answers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtune.clients.app import LocalUpdate, register_handlers
from fedtune.clients.policy import SIMULATION_STATE_ROOT_ENV
from fedtune.config import CampaignConfig
from fedtune.credit.ledger import Ledger, default_url
from fedtune.credit.recorder import CreditKeeper
from fedtune.secagg import STAGES
from fedtune.server.campaign import round_row
from fedtune.strategies.driver import RoundResult
from fedtune.strategies.plain import PlainRound
from fedtune.strategies.secure import SecureRound
from fedtune.strategies.server_optimizer import build_strategy
from fedtune.wire import (
    ADAPTER,
    ContributorInfo,
    Decline,
    Layout,
    TrainReply,
    TrainReport,
    TrainRequest,
    record_nbytes,
)

from ..conftest import small_campaign
from .inprocess_grid import InProcessGrid

N = 8
NODES = {1000 + p: p for p in range(N)}  # Flower node id -> partition
START = {
    "layer.0.lora_B": np.linspace(-0.1, 0.1, 48, dtype=np.float32).reshape(12, 4),
    "layer.1.lora_B": np.zeros((6, 4), dtype=np.float32),
}
FATES = {5: "decline", 6: "crash", 7: "silent"}  # everyone else trains
SECURE_ONLY = {"secure_aggregation", "survivors", "secagg_stage_s"}


def campaign(secure: bool) -> CampaignConfig:
    fed = {"contributors_per_round": N, "min_cohort": 2, "round_timeout_s": 0.5}
    raw = small_campaign(federation=fed, simulation={"contributors": N})
    if secure:
        raw["secure_aggregation"] = {"protocol": "secagg+", "stage_timeout_s": 5.0}
    return CampaignConfig.from_dict(raw)


@pytest.fixture(scope="module", autouse=True)
def virtual_contributors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The nodes are a simulation's virtual contributors: their state (policy) under the launcher's root."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SIMULATION_STATE_ROOT_ENV, str(tmp_path_factory.mktemp("contributors")))
        yield


def who(partition: int) -> ContributorInfo:
    return ContributorInfo(f"id-{partition}", f"sim-{partition}")


def delta(partition: int, like: np.ndarray) -> np.ndarray:
    return (0.01 * (partition + 1) * np.cos(np.arange(like.size) + partition)).reshape(like.shape).astype(np.float32)


def contributors(fates: Mapping[int, str]) -> ClientApp:
    """fedtune's ClientApp handlers around a trainer that plays each partition's fate instead of training."""

    def trainer(message: Message, request: TrainRequest, context: Context, refuse: Any = None) -> Any:
        p = int(context.node_config["partition-id"])
        cfg = request.campaign()
        fate = fates.get(p, "train")
        if fate == "crash":
            raise RuntimeError(f"contributor {p} crashed")
        if fate == "decline" or (refuse is not None and refuse(cfg) is not None):
            return Message(Decline("privacy budget spent", who(p), epsilon=2.0).content(), reply_to=message)
        start = request.tensors()
        end = {k: v + delta(p, v) for k, v in start.items()}
        examples = 10**6 if fate == "inflate" else 12
        loss = 3.0 + 0.25 * p if p < 3 else None  # partitions 3 and 4 keep their loss (the default policy)
        report = TrainReport(examples, 3, loss, epsilon=0.5)
        if fate == "misshape":  # a packed adapter one element short
            flat = request.layout.pack(end)[ADAPTER].numpy()[:-1]
            return Message(TrainReply(ArrayRecord({ADAPTER: Array(flat)}), report, who(p)).content(), reply_to=message)
        return LocalUpdate(cfg, start, end, report, who(p))

    app = ClientApp()
    register_handlers(app, trainer)
    return app


def run_round(secure: bool, folder: Path, fates: Mapping[int, str] = FATES) -> tuple[RoundResult, dict[str, Any]]:
    """One round of the driver on the 8-node cohort; returns its result and its metrics row."""
    cfg = campaign(secure)
    silent = {node for node, p in NODES.items() if fates.get(p) == "silent"}
    grid = InProcessGrid(contributors(fates), {node: {"partition-id": p} for node, p in NODES.items()}, silent)
    driver = SecureRound(cfg, folder) if secure else PlainRound(cfg)
    request = TrainRequest.of(cfg, "fingerprint", 1, START)
    result = driver.run(grid, build_strategy(cfg, N), request)
    return result, round_row(1, result, {"eval_loss": 1.0}, wall_s=0.1)


def ledger_statuses(cfg: CampaignConfig, result: RoundResult, folder: Path) -> dict[str, tuple[str, bool]]:
    with Ledger.open(default_url(folder)) as ledger:
        assert CreditKeeper(cfg, ledger, 10_000, 500, 100).record(1, result.outcomes) == N
        return {e.contributor_id: (e.status, e.credit > 0) for e in ledger.round_entries(cfg.campaign.name, 1)}


def by_partition(result: RoundResult) -> dict[int, tuple[str, str | None]]:
    return {NODES[o.node_id]: (o.status, o.reason) for o in result.outcomes}


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RoundResult, dict[str, Any], Path]]:
    out = {}
    for name in ("plain", "secure"):
        folder = tmp_path_factory.mktemp(name)
        out[name] = (*run_round(name == "secure", folder), folder)
    return out


def test_both_drivers_give_the_same_outcomes_and_ledger_entries(both: dict) -> None:
    (plain, _, plain_dir), (secure, _, secure_dir) = both["plain"], both["secure"]
    for result in (plain, secure):
        fates = by_partition(result)
        assert {p: s for p, (s, _) in fates.items()} == {
            **{p: "included" for p in range(5)},
            5: "declined",
            6: "failed",
            7: "dropped",
        }
        assert fates[5][1] == "privacy budget spent" and "contributor 6 crashed" in fates[6][1]
        assert "no " in fates[7][1] and "reply within 0.5 s" in fates[7][1]
        assert result.applied and result.abort_reason is None
        for o in result.outcomes:  # the ledger checks the coordinator's own timing, never a reported one
            assert (o.reported_wall_s is not None and o.reported_wall_s >= 0) is (o.status == "included")
    expected = {f"id-{p}": ("included", True) for p in range(5)} | {"id-5": ("declined", False)}
    expected |= {f"node-{node}": ("failed" if p == 6 else "dropped", False) for node, p in NODES.items() if p in (6, 7)}
    assert ledger_statuses(campaign(False), plain, plain_dir) == expected
    assert ledger_statuses(campaign(True), secure, secure_dir) == expected


def test_both_drivers_build_the_same_metrics_row(both: dict) -> None:
    (plain, plain_row, _), (secure, secure_row, _) = both["plain"], both["secure"]
    assert set(secure_row) - set(plain_row) == SECURE_ONLY and set(plain_row) <= set(secure_row)
    shared = ("applied", "participants", "sampled", "declined", "failed", "examples", "bytes_down")
    assert {k: plain_row[k] for k in shared} == {k: secure_row[k] for k in shared}
    assert plain_row["participants"] == 5 and plain_row["declined"] == 1 and plain_row["failed"] == 2
    assert plain_row["examples"] == 5 * 12 and "tokens" not in plain_row  # contributors report no token counts
    assert plain_row["epsilon"] == secure_row["epsilon"] == {**{f"sim-{p}": 0.5 for p in range(5)}, "sim-5": 2.0}
    assert plain_row["epsilon_max"] == secure_row["epsilon_max"] == 2.0
    # the mean of the three that sent a loss; the two that kept theirs do not make the round inconsistent
    assert plain_row["train_loss"] == pytest.approx(3.25) and secure_row["train_loss"] == pytest.approx(3.25)
    assert secure_row["survivors"] == 5 and set(secure_row["secagg_stage_s"]) == set(STAGES)
    n = sum(a.size for a in START.values())
    assert plain_row["bytes_up"] == 5 * record_nbytes(Layout.of(START).pack(START))
    assert secure_row["bytes_up"] == 5 * 4 * (n + 1)  # uint32 masked vector + the weight coordinate
    exact = {k: v + np.mean([delta(p, v) for p in range(5)], axis=0) for k, v in START.items()}
    for k, v in exact.items():
        np.testing.assert_allclose(plain.arrays[k], v, atol=1e-7)
        np.testing.assert_allclose(secure.arrays[k], v, atol=2e-4)  # 16-bit quantization over clip range 1


def test_a_round_below_the_minimum_applies_nothing_with_either_driver(tmp_path: Path) -> None:
    alone = {p: "decline" for p in range(1, N)}  # only partition 0 trains
    rows = {}
    for secure in (False, True):
        result, rows[secure] = run_round(secure, tmp_path / str(secure), alone)
        assert not result.applied and result.arrays is None and result.abort_reason
        status, reason = by_partition(result)[0]
        assert status == "failed" and reason == f"round not applied: {result.abort_reason}"
    for row in rows.values():
        assert not row["applied"] and row["participants"] == 0 and row["declined"] == N - 1 and row["failed"] == 1
        assert row["examples"] == 0 and row["train_loss"] is None and row["abort_reason"]
    assert "minimum cohort 2" in rows[False]["abort_reason"] and "threshold" in rows[True]["abort_reason"]


def test_plain_round_refuses_misshapen_updates_and_caps_claimed_examples(tmp_path: Path) -> None:
    result, row = run_round(False, tmp_path, {0: "inflate", 1: "misshape"})
    fates = by_partition(result)
    assert fates[1][0] == "failed" and "invalid reply" in fates[1][1] and "float32[" in fates[1][1]
    assert row["participants"] == N - 1
    kept = [p for p in range(N) if p != 1]
    exact = {k: v + np.mean([delta(p, v) for p in kept], axis=0) for k, v in START.items()}
    for k, v in exact.items():  # partition 0 weighs as much as anyone, not 10^6 / 12 times more
        np.testing.assert_allclose(result.arrays[k], v, atol=1e-7)


def test_fedtune_contributors_decline_a_foreign_base_and_refuse_a_malformed_request(tmp_path: Path) -> None:
    """fedtune's own ClientApp, untouched: its decline and its refusal reach the server as a decline and a failure."""
    from fedtune.clients.app import app

    cfg = campaign(False)
    nodes = {node: {"partition-id": p} for node, p in NODES.items() if p < 3}
    foreign = TrainRequest.of(cfg, "0" * 64, 1, START)
    result = PlainRound(cfg).run(InProcessGrid(app, nodes), build_strategy(cfg, 3), foreign)
    assert {o.status for o in result.outcomes} == {"declined"} and not result.applied
    assert all("base model" in o.reason and o.contributor.name.startswith("sim-") for o in result.outcomes)

    broken = TrainRequest("campaign = [", foreign.base_fingerprint, 1, foreign.arrays, foreign.layout)  # not TOML
    result = PlainRound(cfg).run(InProcessGrid(app, nodes), build_strategy(cfg, 3), broken)
    assert {o.status for o in result.outcomes} == {"failed"}
    assert all("WireError" in o.reason and "campaign-toml" in o.reason for o in result.outcomes)


def test_the_deployed_serverapp_retries_reply_objects_soon() -> None:
    """Flower's HttpGrid pulls a reply's objects through ``pull_objects`` (1 s … 10 s back-off); fedtune's is tuned."""
    import functools
    import inspect

    import flwr.superlink.grid.http_grid as http_grid

    from fedtune.strategies.driver import REPLY_OBJECT_PULL, tune_reply_pulls

    original = http_grid.pull_objects
    assert "pull_objects(" in inspect.getsource(http_grid.HttpGrid.pull_messages)
    assert set(REPLY_OBJECT_PULL) <= set(inspect.signature(original).parameters)
    try:
        tune_reply_pulls()
        tune_reply_pulls()  # idempotent
        tuned = http_grid.pull_objects
        assert isinstance(tuned, functools.partial) and tuned.func is original and tuned.keywords == REPLY_OBJECT_PULL
    finally:
        http_grid.pull_objects = original


def test_a_resident_worker_answers_view_and_share_keys_while_it_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the background mode every training ends only after its node answered ``share_keys`` (without the mode
    it would wait in ``advertise`` and time out), declines still go out at ``advertise``, a training that fails
    after it started is a dropout at ``masked_input``, and the sum is the same as with training in ``advertise``."""
    import threading

    from fedtune.clients import secagg_client
    from fedtune.wire import secagg_message_type

    monkeypatch.setattr(secagg_client, "_BACKGROUND", True)
    shared = {node: threading.Event() for node in NODES}
    overlapped: dict[int, bool] = {}

    def trainer(message: Message, request: TrainRequest, context: Context, refuse: Any, on_train: Any = None) -> Any:
        p, cfg = int(context.node_config["partition-id"]), request.campaign()
        if p == 5 or refuse(cfg) is not None:
            return Message(Decline("privacy budget spent", who(p), epsilon=2.0).content(), reply_to=message)
        if on_train is not None:
            on_train(who(p))
        overlapped[p] = shared[context.node_id].wait(timeout=2.0)
        if p == 6:
            raise RuntimeError(f"contributor {p} ran out of memory")
        start = request.tensors()
        end = {k: v + delta(p, v) for k, v in start.items()}
        return LocalUpdate(cfg, start, end, TrainReport(12, 3, 3.0, epsilon=0.5), who(p))

    inner = ClientApp()
    register_handlers(inner, trainer)

    def app(message: Message, context: Context) -> Message:
        reply = inner(message, context)
        if message.metadata.message_type == secagg_message_type("share_keys"):
            shared[context.node_id].set()
        return reply

    cfg = campaign(True)
    grid = InProcessGrid(app, {node: {"partition-id": p} for node, p in NODES.items() if p != 7})  # type: ignore[arg-type]
    result = SecureRound(cfg, tmp_path).run(grid, build_strategy(cfg, N), TrainRequest.of(cfg, "fingerprint", 1, START))
    fates = by_partition(result)
    assert overlapped == {p: True for p in range(7) if p != 5}
    assert fates[5] == ("declined", "privacy budget spent")
    assert fates[6][0] == "failed" and "masked_input" in fates[6][1] and "ran out of memory" in fates[6][1]
    assert {p for p, (s, _) in fates.items() if s == "included"} == set(range(5)) and result.applied
    assert not secagg_client._JOBS  # nothing left behind in the worker
    exact = {k: v + np.mean([delta(p, v) for p in range(5)], axis=0) for k, v in START.items()}
    for k, v in exact.items():
        np.testing.assert_allclose(result.arrays[k], v, atol=2e-4)


def test_in_the_background_mode_fedtunes_contributors_still_decline_before_sending_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator sending a foreign base to resident workers gets declines at ``advertise``, no keys and no
    background training: ``local_update`` starts training (``on_train``) only after its last check."""
    from fedtune.clients import secagg_client
    from fedtune.clients.app import app

    monkeypatch.setattr(secagg_client, "_BACKGROUND", True)
    cfg = campaign(True)
    nodes = {node: {"partition-id": p} for node, p in NODES.items() if p < 3}
    grid = InProcessGrid(app, nodes)
    result = SecureRound(cfg, tmp_path).run(grid, build_strategy(cfg, 3), TrainRequest.of(cfg, "0" * 64, 1, START))
    assert {o.status for o in result.outcomes} == {"declined"} and not result.applied
    assert all("base model" in o.reason for o in result.outcomes)
    assert not secagg_client._JOBS and set(result.extra["secagg_stage_s"]) == {"advertise"}
