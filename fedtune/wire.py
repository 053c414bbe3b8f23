"""Conversions between fedtune's objects and Flower records (what crosses the wire)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedtune.config import CampaignConfig


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def arrays_from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: arr.numpy() for name, arr in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (the tensors, not the framing)."""
    return sum(len(arr.data) for arr in record.values())


def campaign_to_record(cfg: CampaignConfig, **extra: int | float | str | bool) -> ConfigRecord:
    """The round config: the resolved campaign (as TOML) plus per-round values."""
    return ConfigRecord({"campaign-toml": cfg.to_toml(), **extra})


def campaign_from_record(record: ConfigRecord) -> tuple[str, CampaignConfig]:
    text = str(record["campaign-toml"])
    import tomllib

    return text, CampaignConfig.from_dict(tomllib.loads(text), source="<coordinator>")


@dataclass(frozen=True)
class Outcome:
    """What happened to one sampled node in a round."""

    node_id: int
    status: str  # included | declined | dropped | failed
    reason: str | None = None
    reply: Message | None = None


@dataclass(frozen=True)
class ContributorInfo:
    """Who a contributor says it is in its replies: a stable id, display name and team, declared peak FLOP/s."""

    id: str
    name: str
    team: str | None = None
    declared_peak_flops: float | None = None


def contributor_of(reply: Message) -> ContributorInfo | None:
    """The identity a contributor states in its reply (``contributor`` config record)."""
    if "contributor" not in reply.content.config_records:
        return None
    rec = reply.content["contributor"]
    peak = float(rec.get("peak-flops", 0.0)) or None
    team = str(rec.get("team", "")) or None
    return ContributorInfo(id=str(rec["id"]), name=str(rec["name"]), team=team, declared_peak_flops=peak)
