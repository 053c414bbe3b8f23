"""Bad input to ``fedtune simulate``: one ``error:`` line naming file and key, exit code 2, nothing on disk.

Every case here used to pass validation and then crash with a traceback after the run dir existed (or to be
slow to say so). None of them may start Ray: they are answered by :mod:`fedtune.preflight` (or earlier).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.cli import EXIT_BAD_INPUT, main

from ..conftest import run_python


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (``None`` for folders): what "nothing written" compares."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def refuse(capsys: pytest.CaptureFixture[str], tmp_path: Path, config: Path, *extra: str) -> str:
    """Run ``simulate`` and check the promise: exit 2, one ``error:`` line naming the file, disk unchanged."""
    before = snapshot(tmp_path)
    args = ["simulate", str(config), *extra]
    if "--run-dir" not in extra:
        args += ["--run-dir", str(tmp_path / "out")]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(config) in lines[0]
    assert snapshot(tmp_path) == before, "a rejected campaign must not write anything"
    return lines[0]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ speed, run dir


def test_missing_campaign_file_answers_fast_without_heavy_imports(tmp_path: Path) -> None:
    """Flower, Ray, datasets and transformers used to load before the file was even opened (9.5 s)."""
    code = (
        "import sys, time\n"
        "from fedtune.cli import main\n"
        f"rc = main(['simulate', {str(tmp_path / 'missing.toml')!r}])\n"
        "heavy = sorted(m for m in ('torch', 'datasets', 'transformers', 'flwr', 'ray') if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "nothing at that path" in proc.stderr
    assert elapsed < 2.0, f"simulate on a missing file took {elapsed:.2f} s"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("run_dir", "expected"),
    [
        ("campaign.toml", "a directory, not a file"),
        ("campaign.toml/run", "campaign.toml is a file"),
        ("/", "below the filesystem root"),
        ("/proc/fedtune-run", "a directory fedtune can create and write"),
        ("/sys/fedtune-run", "a directory fedtune can create and write"),
    ],
)
def test_unusable_run_dir(capsys, tmp_path, write_campaign, run_dir: str, expected: str) -> None:
    config = write_campaign()
    target = run_dir if run_dir.startswith("/") else str(tmp_path / run_dir)
    line = refuse(capsys, tmp_path, config, "--run-dir", target)
    assert "--run-dir" in line and expected in line, line
    assert not Path("/proc/fedtune-run").exists() and not Path("/sys/fedtune-run").exists()


def test_read_only_run_dir(tmp_path: Path, write_campaign) -> None:
    """A read-only mount (made in a private mount namespace, so nothing outlives the test)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    config = write_campaign()
    mount = tmp_path / "ro"
    mount.mkdir()
    script = (
        f"mount -t tmpfs -o ro,size=1m tmpfs {mount} || exit 77; "
        f"exec {sys.executable} -m fedtune.cli simulate {config} --run-dir {mount / 'run'}"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    if proc.returncode == 77 or "unshare failed" in proc.stderr or "Operation not permitted" in proc.stderr[:200]:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--run-dir" in lines[0] and "Read-only file system" in lines[0], proc.stderr
    assert not list(mount.iterdir())


# ----------------------------------------------------------------------------------------------- the model


def test_hub_model_offline(capsys, tmp_path, write_campaign) -> None:
    line = refuse(capsys, tmp_path, write_campaign(model={"name": "someorg/not-cached-model"}))
    assert "[model] name" in line and "HF_HUB_OFFLINE" in line and "someorg/not-cached-model" in line


def test_unknown_builtin_model(capsys, tmp_path, write_campaign) -> None:
    line = refuse(capsys, tmp_path, write_campaign(model={"name": "builtin:huge-llama"}))
    assert "[model] name" in line and "builtin:tiny-llama" in line and "builtin:huge-llama" in line


def test_quantized_base_without_bitsandbytes(capsys, tmp_path, write_campaign, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # how Python marks a package as not importable
    line = refuse(capsys, tmp_path, write_campaign(model={"name": "builtin:tiny-llama", "quantization": "4bit"}))
    assert "[model] quantization" in line and "bitsandbytes" in line and "'4bit'" in line


def test_model_config_json_is_not_json(capsys, tmp_path, write_campaign) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    (model / "model.safetensors").write_bytes(b"")
    line = refuse(capsys, tmp_path, write_campaign(model={"name": str(model)}))
    assert "[model] name" in line and "config.json transformers can read" in line


def test_truncated_weights(capsys, tmp_path, write_campaign) -> None:
    from fedtune.ml.tiny import builtin_path

    model = tmp_path / "model"
    shutil.copytree(builtin_path("builtin:tiny-llama"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = refuse(capsys, tmp_path, write_campaign(model={"name": str(model)}))
    assert "[model] name" in line and "weight files are complete" in line


@pytest.mark.parametrize(
    ("sections", "key", "expected"),
    [
        ({"lora": {"target_modules": ["q_proj", "qkv_proj"]}}, "[lora] target_modules", "found 'qkv_proj'"),
        ({"lora": {"rank": 10**12}}, "[lora] rank", "an integer <= 128"),
        ({"lora": {"rank": 4096}}, "[lora] rank", "an integer <= 128"),
        ({"data": {"max_seq_len": 1}}, "[data] max_seq_len", "an integer >= 2"),
        ({"data": {"max_seq_len": 100_000}}, "[data] max_seq_len", "an integer <= 512"),
        (
            {"lora": {"target_modules": ["q_proj", "embed_tokens"]}, "privacy": {"mechanism": "dp-sgd"}},
            "[lora] target_modules",
            "linear layers under DP-SGD",
        ),
    ],
)
def test_model_shaped_settings(capsys, tmp_path, write_campaign, sections, key, expected) -> None:
    line = refuse(capsys, tmp_path, write_campaign(**sections))
    assert key in line and expected in line, line


# ------------------------------------------------------------------------------------------------ the data


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.jsonl", b"", "found none (an empty file)"),
        ("prose.jsonl", b"this is not json\n", "expected json records"),
        ("noise.jsonl", bytes(range(256)) * 4, "expected json records"),
        ("numbers.jsonl", b'{"text": 123}\n{"text": 5}\n', "found int values such as 123"),
        ("holes.jsonl", b'{"text": "a"}\n{"text": null}\n', "1 record(s) lack it"),
    ],
)
def test_bad_data_file(capsys, tmp_path, write_campaign, name: str, content: bytes, expected: str) -> None:
    source = tmp_path / name
    source.write_bytes(content)
    line = refuse(capsys, tmp_path, write_campaign(data={"source": str(source)}))
    assert "[data] source" in line and expected in line, line


def test_empty_data_folder(capsys, tmp_path, write_campaign) -> None:
    (tmp_path / "shards").mkdir()
    line = refuse(capsys, tmp_path, write_campaign(data={"source": str(tmp_path / "shards")}))
    assert "[data] source" in line and "doesn't contain any data files" in line


def test_hub_dataset_offline(capsys, tmp_path, write_campaign) -> None:
    start = time.perf_counter()
    line = refuse(capsys, tmp_path, write_campaign(data={"source": "someorg/not-cached-data"}))
    assert "[data] source" in line and "someorg/not-cached-data" in line
    assert time.perf_counter() - start < 60, "an unreachable hub must not be retried for long"


def test_only_empty_texts(capsys, tmp_path, write_campaign) -> None:
    source = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}] * 40)
    line = refuse(capsys, tmp_path, write_campaign(data={"source": str(source)}))
    assert "[data] source" in line and "only empty texts" in line


