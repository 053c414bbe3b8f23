"""``fedtune sweep``'s grid: ``--set`` parsing, point names and order, validation of every point before any run."""

from __future__ import annotations

import pytest

from fedtune.config import ConfigError
from fedtune.research.sweep import Sweep, grid, parse_axis


def test_values_are_toml_and_bare_words_are_strings() -> None:
    assert parse_axis("privacy.target_epsilon=1,4,8").values == (1, 4, 8)
    assert parse_axis("federation.learning_rate=1e-3, 5e-3").values == (0.001, 0.005)
    assert parse_axis("lora.mode=ffa,lora").values == ("ffa", "lora")
    assert parse_axis('privacy.mechanism="none",dp-sgd').values == ("none", "dp-sgd")
    axis = parse_axis('lora.target_modules=[q_proj,v_proj],["q_proj"]')
    assert axis.values == (["q_proj", "v_proj"], ["q_proj"]) and axis.name == "lora.target_modules"


@pytest.mark.parametrize("spec", ["lora.rank", "rank=8", "lora.rank=", "=8"])
def test_malformed_set_is_refused(spec: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value1,value2"):
        parse_axis(spec)


def test_grid_order_and_names() -> None:
    points = grid([parse_axis("privacy.target_epsilon=1,8"), parse_axis("lora.rank=8,16")])
    assert [p.name for p in points] == [
        "privacy.target_epsilon=1_lora.rank=8",
        "privacy.target_epsilon=1_lora.rank=16",
        "privacy.target_epsilon=8_lora.rank=8",
        "privacy.target_epsilon=8_lora.rank=16",
    ]
    assert points[1].overrides() == {"privacy": {"target_epsilon": 1}, "lora": {"rank": 16}}


def test_every_point_is_validated_before_anything_runs(write_campaign, tmp_path) -> None:
    config = write_campaign()
    bad_key = Sweep(config, [parse_axis("lora.rnak=4,8")], tmp_path / "sweep", {})
    with pytest.raises(ConfigError, match=r"\[lora\] rnak"):
        bad_key.validate()
    bad_value = Sweep(config, [parse_axis("lora.rank=4,0")], tmp_path / "sweep", {})
    with pytest.raises(ConfigError, match=r"\[lora\] rank: expected an integer >= 1, found 0"):
        bad_value.validate()
    assert not (tmp_path / "sweep").exists()
    ok = Sweep(config, [parse_axis("lora.rank=4,8")], tmp_path / "sweep", {"federation": {"rounds": 1}})
    cfgs = ok.validate()
    assert [c.lora.rank for c in cfgs] == [4, 8] and {c.federation.rounds for c in cfgs} == {1}
    assert cfgs[0].campaign.run_dir == str(tmp_path / "sweep" / "points" / "lora.rank=4")
