"""``fedtune init --template``: every domain template is a valid campaign once its hub ids have local stand-ins.

Nothing can be downloaded here, so the test keeps each template's shape and swaps the hub ids for local files
with the same columns as the hub datasets (and a tiny local model with a chat template for the hub model);
then the full preflight runs and the evaluator scores round 0 with every task the template names.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import tomli_w

from fedtune.cli import main
from fedtune.config import load_config
from fedtune.research.templates import render_template, template_names

from .test_data_options import tiny_model_copy

HUB_IDS = {
    "general": ["flwrlabs/alpaca-gpt4", "cais/mmlu"],
    "finance": ["flwrlabs/fingpt-sentiment-train", "zeroshot/twitter-financial-news-sentiment"],
    "medical": ["flwrlabs/medical-meadow-medical-flashcards", "qiaojin/PubMedQA", "openlifescienceai/medmcqa"],
    "code": ["flwrlabs/code-alpaca-20k", "openai/openai_humaneval"],
}
STAND_INS = {  # task name -> two rows with the hub dataset's columns
    "mmlu": [
        {"question": "2 + 2 =", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
        {"question": "Water is", "subject": "chem", "choices": ["H2O", "CO2", "O2", "N2"], "answer": 0},
    ],
    "tfns": [{"text": "$AAPL beats estimates", "label": 1}, {"text": "Shares slump on guidance cut", "label": 0}],
    "pubmedqa": [
        {"pubid": 1, "question": "Does aspirin thin blood?", "context": {"contexts": ["..."]}, "final_decision": "yes"},
        {"pubid": 2, "question": "Is water toxic?", "context": {"contexts": ["..."]}, "final_decision": "no"},
    ],
    "medmcqa": [
        {"question": "Largest organ?", "opa": "skin", "opb": "liver", "opc": "brain", "opd": "lung", "cop": 0},
        {"question": "Insulin source?", "opa": "liver", "opb": "pancreas", "opc": "kidney", "opd": "gut", "cop": 1},
    ],
    "humaneval": [
        {
            "task_id": "HumanEval/0",
            "prompt": 'def add(a, b):\n    """Return a + b."""\n',
            "canonical_solution": "    return a + b\n",
            "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
            "entry_point": "add",
        }
    ],
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stand-ins")
    template = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    out = {"model": tiny_model_copy(root / "model", template)}
    train = [
        {"instruction": f"Task {i}", "input": f"detail {i}" if i % 2 else "", "output": f"answer {i}"}
        for i in range(120)
    ]
    out["train"] = write_jsonl(root / "train.jsonl", train)
    for task, rows in STAND_INS.items():
        out[task] = write_jsonl(root / f"{task}.jsonl", rows)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["code", "finance", "general", "medical"])
def test_template_is_a_valid_campaign_with_local_stand_ins(name, stand_ins, tmp_path, capsys) -> None:
    assert sorted(template_names()) == ["code", "finance", "general", "medical"]
    original = render_template(name)
    for hub_id in HUB_IDS[name]:
        assert f'"{hub_id}"' in original  # the FlowerTune-style hub ids are what a real campaign uses
    folder = tmp_path / name
    code = main(
        ["init", str(folder), "--template", name, "--model", str(stand_ins["model"]), "--data", str(stand_ins["train"])]
    )
    assert code == 0, capsys.readouterr().err
    text = (folder / "campaign.toml").read_text(encoding="utf-8")
    assert text.startswith("# ") and "FFA" in text  # the template's comments survive
    raw = tomllib.loads(text)
    assert raw["model"]["name"] == str(stand_ins["model"]) and raw["data"]["source"] == str(stand_ins["train"])
    # measured defaults: FFA at twice FlowerTune's A+B rank (32), DP-SGD and SecAgg+ on
    assert raw["lora"]["mode"] == "ffa" and raw["lora"]["rank"] == 64
    assert raw["privacy"]["mechanism"] == "dp-sgd" and raw["secure_aggregation"]["protocol"] == "secagg+"
    assert raw["evaluation"]["tasks"], "every template evaluates a task metric"
    for task in raw["evaluation"]["tasks"]:
        task["source"] = str(stand_ins[task["name"]])
        task["split"] = "train"
        task.pop("subset", None)
    raw["campaign"]["run_dir"] = str(tmp_path / "run")
    config = folder / "campaign.toml"
    config.write_text(tomli_w.dumps(raw), encoding="utf-8")

    from fedtune.ml.evaluation import Evaluator
    from fedtune.ml.model import build_model
    from fedtune.preflight import validate_campaign

    cfg = validate_campaign(str(config))
    assert not (tmp_path / "run").exists()
    model, tokenizer = build_model(cfg)
    row = Evaluator(cfg, tokenizer).run(model, 0)
    assert set(row["tasks"]) == {t["name"] for t in raw["evaluation"]["tasks"]}
    for metrics in row["tasks"].values():
        assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k not in ("n", "timeouts"))


def test_init_keeps_an_existing_campaign(tmp_path, capsys) -> None:
    assert main(["init", str(tmp_path), "--template", "code"]) == 0
    assert main(["init", str(tmp_path), "--template", "general"]) == 2
    assert "existing campaign" in capsys.readouterr().err
    assert load_config(tmp_path / "campaign.toml").campaign.name == "code"
