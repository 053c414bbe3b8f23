"""A contributor's local AdamW moments, carried from one of its rounds to the next on its own disk.

Job
    Each round a contributor runs ``local_steps`` AdamW steps from the shared adapter. Started cold, AdamW spends
    the first of those steps re-estimating its moments from a handful of batches, every round; a centralized run
    warms up once. :class:`OptimizerState` keeps the moments (``exp_avg``, ``exp_avg_sq``, ``step``) in
    ``STATE_DIR/local_optimizer.pt`` and hands them to the next round's optimizer, so a contributor's local
    training continues the way one long run would, while the parameters still restart from the shared adapter
    (measured on the quickstart, ``bench/bench_quality.py``: README's Performance section).

Threat
    The moments are computed from the contributor's gradients: they stay on the contributor's disk, next to its
    shard, and nothing here is ever sent. Under DP-SGD they are computed from the clipped, noised gradients only,
    so they are post-processing and cost no ε. The coordinator cannot point them anywhere: the path is the
    contributor's own state dir; all it can do is switch the carry-over off (``[federation]
    keep_optimizer_state``), which only costs quality.

Pitfalls
    - The moments belong to one campaign and one adapter shape: the file is keyed by the campaign's TOML digest and
      the trainable tensors' shapes; any other key starts cold (and the round's moments replace the file).
    - Only per-parameter state is restored, never ``param_groups``: the learning rate is this round's campaign's.
    - A damaged or foreign file is not a reason to skip a round: it is ignored (one warning) and overwritten.
    - Written with :func:`fedtune.files.atomic_write_bytes`, so a crash mid-write leaves the previous round's
      moments (``restore`` loads to the CPU; the optimizer moves them to its parameters' device).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtune.files import atomic_write_bytes

log = logging.getLogger("fedtune.optimizer_state")

STATE_FILE = "local_optimizer.pt"


@dataclass(frozen=True)
class OptimizerState:
    """Where one contributor's moments live and which campaign and adapter shape they belong to.

    Parameters
    ----------
    folder : Path
        The contributor's state dir (never a path the coordinator sends).
    key : str
        :meth:`key_for` of the campaign and the trainable tensors.
    """

    folder: Path
    key: str

    @staticmethod
    def key_for(campaign_toml: str, parameters: list[torch.Tensor]) -> str:
        shapes = ";".join("x".join(map(str, p.shape)) for p in parameters)
        return hashlib.sha256(f"{campaign_toml}\n{shapes}".encode()).hexdigest()

    @property
    def path(self) -> Path:
        return Path(self.folder) / STATE_FILE

    def restore(self, optimizer: torch.optim.Optimizer) -> bool:
        """Load the saved moments into ``optimizer`` (its parameter groups as they are); whether any were loaded."""
        if not self.path.is_file():
            return False
        cold = optimizer.state_dict()
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or saved.get("key") != self.key:
                return False
            optimizer.load_state_dict({"state": saved["state"], "param_groups": cold["param_groups"]})
        except Exception as exc:  # a damaged file must not cost the round: start cold, overwrite it afterwards
            log.warning("ignoring %s (%s): this round's optimizer starts cold", self.path, exc)
            optimizer.load_state_dict(cold)
            return False
        return True

    def save(self, optimizer: torch.optim.Optimizer) -> None:
        """Write ``optimizer``'s per-parameter moments (:func:`~fedtune.files.atomic_write_bytes`)."""
        buffer = io.BytesIO()
        torch.save({"key": self.key, "state": optimizer.state_dict()["state"]}, buffer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, buffer.getvalue())
