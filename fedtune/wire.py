"""fedtune's wire format: every message the coordinator and a contributor exchange, as Flower records.

Job
    One typed constructor and one reader per message, and every record and field key as a named constant, so
    the two sides cannot drift apart and no other module spells a key. Each message is a frozen dataclass:
    ``.content()`` builds the :class:`~flwr.app.RecordDict` that travels, ``.read(content)`` (a classmethod)
    takes one apart. The adapter travels packed into one array (:class:`Layout`, the request's ``layout`` field
    says where each tensor sits). The messages:

    ============================  =====================  ===============================================
    message                       direction              records
    ============================  =====================  ===============================================
    :class:`TrainRequest`         coordinator -> node    ``arrays`` (shared adapter), ``config``
                                                         (campaign TOML, base fingerprint, round, layout)
    :class:`TrainReply`           node -> coordinator    ``arrays`` (new adapter), ``metrics``
                                                         (:class:`TrainReport`), ``contributor``
    :class:`Decline`              node -> coordinator    ``metrics`` (``declined = 1``, ε), ``reason``,
                                                         ``contributor``
    :class:`SecAggRequest`        coordinator -> node    ``secagg`` (+ ``secagg-arrays``); ``advertise``
                                                         also carries the train request's records
    :class:`SecAggReply`          node -> coordinator    ``secagg`` (+ ``secagg-arrays``); ``advertise``
                                                         adds ``contributor``, ``masked_input`` adds
                                                         ``metrics`` and ``contributor``
    ============================  =====================  ===============================================

    :class:`ContributorInfo` is the ``contributor`` record (who a contributor says it is).

Threat
    Each side reads what the other one sent: the coordinator is the adversary of a contributor's data and a
    contributor may cheat. A reader therefore checks the shape of what it got (records present, fields of the
    right type, SecAgg+ headers well-formed) and raises :class:`WireError`, one line naming the message and
    the field, on anything else; the coordinator treats that node as failed, a contributor refuses the round.
    What the values mean (a contributor's own policy, the SecAgg+ protocol, the coordinator's assignment) is
    checked by the caller, never here. What a contributor sends besides its update is assigned or coarse
    (:class:`TrainReport`): nothing here carries an exact loss, token or sample count, shard size, ε or wall time,
    and no request field names where a contributor keeps its state (that is the contributor's own business).

Pitfalls
    Flower's strategies find records by key (``arrayrecord_key``, ``configrecord_key``, ``weighted_by_key``):
    :func:`fedtune.strategies.server_optimizer.build_strategy` passes :data:`ARRAYS`, :data:`CONFIG` and
    :data:`NUM_EXAMPLES` explicitly, and ``configure_train`` overwrites :data:`SERVER_ROUND` with the same
    round. A ``ConfigRecord`` holds int, float, str, bytes, bool and lists of those; SecAgg+ protocol messages
    are flat dicts of exactly those, plus numpy arrays that travel in a separate ``ArrayRecord``.
    This module must not import ``fedtune.credit`` (contributors never load the ledger) nor ``fedtune.secagg``
    (same layer): the two SecAgg+ stage names it needs are spelled here and checked against the protocol's by
    a unit test.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from fedtune.config import CampaignConfig, ConfigError

# -- record keys -------------------------------------------------------------------------------------
ARRAYS = "arrays"  # ArrayRecord: adapter tensors (train request and reply); Flower's ``arrayrecord_key``
CONFIG = "config"  # ConfigRecord: the train request's round config; Flower's ``configrecord_key``
METRICS = "metrics"  # MetricRecord: what a contributor did (or that it declined)
CONTRIBUTOR = "contributor"  # ConfigRecord: ContributorInfo
REASON = "reason"  # ConfigRecord: why a contributor declined
SECAGG = "secagg"  # ConfigRecord: a SecAgg+ protocol message's scalar and list fields
SECAGG_ARRAYS = "secagg-arrays"  # ArrayRecord: its numpy fields (the masked uint32 upload)

# -- field keys --------------------------------------------------------------------------------------
CAMPAIGN_TOML = "campaign-toml"
BASE_FINGERPRINT = "base-fingerprint"
SERVER_ROUND = "server-round"
LAYOUT = "layout"  # the train request's packed adapter layout (:class:`Layout`), JSON
NUM_EXAMPLES = "num-examples"  # Flower's ``weighted_by_key``
TRAIN_LOSS = "train_loss"
STEPS = "steps"
DECLINED = "declined"
EPSILON = "epsilon"
REASON_TEXT = "reason"
CONTRIBUTOR_ID, CONTRIBUTOR_NAME, CONTRIBUTOR_TEAM, PEAK_FLOPS = "id", "name", "team", "peak-flops"
# fields fedtune adds to SecAgg+ protocol messages
SECAGG_IDENTITY = "identity"  # advertise reply: the contributor's Ed25519 identity public key (32 bytes)
SECAGG_WEIGHT_MAX = "weight_max"  # advertise request: the largest example weight the server assigns

# the SecAgg+ stages whose messages carry more than the protocol message (``fedtune.secagg.STAGES`` names them)
SECAGG_ADVERTISE, SECAGG_MASKED_INPUT = "advertise", "masked_input"

# the work a contributor chose to take on (its own rank and batch, at most the campaign's): see ``Work``
WORK = "work"  # ConfigRecord in a plain train reply or a SecAgg+ masked_input reply
WORK_RANK, WORK_BATCH_SIZE = "rank", "batch-size"


class WireError(ValueError):
    """A message that does not follow fedtune's wire format; ``str()`` names the message and the field."""


