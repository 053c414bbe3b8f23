"""``--resume`` on damaged run dirs: the last intact round, damaged files moved aside, refusals that write nothing.

Run dirs are built by hand here (config, metrics lines, ``server_state.npz`` checkpoints), so no campaign runs;
``tests/e2e/test_interrupt_resume.py`` resumes real ones to the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune.cli import EXIT_BAD_INPUT, main
from fedtune.config import ConfigError, load_config
from fedtune.rundir import RunDir

from .test_bad_input import snapshot


@pytest.fixture
def run(tmp_path: Path, write_campaign) -> tuple[Path, RunDir]:
    """A 5-round campaign stopped after round 3: metrics and checkpoints of rounds 0-3."""
    config = write_campaign(federation={"rounds": 5})
    cfg = load_config(config)
    run_dir = RunDir(tmp_path / "run")
    cfg.campaign.run_dir = str(run_dir.root)
    run_dir.create(cfg.to_toml())
    for r in range(4):
        run_dir.checkpoint(r).mkdir(parents=True)
        np.savez(run_dir.server_state(r), **{"adapter/b": np.full(3, r, np.float32), "m_t/b": np.zeros(3)})
        run_dir.append_metrics({"round": r, "eval_loss": 5.0 - r / 10, "wall_s": 0.25 * r})
    return config, run_dir


def lines(run_dir: RunDir) -> list[bytes]:
    return run_dir.metrics.read_bytes().splitlines(keepends=True)


def damaged(run_dir: RunDir, pattern: str) -> list[Path]:
    return sorted(run_dir.root.rglob(pattern))


def test_intact_run_resumes_after_its_last_round(run) -> None:
    config, run_dir = run
    point = run_dir.resume_point()
    assert point is not None and point.round == 3 and [r["round"] for r in point.rows] == [0, 1, 2, 3]
    assert point.adapter["b"].tolist() == [3.0, 3.0, 3.0] and set(point.strategy_state) == {"m_t/b"}
    before = snapshot(run_dir.root)
    assert run_dir.check_resumable(load_config(config), config).apply() == []
    assert snapshot(run_dir.root) == before


def test_half_written_last_line(run) -> None:
    config, run_dir = run
    intact = lines(run_dir)
    with run_dir.metrics.open("ab") as fh:
        fh.write(b'{"round": 4, "eval_lo')
    original = run_dir.metrics.read_bytes()
    assert [r["round"] for r in run_dir.read_metrics()] == [0, 1, 2, 3]  # readers never crash on it
    notes = run_dir.check_resumable(load_config(config), config).apply()
    assert len(notes) == 1 and "metrics.jsonl after round 3" in notes[0] and "damaged" in notes[0]
    assert lines(run_dir) == intact  # completed rounds byte-identical
    (aside,) = damaged(run_dir, "metrics.jsonl.damaged-*")
    assert aside.read_bytes() == original and str(aside) in notes[0]
    assert run_dir.resume_point().round == 3


def test_garbage_in_the_middle_of_metrics(run) -> None:
    config, run_dir = run
    kept = lines(run_dir)[:2]
    run_dir.metrics.write_bytes(b"".join([*kept, b"\x00\xffgarbage\n", *lines(run_dir)[3:]]))
    notes = run_dir.check_resumable(load_config(config), config).apply()
    assert "after round 1" in notes[0]
    assert lines(run_dir) == kept
    assert run_dir.resume_point().round == 1


def test_corrupt_server_state_falls_back_a_round(run) -> None:
    config, run_dir = run
    state = run_dir.server_state(3)
    state.write_bytes(state.read_bytes()[:-40])
    kept = lines(run_dir)[:3]
    notes = run_dir.check_resumable(load_config(config), config).apply()
    assert any("checkpoint of round 3" in n for n in notes) and any("after round 2" in n for n in notes)
    assert lines(run_dir) == kept
    assert not run_dir.checkpoint(3).exists() and len(damaged(run_dir, "round-3.damaged-*")) == 1
    point = run_dir.resume_point()
    assert point.round == 2 and point.adapter["b"].tolist() == [2.0, 2.0, 2.0]


def test_append_keeps_earlier_lines_as_written(run) -> None:
    _, run_dir = run
    run_dir.metrics.write_bytes(b'{"round": 0,   "eval_loss": 5.0}\n')  # not how json.dumps would write it
    run_dir.append_metrics({"round": 1, "eval_loss": 4.0})
    assert lines(run_dir)[0] == b'{"round": 0,   "eval_loss": 5.0}\n'


# ------------------------------------------------------------------------------ refusals through the CLI


def refuse_resume(capsys, tmp_path: Path, config: Path, run_dir: Path, *extra: str) -> str:
    before = snapshot(tmp_path)
    code = main(["simulate", str(config), "--run-dir", str(run_dir), "--resume", *extra])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "--resume" in err, err
    assert snapshot(tmp_path) == before, "a refused --resume must not change the run dir"
    return err


def test_resume_without_any_checkpoint_is_refused(capsys, tmp_path, run) -> None:
    """It used to recompute and rewrite rounds 0-3 silently."""
    config, run_dir = run
    for r in range(4):
        run_dir.server_state(r).unlink()
    line = refuse_resume(capsys, tmp_path, config, run_dir.root)
    assert "rounds 0-3 recorded" in line and "nothing to resume from" in line


def test_resume_with_changed_campaign_is_refused(capsys, tmp_path, run, write_campaign) -> None:
    """It used to overwrite RUN/config.toml, then crash."""
    _, run_dir = run
    changed = write_campaign("changed.toml", federation={"rounds": 5}, lora={"rank": 8})
    line = refuse_resume(capsys, tmp_path, changed, run_dir.root)
    assert "[lora] rank 4 -> 8" in line and str(run_dir.config) in line


def test_resume_of_a_missing_run_dir_is_refused(capsys, tmp_path, write_campaign) -> None:
    """It used to start a fresh run silently."""
    line = refuse_resume(capsys, tmp_path, write_campaign(), tmp_path / "never-ran")
    assert "nothing at that path" in line
    assert not (tmp_path / "never-ran").exists()


def test_resume_to_fewer_rounds_than_completed_is_refused(capsys, tmp_path, run) -> None:
    config, run_dir = run
    line = refuse_resume(capsys, tmp_path, config, run_dir.root, "--rounds", "2")
    assert "rounds already completed" in line


def test_check_resumable_raises_config_error(run) -> None:
    config, run_dir = run
    run_dir.config.unlink()
    with pytest.raises(ConfigError, match="no config.toml in it"):
        run_dir.check_resumable(load_config(config), config)
