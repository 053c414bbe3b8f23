"""A contributor's workspace for a round: its hardware check, its own rank and batch, and the cached model and shard.

Job
    :func:`open_workspace` is what :func:`fedtune.clients.app.local_update` calls before training. It checks the
    campaign's ``[requirements]`` (and what ``[model] dtype``/``quantization`` imply) against this contributor's
    hardware, picks the work this contributor takes on (:class:`LocalChoice`: a LoRA rank ≤ the campaign's, a
    batch ≤ the campaign's, micro-batches that fit its memory), and hands out the model and shard from a
    per-process :class:`WorkspaceCache`. The :class:`Workspace` it returns converts the shared adapter to the
    contributor's rank (:meth:`Workspace.to_local`) and its trained adapter back to the campaign's shape
    (:meth:`Workspace.to_campaign`).

    Heterogeneous ranks (FFA-LoRA): a contributor of rank r trains the first r columns of B against the first r
    rows of the campaign's frozen A (HetLoRA-style truncation, Cho et al. 2024). PEFT scales LoRA by α/r, so the
    shared B's first r columns are multiplied by (α/R)/(α/r) on the way in, and the local change of B by
    (α/r)/(α/R) on the way out, then zero-padded to R columns and added to the shared B: the upload has the
    campaign's full shape (plain and SecAgg+ aggregation are unchanged) and its ΔW = (α/R)·(B' − B)·A is exactly
    the contributor's own ΔW_i, so the example-weighted average of the uploads is the exact weighted mean of ΔW_i.

Threat
    The coordinator chooses the campaign; the contributor's choices (node config ``max-rank``, ``batch-size``,
    ``micro-batch``, set by ``fedtune join``) only ever lower the work, and its hardware is checked on its own
    machine (``STATE_DIR/hardware.json`` written by ``fedtune join``, or a local probe), so a campaign its GPU cannot
    run is declined with a reason rather than crashing mid-round. The coordinator learns the rank and batch only
    as the work this contributor claims (:class:`fedtune.wire.Work`), which it bounds by the campaign and checks.

Pitfalls
    - The cache is per process (a Ray actor in simulation serves many virtual contributors): models are keyed by
      what builds them (campaign, rank, device), not by contributor, because a round overwrites every trainable
      tensor and builds a fresh optimizer; shards are keyed by partition. Neither is cleared on a miss: both are
      LRU-bounded (:data:`MAX_MODELS` models, :data:`MAX_SHARDS` shards per process).
    - Plain LoRA (``[lora] mode = "lora"``) trains A too, so ranks cannot mix: a smaller rank is refused there.
    - Micro-batching changes memory, not the step: same logical batch, same accounting, one noise draw per batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.config import CampaignConfig, parse_capability
from fedtune.ml.data import TokenizedSet, load_shard
from fedtune.ml.model import QuantizationUnavailable, build_model, lora_scaling, quantization_config
from fedtune.ml.precision import Precision
from fedtune.wire import Work

from .join_checks import NODE_BATCH_SIZE, NODE_MAX_RANK, NODE_MICRO_BATCH
from .policy import SIMULATION_STATE_ROOT_ENV, own_data

log = logging.getLogger("fedtune.client")

MAX_MODELS = 2
"""Models kept per process (distinct ranks or campaigns); each is a full copy of the base plus its adapter."""
MAX_SHARDS = 16
"""Tokenized shards kept per process (virtual contributors an actor serves in turn)."""
HARDWARE_FILE = "hardware.json"
WORKSPACE_STATS_DIR = "workspaces"
"""Under a simulation's state root: one ``HOST-PID.json`` per process with its cache's counters."""
GIB = 2**30


@dataclass(frozen=True)
class LocalChoice:
    """The work this contributor takes on in a round: all at most what the campaign assigns."""

    rank: int
    batch_size: int
    micro_batch_size: int = 0  # 0: the whole batch at once


def _node_int(node: Mapping[str, Any], key: str) -> int | None:
    value = node.get(key)
    if value is None or value == "" or int(value) <= 0:
        return None
    return int(value)


def local_choice(cfg: CampaignConfig, node_config: Mapping[str, Any], partition_id: int) -> LocalChoice | str:
    """This contributor's rank, batch and micro-batch (node config, else ``[simulation]`` tables), or why not.

    Values above the campaign's are lowered to it: a contributor can take on less work, never more.
    """
    pid = str(partition_id)
    sim, fed, lora = cfg.simulation, cfg.federation, cfg.lora
    rank = _node_int(node_config, NODE_MAX_RANK) or sim.max_rank.get(pid) or lora.rank
    batch = _node_int(node_config, NODE_BATCH_SIZE) or sim.batch_size.get(pid) or fed.batch_size
    micro = _node_int(node_config, NODE_MICRO_BATCH) or sim.micro_batch_size.get(pid) or fed.micro_batch_size
    rank, batch = min(rank, lora.rank), min(batch, fed.batch_size)
    if rank < lora.rank and lora.mode != "ffa":
        return (
            f"this contributor trains at most rank {rank}, the campaign's plain LoRA (mode 'lora') needs rank "
            f"{lora.rank}: smaller ranks only aggregate exactly in mode 'ffa'"
        )
    return LocalChoice(rank=rank, batch_size=batch, micro_batch_size=micro if micro < batch else 0)


# -- hardware ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """What the requirements are checked against: the training device and what it offers."""

    device: str
    vram_bytes: int = 0
    compute_capability: str = ""
    bf16: bool = True
    ram_bytes: int = 0
    name: str = ""

    @classmethod
    def from_probe(cls, info: Mapping[str, Any]) -> Hardware:
        """From :meth:`fedtune.clients.hardware.HardwareInfo.as_dict` (what ``hardware.json`` holds)."""
        device = str(info.get("device", "cpu"))
        gpus = list(info.get("gpus") or [])
        if device.startswith("cuda") and gpus:
            gpu = gpus[0]
            return cls(
                device,
                int(gpu.get("vram_bytes", 0)),
                str(gpu.get("compute_capability", "")),
                bool(gpu.get("bf16", False)),
                int(info.get("ram_bytes", 0)),
                str(gpu.get("name", "")),
            )
        return cls("cpu", bf16=True, ram_bytes=int(info.get("ram_bytes", 0)), name=str(info.get("cpu_model", "")))

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


_PROBED: dict[str, Hardware] = {}


def contributor_hardware(node_config: Mapping[str, Any]) -> Hardware:
    """``STATE_DIR/hardware.json`` (``fedtune join`` probes the machine and writes it), else a local probe.

    In simulation there is no state dir: the virtual contributors run on this machine, so it is probed (once
    per process) for the device the node config names.
    """
    state = str(node_config.get("state-dir", ""))
    if state and (Path(state) / HARDWARE_FILE).is_file():
        return Hardware.from_probe(json.loads((Path(state) / HARDWARE_FILE).read_text(encoding="utf-8")))
    device = str(node_config.get("device", "cpu"))
    if device not in _PROBED:
        from .hardware import probe

        dev = torch.device(device)
        gpu = (dev.index or 0) if dev.type == "cuda" else None
        _PROBED[device] = Hardware.from_probe(probe(gpu).as_dict())
    return _PROBED[device]


def unmet_requirements(cfg: CampaignConfig, hw: Hardware) -> str | None:
    """Why this hardware cannot take the campaign's rounds (one line), or ``None`` when it can.

    Checks ``[requirements]`` and what the model section implies: float16 needs CUDA, bfloat16 on a GPU needs
    compute capability ≥ 8.0, a quantized base needs bitsandbytes.
    """
    req, where = cfg.requirements, f"this contributor's {hw.name or hw.device}"
    if req.gpu and not hw.cuda:
        return f"requirements: a CUDA GPU; {where} is not one"
    if req.min_vram_gb > 0 and hw.vram_bytes < req.min_vram_gb * GIB:
        return f"requirements: at least {req.min_vram_gb:g} GiB of GPU memory; {where} has {hw.vram_bytes / GIB:.1f}"
    if req.min_compute_capability:
        need, have = parse_capability(req.min_compute_capability), parse_capability(hw.compute_capability)
        if have is None or need is None or have < need:
            found = hw.compute_capability or "none (no GPU)"
            return f"requirements: compute capability >= {req.min_compute_capability}; {where} has {found}"
    if (req.bf16 or cfg.model.dtype == "bfloat16") and not hw.bf16:
        return f"requirements: bfloat16 support; {where} has none (compute capability {hw.compute_capability})"
    if req.min_ram_gb > 0 and hw.ram_bytes < req.min_ram_gb * GIB:
        return f"requirements: at least {req.min_ram_gb:g} GiB of RAM; {where} has {hw.ram_bytes / GIB:.1f}"
    if (reason := Precision.of(cfg.model.dtype, "cuda" if hw.cuda else "cpu").unsupported()) is not None:
        return reason
    try:
        quantization_config(cfg.model)
    except QuantizationUnavailable as exc:
        return str(exc)
    return None


# -- the cache ---------------------------------------------------------------------------------------


@dataclass
class WorkspaceCache:
    """Models and shards kept between rounds in one long-lived process, LRU-bounded, never cleared on a miss.

    ``enabled=False`` reproduces the cache fedtune had before: one (model, shard) pair keyed by contributor and
    rebuilt whenever the process serves another one (``[simulation] workspace_cache = false``, for benchmarks).
    """

    max_models: int = MAX_MODELS
    max_shards: int = MAX_SHARDS
    models: OrderedDict[tuple, tuple[Any, Any]] = field(default_factory=OrderedDict)
    shards: OrderedDict[tuple, TokenizedSet] = field(default_factory=OrderedDict)
    counts: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("build_model", "load_shard", "model_hits", "shard_hits", "rounds", "build_model_s", "load_shard_s"), 0
        )
    )

    def model(self, key: tuple, build: Callable[[], tuple[Any, Any]], capacity: int) -> tuple[Any, Any]:
        """The (model, tokenizer) cached under ``key``, built on a miss (evicting the least recently used)."""
        return self._get(self.models, key, build, capacity, "build_model", "model_hits")

    def shard(self, key: tuple, load: Callable[[], TokenizedSet], capacity: int) -> TokenizedSet:
        return self._get(self.shards, key, load, capacity, "load_shard", "shard_hits")

    def _get(self, table: OrderedDict, key: tuple, make: Callable[[], Any], capacity: int, miss: str, hit: str) -> Any:
        if key in table:
            table.move_to_end(key)
            self.counts[hit] += 1
            return table[key]
        while len(table) >= capacity:
            table.popitem(last=False)
        self.counts[miss] += 1
        start = time.perf_counter()
        table[key] = make()
        self.counts[f"{miss}_s"] += time.perf_counter() - start
        return table[key]

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "models_cached": len(self.models),
            "shards_cached": len(self.shards),
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
        }


CACHE = WorkspaceCache()
"""This process's cache (a Ray actor's in simulation, the contributor's own when deployed)."""


