"""Task metrics on a saved adapter checkpoint, each against an answer computed here by independent means.

A tiny model gets a seeded, non-zero FFA adapter, is saved in PEFT format and reloaded the way a run's
``checkpoints/round-N`` is. References: log-likelihoods from one unbatched forward per prefix, greedy text from
full re-forwards without a cache, SQuAD F1 and pass@k worked out by hand, programs whose fate does not depend
on the model's completion (it lands in a comment).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedtune.config import CampaignConfig, TaskSection
from fedtune.ml.evaluation import Evaluator, evaluate_loss
from fedtune.ml.model import build_model
from fedtune.ml.sandbox import run_program
from fedtune.ml.tasks import Task, normalize_answer, pass_at_k, token_f1

from ..conftest import small_campaign


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """(reloaded PeftModel, tokenizer): a tiny model whose adapter was trained to something, saved and reloaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.ml.tiny import builtin_path

    cfg = CampaignConfig.from_dict(small_campaign())
    model, tokenizer = build_model(cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    folder = tmp_path_factory.mktemp("ckpt") / "round-3"
    model.save_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(builtin_path(cfg.model.name))
    reloaded = PeftModel.from_pretrained(base, str(folder))
    reloaded.eval()
    return reloaded, tokenizer


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@torch.no_grad()
def reference_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt), one separate forward pass per continuation token."""
    ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    total = 0.0
    for i, token in enumerate(cont):
        ids = torch.tensor([ctx + cont[:i]])
        logits = model(input_ids=ids).logits[0, -1].double()
        total += float(torch.log_softmax(logits, -1)[token])
    return total


@torch.no_grad()
def reference_greedy(model, tokenizer, prompt: str, max_new: int, stop: str) -> str:
    """Greedy continuation by full re-forwards (no cache), cut at ``stop`` and at EOS."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        new.append(nxt)
    text = tokenizer.decode(new, skip_special_tokens=True)
    return text.split(stop)[0]


def test_multiple_choice_accuracy_matches_reference_loglikelihoods(checkpoint, tmp_path) -> None:
    model, tok = checkpoint
    items = [
        ("The capital of France is", ["Paris", "a banana", "blue"]),
        ("def add(a, b): return", ["a + b", "None", "pass pass"]),
        ("import os\nos.path.", ["join", "zzz", "qq"]),
        ("1 2 3", ["4", "five", "6 7"]),
    ]
    best, best_norm, reference = [], [], []
    for prompt, choices in items:
        scores = [reference_logprob(model, tok, prompt, " " + c) for c in choices]
        reference.append(scores)
        best.append(max(range(3), key=scores.__getitem__))
        norm = [s / len(c) for s, c in zip(scores, choices, strict=True)]
        best_norm.append(max(range(3), key=norm.__getitem__))
    # answers in every accepted form: the model's pick (index, letter, text) for items 0-2, a wrong one for item 3
    answers = [best[0], "ABC"[best[1]], items[2][1][best[2]], (best[3] + 1) % 3]
    rows = [{"question": p, "choices": c, "answer": a} for (p, c), a in zip(items, answers, strict=True)]
    spec = TaskSection(
        name="mc",
        kind="choice",
        source=write_rows(tmp_path / "mc.jsonl", rows),
        split="train",
        choices_field="choices",
    )
    task = Task.load(spec)
    for row, ref in zip(task.rows, reference, strict=True):
        assert task.choice_loglikelihoods(model, tok, row, bos=False) == pytest.approx(ref, rel=1e-4, abs=1e-4)
    got = task.score(model, tok)
    gold = [best[0], best[1], best[2], (best[3] + 1) % 3]
    assert got["acc"] == pytest.approx(3 / 4)
    assert got["acc_norm"] == pytest.approx(sum(int(b == g) for b, g in zip(best_norm, gold, strict=True)) / 4)
    assert got["n"] == 4


def test_choice_columns_constant_labels_and_bad_answers(checkpoint, tmp_path) -> None:
    model, tok = checkpoint
    rows = [{"q": "x", "opa": "yes", "opb": "no", "cop": 1}]
    spec = TaskSection(
        name="cols",
        kind="choice",
        source=write_rows(tmp_path / "c.jsonl", rows),
        prompt_template="{q}",
        choice_fields=["opa", "opb"],
        answer_field="cop",
    )
    task = Task.load(spec)
    assert task.choice_item(task.rows[0]) == (["yes", "no"], 1)
    labels = TaskSection(
        name="labels",
        kind="choice",
        source=spec.source,
        prompt_template="{q}",
        choices=["no", "yes"],
        answer_field="opa",
    )
    assert Task.load(labels).choice_item(task.rows[0]) == (["no", "yes"], 1)
    from fedtune.ml.data import DataError

    bad = TaskSection(name="bad", kind="choice", source=spec.source, prompt_template="{q}", choices=["a", "b"])
    with pytest.raises(DataError, match="needs field"):
        Task.load(bad)  # no "answer" column