_MISSING: Any = object()


def _field(record: Mapping[str, Any], key: str, kind: type, where: str, default: Any = _MISSING) -> Any:
    """``record[key]`` checked to be a ``kind`` (int, float, str or bytes; a float field accepts an int)."""
    if key not in record:
        if default is _MISSING:
            raise WireError(f"{where}: missing field {key!r}")
        return default
    value = record[key]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise WireError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _part(content: RecordDict, key: str, kind: type, where: str) -> Any:
    """The record ``key`` of ``content``, checked to be a ``kind`` record."""
    if key not in content:
        raise WireError(f"{where}: missing {kind.__name__} {key!r}")
    record = content[key]
    if not isinstance(record, kind):
        raise WireError(f"{where}: {key!r} must be a {kind.__name__}, got {type(record).__name__}")
    return record


# -- arrays ------------------------------------------------------------------------------------------


ADAPTER = "adapter"
"""The one tensor of a packed adapter record: every adapter tensor, flattened and concatenated (see :class:`Layout`)."""


@dataclass(frozen=True)
class Layout:
    """Where each named adapter tensor sits in the one flat array the adapter travels as.

    Why one array: Flower moves a message as one HTTP request per object (each ``Array`` and each of its chunks),
    at most two at a time, on every hop (ServerApp → SuperLink → SuperNode → worker and back). An adapter of 28
    tensors was ≈ 60 requests a hop, 2–5 s a hop on loopback and one network round trip per pair of objects on a
    home link; packed, a message is a handful of objects whatever the number of adapted modules. Flower's
    strategies average arrays element by element, so FedAvg, FedAvgM, FedAdam and FedYogi are unchanged on the
    packed vector. The layout travels in the train request's ``config`` (:data:`LAYOUT`); a reply is unpacked
    with the request's layout, never its own.
    """

    dtype: str
    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        """The layout of ``arrays`` (their order; one dtype for all, as the trainable adapter has)."""
        dtypes = {np.asarray(a).dtype.str for a in arrays.values()}
        if len(dtypes) > 1:
            raise ValueError(f"adapter tensors of several dtypes {sorted(dtypes)} cannot travel as one array")
        dtype = np.dtype(dtypes.pop() if dtypes else "<f4").name
        return cls(dtype, tuple((name, tuple(int(d) for d in np.shape(a))) for name, a in arrays.items()))

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.tensors)

    def pack(self, arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
        """``arrays`` (exactly this layout's names and shapes) as an ArrayRecord of one flat array."""
        names = [name for name, _ in self.tensors]
        if set(arrays) != set(names):
            missing, extra = sorted(set(names) - set(arrays))[:3], sorted(set(arrays) - set(names))[:3]
            raise ValueError(f"adapter tensors do not match the layout: missing {missing}, unexpected {extra}")
        parts = []
        for name, shape in self.tensors:
            a = np.asarray(arrays[name])
            if a.shape != shape:
                raise ValueError(f"adapter tensor {name!r} is {list(a.shape)}, the layout says {list(shape)}")
            parts.append(a.astype(self.dtype, copy=False).ravel())
        flat = np.concatenate(parts) if parts else np.zeros(0, self.dtype)
        return ArrayRecord({ADAPTER: Array(np.ascontiguousarray(flat))})

    def unpack(self, record: ArrayRecord, where: str = "adapter", cast: bool = False) -> dict[str, np.ndarray]:
        """Inverse of :meth:`pack`; a record that is not this layout's packed array is a :class:`WireError`.

        ``cast``: accept any float dtype and convert to the layout's (a server optimizer's result: Flower's
        FedAdam and FedYogi compute in float64; the adapter stays in its own dtype round after round).
        """
        self.check(record, where, cast)
        flat, out, at = record[ADAPTER].numpy().astype(self.dtype, copy=False), {}, 0
        for name, shape in self.tensors:
            n = int(np.prod(shape))
            out[name] = flat[at : at + n].reshape(shape).copy()
            at += n
        return out

    def check(self, record: ArrayRecord, where: str, any_float: bool = False) -> None:
        """Raise :class:`WireError` unless ``record`` is one flat array of this layout's dtype and size."""
        if set(record) != {ADAPTER}:
            raise WireError(f"{where}: arrays {sorted(record)[:3]} instead of the one packed {ADAPTER!r} array")
        got = record[ADAPTER]
        dtype_ok = got.dtype == self.dtype or (any_float and got.dtype in ("float16", "float32", "float64"))
        if tuple(got.shape) != (self.size,) or not dtype_ok:
            raise WireError(
                f"{where}: packed adapter is {got.dtype}{list(got.shape)}, the layout says {self.dtype}[{self.size}]"
            )

    def to_json(self) -> str:
        return json.dumps({"dtype": self.dtype, "tensors": [[n, list(s)] for n, s in self.tensors]})

    @classmethod
    def from_json(cls, text: str, where: str) -> Layout:
        """Parse :meth:`to_json`'s text from the other side; anything malformed is a :class:`WireError`."""
        try:
            raw = json.loads(text)
            dtype = str(np.dtype(raw["dtype"]).name)
            tensors = tuple((str(n), tuple(int(d) for d in s)) for n, s in raw["tensors"])
        except (ValueError, TypeError, KeyError) as exc:
            raise WireError(f"{where}: field {LAYOUT!r} is not an adapter layout ({exc})") from None
        if dtype not in ("float32", "float16", "float64") or any(not n or any(d < 0 for d in s) for n, s in tensors):
            raise WireError(f"{where}: field {LAYOUT!r}: unsupported dtype {dtype!r} or an empty name / negative size")
        if len({n for n, _ in tensors}) != len(tensors):
            raise WireError(f"{where}: field {LAYOUT!r} names a tensor twice")
        return cls(dtype, tensors)


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (the tensors, not the framing)."""
    return sum(len(arr.data) for arr in record.values())


def check_like(record: ArrayRecord, like: ArrayRecord, where: str) -> None:
    """Raise :class:`WireError` unless ``record`` has exactly ``like``'s tensor names, shapes and dtypes."""
    if set(record) != set(like):
        raise WireError(f"{where}: tensors {sorted(set(record) ^ set(like))[:3]} differ from the request's")
    for name, ref in like.items():
        got = record[name]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            raise WireError(
                f"{where}: tensor {name!r} is {got.dtype}{list(got.shape)}, not {ref.dtype}{list(ref.shape)}"
            )


# -- contributor -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContributorInfo:
    """Who a contributor says it is in its replies: a stable id, display name and team, declared peak FLOP/s."""

    id: str
    name: str
    team: str | None = None
    declared_peak_flops: float | None = None

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                CONTRIBUTOR_ID: self.id,
                CONTRIBUTOR_NAME: self.name,
                CONTRIBUTOR_TEAM: self.team or "",
                PEAK_FLOPS: float(self.declared_peak_flops or 0.0),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord, where: str = CONTRIBUTOR) -> ContributorInfo:
        who = _field(record, CONTRIBUTOR_ID, str, where)
        if not who:
            raise WireError(f"{where}: empty contributor id")
        return cls(
            id=who,
            name=_field(record, CONTRIBUTOR_NAME, str, where),
            team=_field(record, CONTRIBUTOR_TEAM, str, where, "") or None,
            declared_peak_flops=_field(record, PEAK_FLOPS, float, where, 0.0) or None,
        )

    @classmethod
    def read(cls, content: RecordDict, where: str) -> ContributorInfo:
        """The ``contributor`` record of a reply (required)."""
        return cls.from_record(_part(content, CONTRIBUTOR, ConfigRecord, where), f"{where}: {CONTRIBUTOR}")


