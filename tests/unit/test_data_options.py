"""``[data]`` and ``[evaluation]`` options and the bugs they fixed: the dirichlet label column, a relative model
path read from the campaign file's folder, special tokens, templates, an explicit eval set. Bad input always
ends in one ``error:`` line, exit code 2 and no run dir."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import tomli_w

from fedtune.cli import EXIT_BAD_INPUT, main
from fedtune.config import CampaignConfig, ConfigError, DataSection, load_config
from fedtune.ml.data import check_partitions, load_eval, load_raw, render, tokenize, training_pool
from fedtune.preflight import validate_campaign

from ..conftest import DATA, small_campaign


def refused(capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> str:
    run_dir = tmp_path / "out"
    code = main(["simulate", str(config), "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and len(err) == 1 and err[0].startswith("error: "), err
    assert not run_dir.exists() and not (config.parent / "run").exists()
    return err[0]


def rows_with_id(path: Path, n: int = 60) -> Path:
    rows = [{"id": i, "topic": ["a", "b", "c"][i % 3], "text": f"example number {i} about {i % 3}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dirichlet_needs_a_named_label_column(capsys, tmp_path, write_campaign) -> None:
    line = refused(capsys, write_campaign(simulation={"contributors": 3, "partitioner": "dirichlet"}), tmp_path)
    assert "[data] label_field" in line and "dirichlet" in line


def test_an_id_column_is_refused_before_anything_is_written(capsys, tmp_path, write_campaign) -> None:
    data = rows_with_id(tmp_path / "ids.jsonl")
    config = write_campaign(
        data={"source": str(data), "label_field": "id", "eval_fraction": 0.1},
        simulation={"contributors": 3, "partitioner": "dirichlet"},
    )
    line = refused(capsys, config, tmp_path)
    assert "[data] label_field" in line and "54 distinct values in 54 rows" in line and "not a label" in line


def test_a_missing_label_column_is_named(capsys, tmp_path, write_campaign) -> None:
    config = write_campaign(
        data={"label_field": "category"}, simulation={"contributors": 3, "partitioner": "dirichlet"}
    )
    line = refused(capsys, config, tmp_path)
    assert "[data] label_field" in line and "'category'" in line


def test_dirichlet_by_the_named_column_gives_every_contributor_data(tmp_path) -> None:
    data = rows_with_id(tmp_path / "ids.jsonl", 90)
    raw = small_campaign(
        data={"source": str(data), "label_field": "topic", "eval_fraction": 0.1},
        simulation={"contributors": 3, "partitioner": "dirichlet", "dirichlet_alpha": 0.3},
    )
    cfg = CampaignConfig.from_dict(raw)
    pool = training_pool(cfg, load_raw(cfg.data))
    sizes = check_partitions(cfg, pool)
    assert len(sizes) == 3 and min(sizes) > 0 and sum(sizes) == len(pool) == 81


def tiny_model_copy(target: Path, chat_template: str | None = None) -> Path:
    from transformers import AutoTokenizer

    from fedtune.ml.tiny import TINY_LLAMA, builtin_path

    shutil.copytree(builtin_path(TINY_LLAMA), target)
    if chat_template is not None:
        tok = AutoTokenizer.from_pretrained(target)
        tok.chat_template = chat_template
        tok.save_pretrained(target)
    return target


def test_relative_model_path_is_read_from_the_campaign_folder(tmp_path, monkeypatch) -> None:
    campaign_dir = tmp_path / "campaigns"
    tiny_model_copy(campaign_dir / "models" / "tiny")
    config = campaign_dir / "c.toml"
    config.write_text(tomli_w.dumps(small_campaign(model={"name": "models/tiny"})))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = validate_campaign(str(config))
    assert cfg.model.name == str(campaign_dir / "models" / "tiny")


def test_a_model_only_beside_the_working_directory_is_not_taken(capsys, tmp_path, monkeypatch) -> None:
    """The old bug: ``models/tiny`` found relative to the cwd was used; from elsewhere it became a hub id that
    passed validation, created the run dir and then crashed. Now it is a hub id, checked before anything."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_model_copy(tmp_path / "models" / "tiny")
    campaign_dir = tmp_path / "campaigns"
    campaign_dir.mkdir()
    config = campaign_dir / "c.toml"
    config.write_text(tomli_w.dumps(small_campaign(model={"name": "models/tiny"})))
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, config, tmp_path)
    assert "[model] name" in line and str(campaign_dir) in line