def test_squad_normalisation_and_f1_by_hand() -> None:
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    # "cat sat" vs "cat sat on mat": precision 2/2, recall 2/4 -> F1 = 2*1*0.5/1.5
    assert token_f1("The cat sat.", "a cat sat on mat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0


def test_exact_match_and_f1_on_generated_answers(checkpoint, tmp_path) -> None:
    model, tok = checkpoint
    prompts = ["Question: what is two plus two?\nAnswer:", "def f(x):\n    return", "Hello"]
    preds = [reference_greedy(model, tok, p, 8, "\n") for p in prompts]
    words = normalize_answer(preds[1]).split()
    assert words, f"precondition: the second prediction has words after normalisation: {preds[1]!r}"
    # item 0: its own prediction (EM 1, F1 1); item 1: prediction + 3 new words (EM 0, F1 = 2n/(2n+3));
    # item 2: a list of references, one of them the prediction up to case and punctuation (EM 1)
    refs = [preds[0], preds[1] + " alpha beta gamma", ["nothing like it", preds[2].upper() + "!"]]
    rows = [{"question": p, "answer": r} for p, r in zip(prompts, refs, strict=True)]
    spec = TaskSection(
        name="qa",
        kind="exact_match",
        source=write_rows(tmp_path / "qa.jsonl", rows),
        max_new_tokens=8,
        stop=["\n"],
    )
    got = Task.load(spec).score(model, tok)
    n = len(words)
    assert got["exact_match"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx((1 + 2 * n / (2 * n + 3) + 1) / 3)


def test_pass_at_k_estimator_by_hand() -> None:
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(3, 0, 2) == 0.0 and pass_at_k(3, 2, 2) == 1.0


@pytest.mark.slow
def test_pass_at_k_with_entry_point(checkpoint, tmp_path) -> None:
    model, tok = checkpoint
    rows = [
        {"prompt": "def g():\n    return 1\n# ", "test": "def check(fn):\n    assert fn() == 1\n", "entry": "g"},
        {"prompt": "def g():\n    return 2\n# ", "test": "def check(fn):\n    assert fn() == 1\n", "entry": "g"},
        {"prompt": "def f(x):\n    return 2 * x\n# ", "test": "assert f(2) == 4", "entry": "f"},
        {"prompt": "# ", "test": "while True:\n    pass", "entry": "f"},
        {"prompt": "# ", "test": "blob = bytearray(4 * 1024 ** 3)", "entry": "f"},
    ]
    rows[2]["test"] += "\ndef check(fn):\n    assert fn(3) == 6\n"
    spec = TaskSection(
        name="code",
        kind="pass_at_k",
        source=write_rows(tmp_path / "code.jsonl", rows),
        prompt_template="{prompt}",
        test_field="test",
        entry_point_field="entry",
        samples=3,
        k=[1, 2],
        temperature=1.0,
        max_new_tokens=6,
        stop=["\n", "\r", "\x00"],
        timeout_s=1.0,
        memory_mb=256,
    )
    got = Task.load(spec).score(model, tok, seed=3)
    # problems 0 and 2 pass with every sample (c = n = 3), the others never (wrong value, timeout, memory)
    assert got["pass@1"] == pytest.approx(2 / 5)
    assert got["pass@2"] == pytest.approx(2 / 5)
    assert got["timeouts"] == 3


def test_sandbox_limits(tmp_path) -> None:
    ok = run_program(f"import os\nassert os.getcwd() != {str(Path.cwd())!r}\nprint('hi')\n")
    assert ok.passed, ok.stderr_tail
    slow = run_program("while True:\n    pass\n", timeout_s=0.5)
    assert slow.status == "timeout" and slow.wall_s < 5
    bomb = run_program("x = bytearray(3 * 1024 ** 3)\n", memory_mb=256)
    assert bomb.status == "failed" and "MemoryError" in bomb.stderr_tail
    big_file = run_program("open('f', 'wb').write(b'0' * (4 << 20))\n")
    assert big_file.status == "failed"
    forks = run_program(
        "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "import time\ntime.sleep(60)\n",
        timeout_s=0.5,
    )
    assert forks.status == "timeout" and forks.wall_s < 5


@torch.no_grad()
def test_loss_definitions_against_per_token_reference(checkpoint) -> None:
    model, tok = checkpoint
    from fedtune.ml.data import TokenizedSet

    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in ["abc def", "x", "hello world, again and again"]]
    data = TokenizedSet(ids=[s + [tok.eos_token_id] for s in seqs], pad_id=tok.pad_token_id)
    per_seq = []
    for ids in data.ids:
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        per_seq.append([-float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)])
    token_mean = sum(map(sum, per_seq)) / sum(map(len, per_seq))
    sequence_mean = sum(sum(s) / len(s) for s in per_seq) / len(per_seq)
    got = evaluate_loss(model, data, batch_size=2)
    assert got["eval_loss"] == pytest.approx(token_mean, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(token_mean), rel=1e-5)
    assert got["eval_tokens"] == sum(map(len, per_seq))
    assert evaluate_loss(model, data, 2, loss="sequence_mean")["eval_loss"] == pytest.approx(sequence_mean, rel=1e-5)


def test_evaluator_runs_tasks_when_due_with_pinned_threads(checkpoint, tmp_path, monkeypatch) -> None:
    model, tok = checkpoint
    mc = write_rows(tmp_path / "mc.jsonl", [{"question": "a", "choices": ["b", "c"], "answer": 0}])
    raw = small_campaign(
        federation={"rounds": 3},
        evaluation={
            "every": 2,
            "threads": 1,
            "loss": "sequence_mean",
            "tasks": [{"name": "mc", "kind": "choice", "source": mc, "choices_field": "choices"}],
        },
    )
    cfg = CampaignConfig.from_dict(raw)
    evaluator = Evaluator(cfg, tok)
    seen: list[int] = []
    import fedtune.ml.evaluation as evaluation

    original = evaluation.evaluate_loss

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_loss", spy)
    torch.set_num_threads(2)
    try:
        rows = {r: evaluator.run(model, r) for r in range(4)}
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(1)
    assert seen == [1, 1, 1, 1]
    assert [r for r, row in rows.items() if "tasks" in row] == [0, 2, 3]  # round 0, every 2nd, the last
    assert set(rows[0]["tasks"]["mc"]) == {"acc", "acc_norm", "n"}
    assert "per sequence (sequence_mean)" in rows[1]["eval_loss_def"] and "EOS appended" in rows[1]["eval_loss_def"]