# -- train request -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainRequest:
    """A round's train request: the resolved campaign, the base fingerprint, the round and the shared adapter.

    Parameters
    ----------
    campaign_toml : str
        The resolved campaign, as TOML (the contributor parses it with :meth:`campaign`).
    base_fingerprint : str
        The coordinator's base-model fingerprint; the contributor compares its own.
    server_round : int
        The round number.
    arrays : ArrayRecord
        The current shared adapter, packed (:meth:`Layout.pack`): what Flower's strategies see and average.
    layout : Layout
        Where each named tensor sits in ``arrays`` (travels in ``config``).
    """

    campaign_toml: str
    base_fingerprint: str
    server_round: int
    arrays: ArrayRecord
    layout: Layout

    @classmethod
    def of(
        cls, cfg: CampaignConfig, base_fingerprint: str, server_round: int, arrays: Mapping[str, np.ndarray]
    ) -> TrainRequest:
        layout = Layout.of(arrays)
        return cls(cfg.to_toml(), base_fingerprint, server_round, layout.pack(arrays), layout)

    def tensors(self) -> dict[str, np.ndarray]:
        """The shared adapter as named tensors."""
        return self.layout.unpack(self.arrays, "train request")

    def config(self) -> ConfigRecord:
        """The ``config`` record (what ``Strategy.configure_train`` takes next to :attr:`arrays`)."""
        return ConfigRecord(
            {
                CAMPAIGN_TOML: self.campaign_toml,
                BASE_FINGERPRINT: self.base_fingerprint,
                SERVER_ROUND: self.server_round,
                LAYOUT: self.layout.to_json(),
            }
        )

    def content(self) -> RecordDict:
        return RecordDict({ARRAYS: self.arrays, CONFIG: self.config()})

    @classmethod
    def read(cls, content: RecordDict) -> TrainRequest:
        where = "train request"
        config = _part(content, CONFIG, ConfigRecord, where)
        layout = Layout.from_json(_field(config, LAYOUT, str, where), where)
        arrays = _part(content, ARRAYS, ArrayRecord, where)
        layout.check(arrays, where)
        return cls(
            campaign_toml=_field(config, CAMPAIGN_TOML, str, where),
            base_fingerprint=_field(config, BASE_FINGERPRINT, str, where),
            server_round=_field(config, SERVER_ROUND, int, where),
            arrays=arrays,
            layout=layout,
        )

    def campaign(self) -> CampaignConfig:
        """The campaign the coordinator sent, validated as a campaign file is."""
        try:
            return CampaignConfig.from_dict(tomllib.loads(self.campaign_toml), source="<coordinator>")
        except (tomllib.TOMLDecodeError, ConfigError) as exc:
            raise WireError(f"train request: field {CAMPAIGN_TOML!r}: {exc}") from None


