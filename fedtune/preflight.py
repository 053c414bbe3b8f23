"""Preflight: everything about a campaign that can be checked before anything is written or started.

The CLI (``simulate``, ``sweep``) and the coordinator launcher run it before they create a run dir, so bad input
ends in one ``error:`` line and exit code 2 with nothing on disk. Beyond the file itself it resolves the base
model (a local folder, a built-in, or a hub id that must be in the cache or downloadable) and loads its
tokenizer, then :func:`check_inputs`: the training data, its partitioning for every virtual contributor (none
may be left empty, an id-like label column is refused), a few rendered rows (templates, chat templates), the
evaluation set and every task's rows with their columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.config import CampaignConfig, ConfigError, is_builtin, load_config

PREVIEW_ROWS = 8


def validate_campaign(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> CampaignConfig:
    """Everything that can be checked before work starts: the file, the model, the data, partitions and tasks."""
    cfg = load_config(path, overrides)
    check_campaign(cfg)
    return cfg


def check_campaign(cfg: CampaignConfig) -> None:
    """The checks of :func:`validate_campaign` on a loaded config; raises :class:`ConfigError` naming its file."""
    check_inputs(cfg, load_tokenizer(cfg))


def check_inputs(cfg: CampaignConfig, tokenizer: Any) -> None:
    """The data and evaluation inputs of ``cfg`` as the run will read them; raises :class:`ConfigError`.

    ``[data]``: loadable with its fields, partitioned for every virtual contributor (by ``label_field`` for
    dirichlet), a few rows rendered and tokenized (instruction template or chat template). ``[evaluation]``: the
    eval set (explicit source or carve-out) rendered and tokenized with its BOS/EOS, every task's rows loaded with
    the columns it reads and its prompt template filled.
    """
    from fedtune.ml.data import DataError, check_partitions, load_eval_rows, load_raw, tokenize, training_pool
    from fedtune.ml.tasks import Task

    path = cfg.source_file or "<campaign>"

    def fail(key: str, exc: Exception) -> ConfigError:
        return ConfigError(path, key, str(exc).split(": ", 1)[-1])

    try:
        raw = load_raw(cfg.data)
        pool = training_pool(cfg, raw)
    except DataError as exc:
        raise fail("[data] source", exc) from None
    try:
        check_partitions(cfg, pool)
    except DataError as exc:
        dirichlet = cfg.simulation.partitioner == "dirichlet"
        raise fail("[data] label_field" if dirichlet else "[data] source", exc) from None
    try:
        tokenize(cfg.data, raw.select(range(min(PREVIEW_ROWS, len(raw)))), tokenizer)
    except DataError as exc:
        raise fail("[data] chat_template" if cfg.data.chat_template else "[data] source", exc) from None
    except (KeyError, IndexError, ValueError) as exc:  # a template naming a column the rows lack, say
        raise ConfigError(path, "[data] template", "a template the rows can fill", repr(exc)) from None
    ev = cfg.evaluation
    try:
        rows = load_eval_rows(cfg)
        tokenize(cfg.data, rows.select(range(min(PREVIEW_ROWS, len(rows)))), tokenizer, bos=ev.bos, eos=ev.eos)
    except DataError as exc:
        raise fail("[evaluation] source" if ev.source else "[data] source", exc) from None
    for i, spec in enumerate(ev.tasks):
        key = f"[evaluation.tasks[{i}]]"
        try:
            task = Task.load(spec)
            for row in task.rows[:PREVIEW_ROWS]:
                spec.prompt_template.format(**row)
        except DataError as exc:
            raise fail(f"{key} source", exc) from None
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(path, f"{key} prompt_template", "a template the rows fill", repr(exc)) from None


def load_tokenizer(cfg: CampaignConfig) -> Any:
    """The base's tokenizer, proving the model resolves: a built-in, a local folder, or a reachable hub id."""
    from transformers import AutoTokenizer

    from fedtune.ml.model import resolve_model_dir

    name, path = cfg.model.name, cfg.source_file or "<campaign>"
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(cfg.model))
    except Exception as exc:  # hub errors, missing files, unknown built-in: all one line for the user
        where = (
            "a built-in model"
            if is_builtin(name)
            else f"a model folder (relative paths are read from {Path(path).resolve().parent}) or a hub id in the "
            "local cache or downloadable"
        )
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(path, "[model] name", where, f"{name} ({reason})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
