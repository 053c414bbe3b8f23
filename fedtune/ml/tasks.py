"""Task metrics on the shared adapter: multiple-choice accuracy, exact match / F1, and pass@k for code.

Each ``[[evaluation.tasks]]`` table becomes a :class:`Task` that loads its rows once (a local file or a hub id,
its first ``max_examples``) and scores a model on them:

- ``choice``: the summed log-likelihood of each choice's tokens after the prompt; ``acc`` takes the highest,
  ``acc_norm`` the highest per character of the choice (as lm-evaluation-harness does). The prompt and the
  choice (``choice_prefix`` + text) are tokenized separately and joined, so a choice's tokens never depend on
  the prompt's last characters. An empty prompt gets the BOS (or EOS) token as context.
- ``exact_match``: greedy generation of at most ``max_new_tokens``, cut at the first ``stop`` string;
  ``exact_match`` and ``f1`` after SQuAD normalisation (lower case, no punctuation, no articles, single spaces),
  the best over the reference answers.
- ``pass_at_k``: ``samples`` completions per problem (greedy for one, else sampled at ``temperature``), each
  run as ``prompt + completion + test [+ check(entry_point)]`` by :func:`fedtune.ml.sandbox.run_program`;
  the unbiased estimator 1 − C(n−c, k)/C(n, k) averaged over problems (Chen et al. 2021).

Pitfalls: sampling draws from a generator seeded by the campaign seed and the round, so a rerun reproduces its
numbers on the same machine; prompts are left-truncated to the model's context; the model is put in eval mode
and restored.
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedtune.config import TaskSection
from fedtune.ml.data import DataError, load_table, require_fields
from fedtune.ml.sandbox import run_program


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` passed (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and English articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between normalised strings (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass
class Task:
    """One configured task with its rows loaded; :meth:`score` returns its metrics on a model."""

    spec: TaskSection
    rows: list[dict[str, Any]]

    @classmethod
    def load(cls, spec: TaskSection) -> Task:
        """Load and check the rows (every column the task reads must exist); raises :class:`DataError`."""
        ds = load_table(spec.source, spec.split, spec.subset)
        if spec.max_examples:
            ds = ds.select(range(min(spec.max_examples, len(ds))))
        needed = template_fields(spec.prompt_template)
        if spec.kind == "choice":
            needed += [spec.answer_field] + ([spec.choices_field] if spec.choices_field else []) + spec.choice_fields
        elif spec.kind == "exact_match":
            needed += [spec.answer_field]
        else:
            needed += [spec.test_field] + ([spec.entry_point_field] if spec.entry_point_field else [])
        require_fields(ds, list(dict.fromkeys(needed)), spec.source, f"task {spec.name!r} ({spec.kind})")
        if len(ds) == 0:
            raise DataError(f"{spec.source}: task {spec.name!r} has no rows in split {spec.split!r}")
        task = cls(spec, [dict(r) for r in ds])
        if spec.kind == "choice":
            for row in task.rows:
                task.choice_item(row)  # every answer must name one of its choices
        return task

    # -- choice ---------------------------------------------------------------------------------------------
    def choice_item(self, row: dict[str, Any]) -> tuple[list[str], int]:
        """(choice texts, index of the right one) of a row."""
        spec = self.spec
        keys: list[str] = []
        if spec.choices:
            choices = list(spec.choices)
        elif spec.choice_fields:
            choices = [str(row[f]) for f in spec.choice_fields]
        else:
            value = row[spec.choices_field]
            if isinstance(value, dict):
                keys, choices = [str(k) for k in value], [str(v) for v in value.values()]
            elif isinstance(value, list | tuple):
                choices = [str(v) for v in value]
            else:
                raise DataError(
                    f"{spec.source}: task {spec.name!r}: {spec.choices_field!r} holds {value!r}, not a list"
                )
        answer = row[spec.answer_field]
        index = _answer_index(answer, choices, keys)
        if index is None:
            raise DataError(
                f"{spec.source}: task {spec.name!r}: answer {answer!r} is no index, letter or text of {choices}"
            )
        return choices, index

    @torch.no_grad()
    def choice_loglikelihoods(self, model: torch.nn.Module, tokenizer, row: dict[str, Any], bos: bool) -> list[float]:
        """log p(choice_prefix + choice | prompt) of each choice of ``row``, one padded batch."""
        device = next(model.parameters()).device
        limit = _context_limit(model)
        choices, _ = self.choice_item(row)
        context = _encode(tokenizer, self.spec.prompt_template.format(**row))
        if bos or not context:
            context = [_start_token(tokenizer), *context]
        conts = [_encode(tokenizer, self.spec.choice_prefix + c) for c in choices]
        seqs = [(context + cont)[-limit:] for cont in conts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        logprobs = F.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        scores = []
        for i, (s, cont) in enumerate(zip(seqs, conts, strict=True)):
            n = min(len(cont), len(s) - 1)
            positions = torch.arange(len(s) - n - 1, len(s) - 1, device=device)
            targets = torch.tensor(s[len(s) - n :], device=device)
            scores.append(float(logprobs[i, positions, targets].sum()))
        return scores

    def score_choice(self, model: torch.nn.Module, tokenizer, bos: bool) -> dict[str, float]:
        correct = correct_norm = 0
        for row in self.rows:
            choices, gold = self.choice_item(row)
            scores = self.choice_loglikelihoods(model, tokenizer, row, bos)
            norm = [sc / max(1, len(c)) for sc, c in zip(scores, choices, strict=True)]
            correct += int(_argmax(scores) == gold)
            correct_norm += int(_argmax(norm) == gold)
        n = len(self.rows)
        return {"acc": correct / n, "acc_norm": correct_norm / n, "n": float(n)}

    # -- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer, prompt: str, bos: bool, generator: torch.Generator | None
    ) -> str:
        """One completion of ``prompt`` (greedy at temperature 0), cut at the first stop string."""
        device = next(model.parameters()).device
        ids = _encode(tokenizer, prompt)
        if bos or not ids:
            ids = [_start_token(tokenizer), *ids]
        ids = ids[-max(1, _context_limit(model) - self.spec.max_new_tokens) :]
        tokens = torch.tensor([ids], device=device)
        new: list[int] = []
        cache_kw, cache = _cache_keyword(model), None
        for _ in range(self.spec.max_new_tokens):
            out = model(input_ids=tokens, use_cache=True, **{cache_kw: cache})
            cache = out.get(cache_kw)
            logits = out.logits[0, -1].float()
            if self.spec.temperature > 0:
                probs = torch.softmax(logits / self.spec.temperature, dim=-1).cpu()
                next_id = int(torch.multinomial(probs, 1, generator=generator))
            else:
                next_id = int(torch.argmax(logits))
            if next_id == tokenizer.eos_token_id:
                break
            new.append(next_id)
            text = tokenizer.decode(new, skip_special_tokens=True)
            if any(s and s in text for s in self.spec.stop):
                break
            tokens = torch.tensor([[next_id]], device=device)
        return truncate_at_stop(tokenizer.decode(new, skip_special_tokens=True), self.spec.stop)

    def score_exact_match(self, model: torch.nn.Module, tokenizer, bos: bool) -> dict[str, float]:
        em = f1 = 0.0
        for row in self.rows:
            prediction = self.generate(model, tokenizer, self.spec.prompt_template.format(**row), bos, None)
            refs = row[self.spec.answer_field]
            refs = [str(r) for r in refs] if isinstance(refs, list | tuple) else [str(refs)]
            em += max(float(normalize_answer(prediction) == normalize_answer(r)) for r in refs)
            f1 += max(token_f1(prediction, r) for r in refs)
        n = len(self.rows)
        return {"exact_match": em / n, "f1": f1 / n, "n": float(n)}

    def score_pass_at_k(self, model: torch.nn.Module, tokenizer, bos: bool, seed: int) -> dict[str, float]:
        spec = self.spec
        generator = torch.Generator().manual_seed(seed)
        totals = dict.fromkeys(spec.k, 0.0)
        timeouts = 0
        for row in self.rows:
            prompt = spec.prompt_template.format(**row)
            passed = 0
            for _ in range(spec.samples):
                completion = self.generate(model, tokenizer, prompt, bos, generator)
                program = f"{prompt}{completion}\n\n{row[spec.test_field]}\n"
                if spec.entry_point_field:
                    program += f"\ncheck({row[spec.entry_point_field]})\n"
                result = run_program(program, spec.timeout_s, spec.memory_mb)
                passed += int(result.passed)
                timeouts += int(result.status == "timeout")
            for k in spec.k:
                totals[k] += pass_at_k(spec.samples, passed, k)
        n = len(self.rows)
        return {**{f"pass@{k}": v / n for k, v in totals.items()}, "n": float(n), "timeouts": float(timeouts)}

    def score(self, model: torch.nn.Module, tokenizer, bos: bool = False, seed: int = 0) -> dict[str, float]:
        """This task's metrics on ``model`` (eval mode while scoring, its mode restored after)."""
        was_training = model.training
        model.eval()
        try:
            if self.spec.kind == "choice":
                return self.score_choice(model, tokenizer, bos)
            if self.spec.kind == "exact_match":
                return self.score_exact_match(model, tokenizer, bos)
            return self.score_pass_at_k(model, tokenizer, bos, seed)
        finally:
            model.train(was_training)


def _answer_index(answer: Any, choices: list[str], keys: list[str]) -> int | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    text = str(answer).strip()
    if keys and text in keys:
        return keys.index(text)
    if text in choices:
        return choices.index(text)
    if len(text) == 1 and text.isalpha() and ord(text.upper()) - ord("A") < len(choices):
        return ord(text.upper()) - ord("A")
    if text.isdigit() and int(text) < len(choices):
        return int(text)
    return None


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _start_token(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _cache_keyword(model: torch.nn.Module) -> str:
    """The KV-cache argument (and output field) of the model's forward: ``cache`` in transformers 5.2x,
    ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _context_limit(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