# -- replies -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainReport:
    """What a contributor says about a round (the ``metrics`` record of a train or ``masked_input`` reply).

    Only values that are assigned or coarse: ``num_examples`` is the weight the coordinator assigned
    (``local_steps × batch_size``), never the size of a Poisson draw; ``steps`` the assigned local steps;
    ``train_loss`` the mean train loss clipped and rounded to a public grid, only from a contributor whose policy
    reports it (``None``: not sent); ``epsilon`` the ε spent so far, rounded up to a public grid
    (:mod:`fedtune.privacy.release`). No token or sample count, shard size or wall time: those are functions of
    the private data (the coordinator times the round trip itself).
    """

    num_examples: int
    steps: int
    train_loss: float | None = None  # sent only when the contributor's policy says so
    epsilon: float | None = None  # ε spent so far, when the contributor trains with DP-SGD

    def to_record(self) -> MetricRecord:
        return MetricRecord(
            {
                NUM_EXAMPLES: self.num_examples,
                STEPS: self.steps,
                **({} if self.train_loss is None else {TRAIN_LOSS: self.train_loss}),
                DECLINED: 0,
                **({} if self.epsilon is None else {EPSILON: self.epsilon}),
            }
        )

    @classmethod
    def from_record(cls, record: MetricRecord, where: str = METRICS) -> TrainReport:
        report = cls(
            num_examples=_field(record, NUM_EXAMPLES, int, where),
            steps=_field(record, STEPS, int, where),
            train_loss=_field(record, TRAIN_LOSS, float, where, None),
            epsilon=_field(record, EPSILON, float, where, None),
        )
        if report.num_examples <= 0 or report.steps < 0:
            raise WireError(f"{where}: a negative {STEPS!r} or a non-positive {NUM_EXAMPLES!r}")
        return report


