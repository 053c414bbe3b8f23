"""A contributor refuses a base model that is not the coordinator's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedtune.config import CampaignConfig
from fedtune.ml.model import FingerprintMismatch, base_fingerprint, check_fingerprint
from fedtune.ml.tiny import builtin_path

from ..conftest import small_campaign


def test_fingerprint_detects_changed_weights(tmp_path: Path) -> None:
    copy = tmp_path / "base"
    shutil.copytree(builtin_path("builtin:tiny-llama"), copy)
    cfg = CampaignConfig.from_dict(small_campaign(model={"name": str(copy)}))
    original = base_fingerprint(cfg.model)
    assert original == base_fingerprint(CampaignConfig.from_dict(small_campaign()).model)
    check_fingerprint(cfg.model, original)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(FingerprintMismatch, match="fingerprint .* the coordinator's is"):
        check_fingerprint(cfg.model, original)