def test_dirichlet_without_a_label(capsys, tmp_path, write_campaign) -> None:
    source = write_jsonl(tmp_path / "plain.jsonl", [{"text": f"record {i}"} for i in range(60)])
    line = refuse(
        capsys, tmp_path, write_campaign(data={"source": str(source)}, simulation={"partitioner": "dirichlet"})
    )
    assert "[data] label_field" in line and "dirichlet" in line  # no column is guessed as the label


def test_bad_extra_data(capsys, tmp_path, write_campaign) -> None:
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"body": "no text field"}])
    line = refuse(capsys, tmp_path, write_campaign(simulation={"extra_data": {"1": str(extra)}}))
    assert "[simulation] extra_data.1" in line and "needs field(s) ['text']" in line


# ------------------------------------------------------------------------------------------ privacy, secagg


def test_unreachable_epsilon(capsys, tmp_path, write_campaign) -> None:
    """Every contributor used to raise ``cannot reach ε`` and the campaign exited 0 with "down 0.0%"."""
    line = refuse(capsys, tmp_path, write_campaign(privacy={"mechanism": "dp-sgd", "target_epsilon": 0.001}))
    assert "[privacy] target_epsilon" in line and "an ε DP-SGD can reach" in line and "0.001" in line


SIMULATE = "import sys; from fedtune.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow  # a child process: imports, then the calibration
def test_epsilon_whose_accounting_would_exhaust_memory(tmp_path, write_campaign) -> None:
    """ε = 1000 over a long horizon: the check calibrated it with Opacus' PRV accountant, whose grid needed tens of GB
    (in a child capped at 6 GiB: ``MemoryError``, a traceback). Now one line that names the way out."""
    config = write_campaign(privacy={"mechanism": "dp-sgd", "target_epsilon": 1000.0, "planned_rounds": 400})
    before = snapshot(tmp_path)
    proc = run_python(SIMULATE, "simulate", str(config), "--run-dir", str(tmp_path / "out"), memory_gib=6)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert str(config) in line and "[privacy] target_epsilon" in line and 'accountant = "rdp"' in line, line
    assert "Traceback" not in proc.stderr and snapshot(tmp_path) == before


def test_reachable_epsilon_passes_preflight(write_campaign) -> None:
    from fedtune.config import load_config
    from fedtune.preflight import check_campaign

    cfg = load_config(write_campaign(privacy={"mechanism": "dp-sgd", "target_epsilon": 8.0}))
    report = check_campaign(cfg)
    assert len(report.shard_sizes) == 3 and min(report.shard_sizes) > 0 and report.eval_examples == 32


def test_secure_aggregation_overflow_leaves_no_config(capsys, tmp_path, write_campaign) -> None:
    """This error was clean already, but left ``RUN/config.toml`` behind, so the fixed run went to ``RUN-2``."""
    config = write_campaign(
        federation={"contributors_per_round": 5},
        simulation={"contributors": 5},
        secure_aggregation={"protocol": "secagg+", "bits": 30},
    )
    line = refuse(capsys, tmp_path, config)
    assert "[secure_aggregation] bits" in line and "overflow" in line