@dataclass(frozen=True)
class TrainReply:
    """A trained contributor's answer to a plain round: its new adapter, what it did, and who it is."""

    arrays: ArrayRecord
    report: TrainReport
    contributor: ContributorInfo

    def content(self) -> RecordDict:
        return RecordDict(
            {ARRAYS: self.arrays, METRICS: self.report.to_record(), CONTRIBUTOR: self.contributor.to_record()}
        )

    @classmethod
    def read(cls, content: RecordDict, like: ArrayRecord | None = None) -> TrainReply:
        """Parse a train reply; with ``like`` (the request's adapter), its tensors must match it exactly."""
        where = "train reply"
        arrays = _part(content, ARRAYS, ArrayRecord, where)
        if like is not None:
            check_like(arrays, like, where)
        report = TrainReport.from_record(_part(content, METRICS, MetricRecord, where), f"{where}: {METRICS}")
        return cls(arrays, report, ContributorInfo.read(content, where))


@dataclass(frozen=True)
class Decline:
    """A contributor's refusal to train this round (foreign base, policy, spent budget, ...), with its reason.

    The reason names no private number (the contributor keeps the details); ``epsilon`` is the coarse ε spent so
    far, when the contributor declines for its budget.
    """

    reason: str
    contributor: ContributorInfo
    epsilon: float | None = None

    def content(self) -> RecordDict:
        metrics = {DECLINED: 1, NUM_EXAMPLES: 0} | ({} if self.epsilon is None else {EPSILON: self.epsilon})
        return RecordDict(
            {
                METRICS: MetricRecord(metrics),
                REASON: ConfigRecord({REASON_TEXT: self.reason}),
                CONTRIBUTOR: self.contributor.to_record(),
            }
        )

    @classmethod
    def read(cls, content: RecordDict) -> Decline:
        where = "decline reply"
        metrics = _part(content, METRICS, MetricRecord, where)
        return cls(
            reason=_field(_part(content, REASON, ConfigRecord, where), REASON_TEXT, str, f"{where}: {REASON}"),
            contributor=ContributorInfo.read(content, where),
            epsilon=_field(metrics, EPSILON, float, f"{where}: {METRICS}", None),
        )

    @staticmethod
    def is_decline(content: RecordDict) -> bool:
        """Whether a reply says ``declined = 1`` (then read it with :meth:`read`)."""
        if METRICS not in content.metric_records:
            return False
        return bool(_field(content.metric_records[METRICS], DECLINED, int, f"reply: {METRICS}", 0))


