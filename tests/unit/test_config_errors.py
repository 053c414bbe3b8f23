"""Bad campaign input: one ``error:`` line naming file and key, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.cli import EXIT_BAD_INPUT, main

from ..conftest import small_campaign


def run_bad(capsys: pytest.CaptureFixture[str], path: Path, tmp_path: Path) -> str:
    run_dir = tmp_path / "out"
    code = main(["simulate", str(path), "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT
    assert not run_dir.exists(), "a rejected campaign must not create its run dir"
    assert not (tmp_path / "run").exists()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(path) in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("sections", "key", "expected"),
    [
        ({"lora": {"rnak": 8}}, "[lora] rnak", "one of the keys"),
        ({"lora": {"rank": "eight"}}, "[lora] rank", "expected an integer, found 'eight'"),
        ({"lora": {"mode": "qlora"}}, "[lora] mode", "expected one of 'ffa', 'lora'"),
        ({"federation": {"learning_rate": "fast"}}, "[federation] learning_rate", "expected a number"),
        ({"federation": {"rounds": 0}}, "[federation] rounds", "an integer >= 1"),
        ({"federation": {"server_optimizer": "sgd"}}, "[federation] server_optimizer", "'fedadam'"),
        ({"federation": {"min_cohort": 5}}, "[federation] min_cohort", "at most contributors_per_round"),
        ({"federation": {"min_learning_rate": 0.02}}, "[federation] min_learning_rate", "[0, learning_rate = 0.01]"),
        ({"federation": {"lr_schedule": "step"}}, "[federation] lr_schedule", "'cosine'"),
        ({"data": {"source": "missing/shard.jsonl"}}, "[data] source", "an existing data file"),
        ({"data": {"format": "instruction"}}, "[data] source", "needs field(s) ['instruction', 'response']"),
        ({"simulation": {"partitioner": "shards"}}, "[simulation] partitioner", "'dirichlet'"),
        ({"lora": {"target_modules": "q_proj"}}, "[lora] target_modules", "a list of strings"),
    ],
)
def test_bad_key_is_named(capsys, tmp_path, write_campaign, sections, key, expected) -> None:
    line = run_bad(capsys, write_campaign(**sections), tmp_path)
    assert key in line and expected in line, line


def test_unknown_section(capsys, tmp_path, write_campaign) -> None:
    raw = small_campaign()
    raw["privacyy"] = {"epsilon": 8}
    line = run_bad(capsys, write_campaign(raw=raw), tmp_path)
    assert "[privacyy]" in line and "unknown section" in line


def test_model_dir_without_weights(capsys, tmp_path, write_campaign) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    line = run_bad(capsys, write_campaign(model={"name": str(model_dir)}), tmp_path)
    assert "[model] name" in line and "with weights" in line


def test_missing_model_dir(capsys, tmp_path, write_campaign) -> None:
    line = run_bad(capsys, write_campaign(model={"name": "./no-such-model"}), tmp_path)
    assert "[model] name" in line and "a model directory" in line


def test_invalid_toml_and_missing_file(capsys, tmp_path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[lora\nrank = 8\n")
    assert "(syntax)" in run_bad(capsys, broken, tmp_path)
    assert "(file)" in run_bad(capsys, tmp_path / "absent.toml", tmp_path)
