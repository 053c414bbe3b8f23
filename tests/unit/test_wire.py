"""The wire format: every message survives its round trip, and every reader refuses a malformed one with WireError."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune import wire
from fedtune.config import CampaignConfig
from fedtune.secagg import STAGES
from fedtune.strategies.server_optimizer import build_strategy
from fedtune.wire import (
    ContributorInfo,
    Decline,
    Layout,
    SecAggReply,
    SecAggRequest,
    TrainReply,
    TrainReport,
    TrainRequest,
    WireError,
    read_reply,
)

from ..conftest import small_campaign

ARRAYS = {"a.lora_B": np.arange(12, dtype=np.float32).reshape(3, 4), "b.lora_B": np.ones(5, dtype=np.float32)}
WHO = ContributorInfo("0123abcd", "alice", "team-x", 1e12)
REPORT = TrainReport(num_examples=24, steps=3, train_loss=3.25, epsilon=0.75)
HEADER = {"campaign_id": "test", "round": 2}
LAYOUT = Layout.of(ARRAYS)


def request() -> TrainRequest:
    return TrainRequest.of(CampaignConfig.from_dict(small_campaign()), "f" * 64, 2, ARRAYS)


def without(content: RecordDict, record: str, key: str | None = None) -> RecordDict:
    """A copy of ``content`` lacking a record, or one field of it."""
    out = RecordDict(dict(content.items()))
    if key is None:
        del out[record]
    else:
        kind = type(out[record])
        out[record] = kind({k: v for k, v in out[record].items() if k != key})
    return out


def replaced(content: RecordDict, record: str, key: str, value: object) -> RecordDict:
    out = RecordDict(dict(content.items()))
    out[record] = type(out[record])({**dict(out[record].items()), key: value})
    return out


def same_arrays(a: ArrayRecord, b: ArrayRecord) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


# -- round trips -------------------------------------------------------------------------------------


def test_train_request_round_trip() -> None:
    sent = request()
    got = TrainRequest.read(sent.content())
    assert (got.campaign_toml, got.base_fingerprint, got.server_round) == (sent.campaign_toml, sent.base_fingerprint, 2)
    assert set(sent.config()) == {wire.CAMPAIGN_TOML, wire.BASE_FINGERPRINT, wire.SERVER_ROUND, wire.LAYOUT}
    assert same_arrays(got.arrays, sent.arrays) and got.layout == sent.layout
    assert list(got.arrays) == [wire.ADAPTER]  # one packed array on the wire, not one per tensor
    back = got.tensors()
    assert list(back) == list(ARRAYS) and all(
        np.array_equal(back[k], v) and back[k].shape == v.shape for k, v in ARRAYS.items()
    )
    assert got.campaign().to_toml() == CampaignConfig.from_dict(small_campaign()).to_toml()


def test_train_reply_and_contributor_round_trip() -> None:
    got = TrainReply.read(TrainReply(LAYOUT.pack(ARRAYS), REPORT, WHO).content(), like=LAYOUT.pack(ARRAYS))
    assert got.report == REPORT and got.contributor == WHO and same_arrays(got.arrays, LAYOUT.pack(ARRAYS))
    anonymous = ContributorInfo("0123abcd", "bob")  # no team, no declared peak
    assert ContributorInfo.from_record(anonymous.to_record()) == anonymous
    quiet = TrainReport(24, 3, 3.0)  # no DP: no ε
    assert TrainReport.from_record(quiet.to_record()) == quiet and wire.EPSILON not in quiet.to_record()
    # only assigned or coarse values: no token or sample count, no wall time
    assert set(REPORT.to_record()) == {wire.NUM_EXAMPLES, wire.STEPS, wire.TRAIN_LOSS, wire.DECLINED, wire.EPSILON}


def test_decline_round_trip_and_dispatch() -> None:
    for epsilon in (None, 2.5):
        content = Decline("privacy budget spent", WHO, epsilon).content()
        assert Decline.is_decline(content)
        assert read_reply(content) == read_reply(content, "advertise") == Decline("privacy budget spent", WHO, epsilon)
    assert not Decline.is_decline(TrainReply(LAYOUT.pack(ARRAYS), REPORT, WHO).content())
    with pytest.raises(WireError, match="secagg unmask reply"):  # only the stages that train may decline
        read_reply(Decline("no", WHO).content(), "unmask")


def test_secagg_messages_round_trip() -> None:
    advertise = {**HEADER, "stage": "advertise", "cohort": [2**64 - 1, 3], wire.SECAGG_WEIGHT_MAX: 12.0}
    got = SecAggRequest.read(SecAggRequest(advertise, request()).content(), "advertise")
    assert got.msg == advertise and got.stage == "advertise" and got.train is not None and got.train.server_round == 2
    unmask = {**HEADER, "stage": "unmask", "survivors": [1, 2], "signatures": [b"a", b"b"]}
    assert SecAggRequest.read(SecAggRequest(unmask).content(), "unmask") == SecAggRequest(unmask)

    keys = {**HEADER, "stage": "advertise", "sender": 3, "c_pk": b"c" * 32, wire.SECAGG_IDENTITY: b"k" * 32}
    got_reply = SecAggReply.read(SecAggReply(keys, contributor=WHO).content(), "advertise")
    assert got_reply == SecAggReply(keys, contributor=WHO) and got_reply.sender == 3
    masked = {**HEADER, "stage": "masked_input", "sender": 3, "masked": np.arange(7, dtype=np.uint32)}
    back = read_reply(SecAggReply(masked, WHO, REPORT).content(), "masked_input")
    assert isinstance(back, SecAggReply) and back.report == REPORT and back.contributor == WHO
    assert back.msg["masked"].dtype == np.uint32 and np.array_equal(back.msg["masked"], masked["masked"])


def test_secagg_names_and_flower_keys_agree_with_their_owners() -> None:
    assert {wire.SECAGG_ADVERTISE, wire.SECAGG_MASKED_INPUT} <= set(STAGES)
    assert wire.secagg_message_type("share_keys") == "train.secagg_share_keys"
    strategy = build_strategy(CampaignConfig.from_dict(small_campaign()), 3)
    assert (strategy.arrayrecord_key, strategy.configrecord_key, strategy.weighted_by_key) == (
        wire.ARRAYS,
        wire.CONFIG,
        wire.NUM_EXAMPLES,
    )


# -- malformed messages ------------------------------------------------------------------------------

TRAIN = request().content()
REPLY = TrainReply(LAYOUT.pack(ARRAYS), REPORT, WHO).content()
DECLINE = Decline("budget", WHO, 1.0).content()
ADVERTISE_REPLY = SecAggReply(
    {**HEADER, "stage": "advertise", "sender": 3, wire.SECAGG_IDENTITY: b"k" * 32}, contributor=WHO
).content()
MASKED_REPLY = SecAggReply({**HEADER, "stage": "masked_input", "sender": 3}, WHO, REPORT).content()
SHARE_KEYS_REQUEST = SecAggRequest({**HEADER, "stage": "share_keys", "ids": [1]}).content()

MALFORMED: dict[str, tuple[Callable[[], object], str]] = {
    "train request without config": (lambda: TrainRequest.read(without(TRAIN, wire.CONFIG)), "missing ConfigRecord"),
    "train request without arrays": (lambda: TrainRequest.read(without(TRAIN, wire.ARRAYS)), "'arrays'"),
    "train request without campaign": (
        lambda: TrainRequest.read(without(TRAIN, wire.CONFIG, wire.CAMPAIGN_TOML)),
        "'campaign-toml'",
    ),
    "train request with a text round": (
        lambda: TrainRequest.read(replaced(TRAIN, wire.CONFIG, wire.SERVER_ROUND, "2")),
        "'server-round' must be int",
    ),
    "train request without a layout": (
        lambda: TrainRequest.read(without(TRAIN, wire.CONFIG, wire.LAYOUT)),
        "'layout'",
    ),
    "train request with a layout that is not JSON": (
        lambda: TrainRequest.read(replaced(TRAIN, wire.CONFIG, wire.LAYOUT, "{")),
        "not an adapter layout",
    ),
    "train request whose layout names a tensor twice": (
        lambda: TrainRequest.read(
            replaced(TRAIN, wire.CONFIG, wire.LAYOUT, Layout("float32", (("a", (6,)), ("a", (11,)))).to_json())
        ),
        "names a tensor twice",
    ),
    "train request whose layout does not fit its array": (
        lambda: TrainRequest.read(
            replaced(TRAIN, wire.CONFIG, wire.LAYOUT, Layout("float32", (("a.lora_B", (3, 4)),)).to_json())
        ),
        "float32[17], the layout says float32[12]",
    ),
    "train request with one array per tensor": (
        lambda: TrainRequest.read(
            RecordDict(
                {wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in ARRAYS.items()}), wire.CONFIG: TRAIN[wire.CONFIG]}
            )
        ),
        "instead of the one packed 'adapter' array",
    ),
    "train request with a broken campaign": (
        lambda: TrainRequest.read(replaced(TRAIN, wire.CONFIG, wire.CAMPAIGN_TOML, "[lora]\nrank = 'x'")).campaign(),
        "campaign-toml",
    ),
    "train reply without contributor": (
        lambda: TrainReply.read(without(REPLY, wire.CONTRIBUTOR)),
        "missing ConfigRecord 'contributor'",
    ),
    "train reply without steps": (lambda: TrainReply.read(without(REPLY, wire.METRICS, wire.STEPS)), "'steps'"),
    "train reply with negative steps": (
        lambda: TrainReply.read(replaced(REPLY, wire.METRICS, wire.STEPS, -5)),
        "negative",
    ),
    "train reply with zero weight": (
        lambda: TrainReply.read(replaced(REPLY, wire.METRICS, wire.NUM_EXAMPLES, 0)),
        "num-examples",
    ),
    "train reply with other tensors": (
        lambda: TrainReply.read(
            REPLY, like=Layout.of({"a.lora_B": ARRAYS["a.lora_B"]}).pack({"a.lora_B": ARRAYS["a.lora_B"]})
        ),
        "float32[17], not float32[12]",
    ),
    "train reply with a reshaped tensor": (
        lambda: TrainReply.read(REPLY, like=ArrayRecord({"a.lora_B": LAYOUT.pack(ARRAYS)[wire.ADAPTER]})),
        "differ from the request",
    ),
    "contributor with an empty id": (
        lambda: TrainReply.read(replaced(REPLY, wire.CONTRIBUTOR, wire.CONTRIBUTOR_ID, "")),
        "empty contributor id",
    ),
    "decline without reason": (lambda: Decline.read(without(DECLINE, wire.REASON)), "'reason'"),
    "decline flag that is not a number": (
        lambda: Decline.is_decline(replaced(DECLINE, wire.METRICS, wire.DECLINED, [1, 2])),
        "'declined' must be int",
    ),
    "secagg request of another stage": (
        lambda: SecAggRequest.read(SHARE_KEYS_REQUEST, "unmask"),
        "stage 'share_keys', expected 'unmask'",
    ),
    "secagg request without round": (
        lambda: SecAggRequest.read(without(SHARE_KEYS_REQUEST, wire.SECAGG, "round"), "share_keys"),
        "'round'",
    ),
    "advertise request without the train request": (
        lambda: SecAggRequest.read(
            SecAggRequest({**HEADER, "stage": "advertise", "weight_max": 1.0}).content(), "advertise"
        ),
        "train request",
    ),
    "advertise request without the weight bound": (
        lambda: SecAggRequest.read(SecAggRequest({**HEADER, "stage": "advertise"}, request()).content(), "advertise"),
        "'weight_max'",
    ),
    "secagg reply without sender": (
        lambda: SecAggReply.read(without(ADVERTISE_REPLY, wire.SECAGG, "sender"), "advertise"),
        "'sender'",
    ),
    "advertise reply with a short identity key": (
        lambda: SecAggReply.read(replaced(ADVERTISE_REPLY, wire.SECAGG, wire.SECAGG_IDENTITY, b"k"), "advertise"),
        "32-byte",
    ),
    "advertise reply without contributor": (
        lambda: SecAggReply.read(without(ADVERTISE_REPLY, wire.CONTRIBUTOR), "advertise"),
        "'contributor'",
    ),
    "masked input without its report": (
        lambda: SecAggReply.read(without(MASKED_REPLY, wire.METRICS), "masked_input"),
        "'metrics'",
    ),
    "a plain reply read as a secagg one": (lambda: read_reply(REPLY, "consistency"), "'secagg'"),
    "a record of the wrong kind": (
        lambda: TrainReply.read(RecordDict({**dict(REPLY.items()), wire.METRICS: ConfigRecord({"x": 1})})),
        "must be a MetricRecord",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_readers_refuse_malformed_messages_with_one_error_type(case: str) -> None:
    read, match = MALFORMED[case]
    with pytest.raises(WireError, match=re.escape(match)):
        read()


@pytest.mark.parametrize("stage", [None, *STAGES])
def test_an_empty_message_is_a_wire_error_for_every_reader(stage: str | None) -> None:
    with pytest.raises(WireError):
        read_reply(RecordDict(), stage)
    with pytest.raises(WireError):
        TrainRequest.read(RecordDict()) if stage is None else SecAggRequest.read(RecordDict(), stage)
    with pytest.raises(WireError):
        TrainReport.from_record(MetricRecord({}))


def test_layout_packs_in_its_own_order_and_refuses_other_tensors() -> None:
    shuffled = dict(reversed(list(ARRAYS.items())))  # a contributor's dict order is not the wire order
    assert np.array_equal(LAYOUT.pack(shuffled)[wire.ADAPTER].numpy(), LAYOUT.pack(ARRAYS)[wire.ADAPTER].numpy())
    assert Layout.from_json(LAYOUT.to_json(), "x") == LAYOUT and LAYOUT.size == 17
    with pytest.raises(ValueError, match="missing \\['b.lora_B'\\]"):
        LAYOUT.pack({"a.lora_B": ARRAYS["a.lora_B"]})
    with pytest.raises(ValueError, match="'b.lora_B' is \\[6\\], the layout says \\[5\\]"):
        LAYOUT.pack({**ARRAYS, "b.lora_B": np.ones(6, np.float32)})
    with pytest.raises(ValueError, match="several dtypes"):
        Layout.of({"a": np.ones(2, np.float32), "b": np.ones(2, np.float64)})