# -- the work a contributor took on -------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """The LoRA rank and batch size a contributor trained with (the ``work`` record of a plain train reply).

    A contributor may take on less than the campaign assigns (a smaller GPU: a smaller rank, a smaller batch);
    its update is padded to the campaign's shape either way. The coordinator reads this as a claim of work, bounded
    by the campaign here and checked against the reply by the round driver; a reply without it trained the
    campaign's own rank and batch.
    """

    rank: int
    batch_size: int

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({WORK_RANK: self.rank, WORK_BATCH_SIZE: self.batch_size})

    @classmethod
    def read(cls, content: RecordDict, cfg: CampaignConfig, where: str = "train reply") -> Work | None:
        """The reply's work claim, or ``None`` when it has none; out of the campaign's bounds is a WireError."""
        work = cls.parse(content, where)
        if work is not None:
            work.check(cfg, where)
        return work

    @classmethod
    def parse(cls, content: RecordDict, where: str) -> Work | None:
        """The claim as sent (well-formed, not yet bounded by a campaign), or ``None`` when there is none."""
        if WORK not in content:
            return None
        record = _part(content, WORK, ConfigRecord, where)
        at = f"{where}: {WORK}"
        return cls(_field(record, WORK_RANK, int, at), _field(record, WORK_BATCH_SIZE, int, at))

    def check(self, cfg: CampaignConfig, where: str = "train reply", num_examples: int | None = None) -> None:
        """Raises :class:`WireError` unless the claim is within the campaign's rank and batch (and, given the
        reported ``num_examples``, unless that is the claimed batch times the campaign's local steps)."""
        if not 1 <= self.rank <= cfg.lora.rank or not 1 <= self.batch_size <= cfg.federation.batch_size:
            raise WireError(
                f"{where}: {WORK}: rank {self.rank} / batch {self.batch_size} outside the campaign's "
                f"1..{cfg.lora.rank} / 1..{cfg.federation.batch_size}"
            )
        steps = cfg.federation.local_steps
        if num_examples is not None and num_examples != steps * self.batch_size:
            raise WireError(
                f"{where}: {WORK}: batch {self.batch_size} × {steps} steps, but {num_examples} examples reported"
            )


# -- SecAgg+ stages ----------------------------------------------------------------------------------


def secagg_action(stage: str) -> str:
    """The ClientApp action of a SecAgg+ stage: the contributor registers ``@app.train(secagg_action(stage))``."""
    return f"secagg_{stage}"


def secagg_message_type(stage: str) -> str:
    """The Flower message type the coordinator sends a SecAgg+ stage with (``train.secagg_<stage>``)."""
    return f"{MessageType.TRAIN}.{secagg_action(stage)}"