def test_special_tokens_and_eos_options() -> None:
    from transformers import AutoTokenizer

    from fedtune.ml.tiny import STDLIB_LLAMA, builtin_path

    tok = AutoTokenizer.from_pretrained(builtin_path(STDLIB_LLAMA))
    ds = load_raw(DataSection(source=str(DATA))).select(range(4))
    data = DataSection(source=str(DATA), max_seq_len=512)  # no truncation: BOS and EOS are the only differences
    plain = tokenize(data, ds, tok)
    special = tokenize(dataclasses.replace(data, add_special_tokens=True), ds, tok)
    no_eos = tokenize(dataclasses.replace(data, append_eos=False), ds, tok)
    for p, s, n in zip(plain.ids, special.ids, no_eos.ids, strict=True):
        assert p[0] != tok.bos_token_id and p[-1] == tok.eos_token_id
        assert s == [tok.bos_token_id, *p]  # the tokenizer's own BOS, nothing else changes
        assert n == p[:-1]
    explicit = tokenize(dataclasses.replace(data, add_special_tokens=True), ds, tok, bos=True, eos=False)
    assert explicit.ids == [[tok.bos_token_id, *p[:-1]] for p in plain.ids]


def test_instruction_templates_and_chat_template(tmp_path) -> None:
    row = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    data = DataSection(source="x", format="instruction", response_field="output", input_field="input")
    assert render(data, row) == "### Instruction:\nAdd\n### Input:\n2 and 3\n### Response:\n5"
    assert render(data, {**row, "input": ""}) == "### Instruction:\nAdd\n### Response:\n5"
    custom = DataSection(
        source="x", format="instruction", response_field="output", template="Q: {instruction}\nA: {response}"
    )
    assert render(custom, row) == "Q: Add\nA: 5"
    from transformers import AutoTokenizer

    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    tok = AutoTokenizer.from_pretrained(tiny_model_copy(tmp_path / "chat", template))
    chat = DataSection(
        source="x",
        format="instruction",
        response_field="output",
        input_field="input",
        chat_template=True,
        system_prompt="Be brief.",
    )
    assert render(chat, row, tok) == "<system>Be brief.\n<user>Add\n\n2 and 3\n<assistant>5\n"


def test_chat_template_without_one_in_the_tokenizer_is_refused(capsys, tmp_path, write_campaign) -> None:
    rows = tmp_path / "inst.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(40)))
    config = write_campaign(data={"source": str(rows), "format": "instruction", "chat_template": True})
    line = refused(capsys, config, tmp_path)
    assert "[data] chat_template" in line and "no chat template" in line


def test_explicit_eval_source_replaces_the_carve_out(tmp_path, write_campaign) -> None:
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"text": f"held out line {i}"}) + "\n" for i in range(50)))
    config = write_campaign(evaluation={"source": "held_out.jsonl", "max_examples": 20, "bos": False, "eos": False})
    cfg = load_config(config)
    assert cfg.evaluation.source == str(held_out)  # relative to the campaign file
    from transformers import AutoTokenizer

    from fedtune.ml.tiny import builtin_path

    tok = AutoTokenizer.from_pretrained(builtin_path(cfg.model.name))
    eval_set = load_eval(cfg, tok)
    assert len(eval_set) == 20
    assert eval_set.ids[0] == tok("held out line 0", add_special_tokens=False)["input_ids"]  # no EOS, no BOS
    raw = load_raw(cfg.data)
    assert len(training_pool(cfg, raw)) == len(raw)  # nothing carved out of the training data


@pytest.mark.parametrize(
    ("evaluation", "key", "expected"),
    [
        ({"source": "missing.jsonl"}, "[evaluation] source", "an existing data file"),
        ({"loss": "mean"}, "[evaluation] loss", "'token_mean'"),
        ({"tasks": [{"name": "t", "kind": "choice", "source": str(DATA)}]}, "choices_field", "exactly one of"),
        (
            {"tasks": [{"name": "t", "kind": "pass_at_k", "source": str(DATA), "samples": 2}]},
            "[evaluation.tasks[0]] temperature",
            "samples > 1",
        ),
        ({"tasks": [{"name": "t", "kind": "exact_match", "source": str(DATA), "stop": "x"}]}, "stop", "a list"),
        ({"tasks": [{"name": "t", "kind": "rouge", "source": str(DATA)}]}, "[evaluation.tasks[0]] kind", "'choice'"),
    ],
)
def test_bad_evaluation_keys_are_named(capsys, tmp_path, write_campaign, evaluation, key, expected) -> None:
    line = refused(capsys, write_campaign(evaluation=evaluation), tmp_path)
    assert key in line and expected in line, line


def test_task_columns_are_checked_before_anything_is_written(capsys, tmp_path, write_campaign) -> None:
    task = {"name": "qa", "kind": "exact_match", "source": str(DATA), "prompt_template": "{question}"}
    line = refused(capsys, write_campaign(evaluation={"tasks": [task]}), tmp_path)
    assert "[evaluation.tasks[0]] source" in line and "question" in line


def test_config_error_is_one_line_for_templates() -> None:
    raw = small_campaign(data={"format": "instruction", "template": "{instruction} {answer}"})
    with pytest.raises(ConfigError, match=r"\[data\] template"):
        CampaignConfig.from_dict(raw)