@dataclass
class Workspace:
    """One round's model, shard and local choice, with the conversions between campaign and local adapter."""

    cfg: CampaignConfig
    model: Any
    shard: TokenizedSet
    choice: LocalChoice
    precision: Precision

    @property
    def device(self) -> torch.device:
        return next(p for p in self.model.parameters() if p.requires_grad).device

    @property
    def batch_size(self) -> int:
        return self.choice.batch_size

    def work(self) -> Work:
        """The work claimed in the reply: the rank and batch trained with."""
        return Work(rank=self.choice.rank, batch_size=self.choice.batch_size)

    def train_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`fedtune.clients.trainer.train_local` this workspace decides."""
        return {
            "batch_size": self.choice.batch_size,
            "micro_batch_size": self.choice.micro_batch_size,
            "precision": self.precision,
        }

    def _factor(self) -> float:
        """(α/R) / (α/r): campaign scaling over local scaling."""
        lora = self.cfg.lora
        return lora_scaling(lora) / lora_scaling(lora, self.choice.rank)

    def to_local(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The shared adapter as this contributor's rank-r adapter: B's first r columns, rescaled to α/r."""
        if self.choice.rank == self.cfg.lora.rank:
            return dict(arrays)
        factor, r = self._factor(), self.choice.rank
        return {k: (v[:, :r] * factor).astype(v.dtype) if "lora_B" in k else v for k, v in arrays.items()}

    def to_campaign(
        self, start: Mapping[str, np.ndarray], end_local: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The trained rank-r adapter as an update of the campaign's: the shared ``start`` plus the local change
        of B, rescaled back to α/R and zero-padded to the campaign's rank."""
        if self.choice.rank == self.cfg.lora.rank:
            return dict(end_local)
        local_start, factor, r = self.to_local(start), self._factor(), self.choice.rank
        out = {}
        for k, v in start.items():
            full = np.array(v, copy=True)
            if "lora_B" in k:
                full[:, :r] += ((end_local[k] - local_start[k]) / factor).astype(full.dtype)
            out[k] = full
        return out


def _campaign_key(campaign_toml: str) -> str:
    return hashlib.sha256(campaign_toml.encode()).hexdigest()


def _write_stats(state_root: str, node_config: Mapping[str, Any]) -> None:
    """Simulation: this process's cache counters under ``RUN/contributors/workspaces/`` (read by tests, bench).

    ``state_root`` is the local simulation launcher's contributor folder (never a path from a message).
    """
    if not state_root or "state-dir" in node_config:
        return
    folder = Path(state_root) / WORKSPACE_STATS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{socket.gethostname()}-{os.getpid()}.json"
    partial = target.with_suffix(".partial")  # renamed into place, not fsynced: counters, not state
    partial.write_text(json.dumps(CACHE.stats(), sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, target)


def open_workspace(
    cfg: CampaignConfig,
    campaign_toml: str,
    node_config: Mapping[str, Any],
    partition: tuple[int, int],
    choice: LocalChoice,
) -> Workspace | str:
    """This round's workspace, or the one-line reason this contributor declines (hardware).

    Parameters
    ----------
    cfg : CampaignConfig
        The campaign as this contributor runs it (its own data source already set).
    campaign_toml : str
        The campaign as the coordinator sent it (the cache key).
    node_config : mapping
        The contributor's node config: ``device``, ``state-dir``, ``max-rank``, ``batch-size``, ``micro-batch``.
    partition : (int, int)
        Partition id and count from the node config (a deployed contributor: all of its own data, (0, 1), unless a
        benchmark starts several on one file).
    choice : LocalChoice
        The rank, batch and micro-batch this contributor takes on (:func:`local_choice`, checked by the caller
        against its work caps).
    """
    partition_id, num_partitions = partition
    if (reason := unmet_requirements(cfg, contributor_hardware(node_config))) is not None:
        return reason
    device = str(node_config.get("device", "cpu"))
    campaign = _campaign_key(campaign_toml)
    own = own_data(node_config)
    hold_out = not (own and cfg.data.source == own)  # the contributor's own --data: all of it trains
    shard_key = (campaign, partition_id, num_partitions, cfg.data.source, hold_out)
    if cfg.simulation.workspace_cache:
        model_key, models, shards = (campaign, choice.rank, device), CACHE.max_models, CACHE.max_shards
    else:  # fedtune's former cache: one contributor's model and shard, rebuilt when another one comes
        model_key, models, shards = (campaign, choice.rank, device, partition_id, num_partitions), 1, 1
    model, tokenizer = CACHE.model(model_key, lambda: build_model(cfg, device, rank=choice.rank), models)
    shard = CACHE.shard(shard_key, lambda: load_shard(cfg, tokenizer, partition_id, num_partitions, hold_out), shards)
    CACHE.counts["rounds"] += 1
    _write_stats(os.environ.get(SIMULATION_STATE_ROOT_ENV, ""), node_config)
    return Workspace(cfg, model, shard, choice, Precision.of(cfg.model.dtype, device))