def _secagg_records(msg: Mapping[str, Any]) -> RecordDict:
    """A protocol message as Flower records: numpy fields in an ArrayRecord, the rest in a ConfigRecord."""
    arrays = {k: v for k, v in msg.items() if isinstance(v, np.ndarray)}
    content = RecordDict({SECAGG: ConfigRecord({k: v for k, v in msg.items() if k not in arrays})})
    if arrays:
        content[SECAGG_ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return content


def _secagg_message(content: RecordDict, stage: str, where: str, reply: bool) -> dict[str, Any]:
    """Inverse of :func:`_secagg_records`, with the header (campaign, round, stage, sender) checked."""
    msg = dict(_part(content, SECAGG, ConfigRecord, where))
    if SECAGG_ARRAYS in content.array_records:
        msg.update({k: a.numpy() for k, a in content.array_records[SECAGG_ARRAYS].items()})
    _field(msg, "campaign_id", str, where)
    _field(msg, "round", int, where)
    if _field(msg, "stage", str, where) != stage:
        raise WireError(f"{where}: stage {msg['stage']!r}, expected {stage!r}")
    if reply:
        _field(msg, "sender", int, where)
    return msg


@dataclass(frozen=True)
class SecAggRequest:
    """The coordinator's message of one SecAgg+ stage; the ``advertise`` one also carries the train request.

    Parameters
    ----------
    msg : dict
        The protocol message (:mod:`fedtune.secagg.protocol`, whose ``view`` stage carries the key directory),
        plus :data:`SECAGG_WEIGHT_MAX` in ``advertise``.
    train : TrainRequest, optional
        ``advertise`` only: the round's train request (contributors train in that stage).
    """

    msg: dict[str, Any]
    train: TrainRequest | None = None

    @property
    def stage(self) -> str:
        return str(self.msg["stage"])

    def content(self) -> RecordDict:
        content = _secagg_records(self.msg)
        if self.train is not None:
            content[ARRAYS], content[CONFIG] = self.train.arrays, self.train.config()
        return content

    @classmethod
    def read(cls, content: RecordDict, stage: str) -> SecAggRequest:
        where = f"secagg {stage} request"
        msg = _secagg_message(content, stage, where, reply=False)
        if stage != SECAGG_ADVERTISE:
            return cls(msg)
        if not _field(msg, SECAGG_WEIGHT_MAX, float, where) > 0:
            raise WireError(f"{where}: field {SECAGG_WEIGHT_MAX!r} must be positive")
        return cls(msg, TrainRequest.read(content))


@dataclass(frozen=True)
class SecAggReply:
    """A contributor's answer to one SecAgg+ stage.

    ``advertise`` replies also say who the contributor is (and carry its identity key in ``msg``);
    ``masked_input`` replies also carry its :class:`TrainReport` (what it trained into the masked input) and,
    when it took on less than the campaign assigns, its :class:`Work` claim (unbounded here: the round driver
    checks it against the campaign).
    """

    msg: dict[str, Any]
    contributor: ContributorInfo | None = None
    report: TrainReport | None = None
    work: Work | None = None

    @property
    def sender(self) -> int:
        return int(self.msg["sender"])

    def content(self) -> RecordDict:
        content = _secagg_records(self.msg)
        if self.report is not None:
            content[METRICS] = self.report.to_record()
        if self.contributor is not None:
            content[CONTRIBUTOR] = self.contributor.to_record()
        if self.work is not None:
            content[WORK] = self.work.to_record()
        return content

    @classmethod
    def read(cls, content: RecordDict, stage: str) -> SecAggReply:
        where = f"secagg {stage} reply"
        msg = _secagg_message(content, stage, where, reply=True)
        if stage == SECAGG_ADVERTISE:
            if len(_field(msg, SECAGG_IDENTITY, bytes, where)) != 32:
                raise WireError(f"{where}: field {SECAGG_IDENTITY!r} must be a 32-byte Ed25519 public key")
            return cls(msg, ContributorInfo.read(content, where))
        if stage == SECAGG_MASKED_INPUT:
            report = TrainReport.from_record(_part(content, METRICS, MetricRecord, where), f"{where}: {METRICS}")
            return cls(msg, ContributorInfo.read(content, where), report, Work.parse(content, where))
        return cls(msg)


Reply = TrainReply | SecAggReply | Decline


def read_reply(content: RecordDict, stage: str | None = None, like: ArrayRecord | None = None) -> Reply:
    """A contributor's reply to a plain train request (``stage`` None) or to SecAgg+ ``stage``.

    A decline may answer a train request or ``advertise`` (the stage that trains), nothing else.

    Raises
    ------
    WireError
        When the reply is not a well-formed message of that kind.
    """
    if stage in (None, SECAGG_ADVERTISE) and Decline.is_decline(content):
        return Decline.read(content)
    return TrainReply.read(content, like) if stage is None else SecAggReply.read(content, stage)
