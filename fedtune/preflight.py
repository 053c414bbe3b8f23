"""Preflight: everything about a campaign that can be checked before anything is written or started.

``fedtune simulate`` and ``fedtune coordinate`` call it before they create a run dir or start a worker, so bad
input ends in one ``error: FILE: [section] key: expected X, found Y`` line (:class:`ConfigError`), exit code 2,
and nothing on disk. What is checked, in order (cheap first, so the common mistakes answer fast):

- the campaign file (:func:`fedtune.config.load_config`: syntax, types, ranges, local paths);
- the model: a known ``builtin:`` name, a local dir whose ``config.json`` and weights transformers can read,
  or a hub id in the local cache (or, when the hub is reachable, its small files); its tokenizer;
- LoRA: every ``target_modules`` name matches layers of the model LoRA can adapt, and the rank is no larger
  than the smallest dimension of those layers (a larger rank adds parameters and nothing else);
- ``[data] max_seq_len`` within the model's positions;
- the data: readable records with the configured fields holding text, a non-empty shard for every virtual
  contributor under the configured partitioner (by ``[data] label_field``; an id-like column is refused; plus
  ``extra_data``), a sample of rows rendered through the template or chat template (:func:`check_inputs`);
- evaluation: the explicit ``[evaluation] source`` or the carve-out, tokenized with its BOS/EOS, non-empty, and
  every task's rows with the columns its prompt template reads;
- DP-SGD: a noise multiplier exists for the target ε over the planned steps at every shard size
  (:func:`fedtune.privacy.calibrate_noise`, the contributors' own calibration);
- SecAgg+: :func:`fedtune.secagg.campaign.check_setup` (sum overflow, threshold, cohort).

Pitfalls: nothing here may write into the run dir or download weights; the hub is tried offline first and
never retried (``datasets`` would retry an unreachable hub for half a minute); the model is instantiated on
PyTorch's ``meta`` device, so a huge rank or model costs no memory; library chatter is muted while checking.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import CampaignConfig, ConfigError, is_builtin, load_config, looks_local
from fedtune.console import one_line

_SMALL_HUB_FILES = ["*.json", "*.model", "*.txt"]
PREVIEW_ROWS = 8
"""Rows rendered and tokenized as a sample of every table preflight reads."""
_NOISY_LOGGERS = ("datasets", "transformers", "huggingface_hub", "peft", "httpx", "fsspec")


@dataclass
class Preflight:
    """What the checks found out, for callers that want to report it."""

    cfg: CampaignConfig
    model_dir: Path | None = None
    shard_sizes: list[int] = field(default_factory=list)
    eval_examples: int = 0


def validate_campaign(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> CampaignConfig:
    """Load the campaign file and run every preflight check on it; raises :class:`ConfigError` on the first problem."""
    cfg = load_config(path, overrides)
    check_campaign(cfg)
    return cfg


def check_campaign(cfg: CampaignConfig) -> Preflight:
    """Every check after the file itself (model, LoRA, sequence length, data, DP, SecAgg+); see the module doc."""
    report = Preflight(cfg)
    with _quiet():
        report.model_dir = model_dir(cfg)
        hf_config, tokenizer = _load_config_and_tokenizer(cfg, report.model_dir)
        check_lora(cfg, hf_config)
        check_sequence_length(cfg, hf_config)
        _check_hub_dataset(cfg, cfg.data.source, "[data] source")
        check_inputs(cfg, tokenizer)
        report.eval_examples, report.shard_sizes = check_data(cfg, tokenizer)
        check_privacy(cfg, report.shard_sizes)
        check_secure_aggregation(cfg)
    return report


def check_local_contributors(cfg: CampaignConfig) -> None:
    """What a simulation's contributors, which run on this machine, need here: bitsandbytes for a quantized base.

    (``coordinate`` does not call it: its contributors check their own machines before they accept a round.)
    """
    import importlib.util

    if cfg.model.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise _error(
            cfg,
            "[model] quantization",
            "'none', or bitsandbytes installed (pip install 'fedtune[qlora]')",
            f"{cfg.model.quantization!r} without bitsandbytes",
        )


def _error(cfg: CampaignConfig, key: str, expected: str, found: object) -> ConfigError:
    return ConfigError(cfg.source_file or "<campaign>", key, expected, found)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mute library logs and warnings while checking: a failed check is reported once, by us."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: nothing may be fetched from the hub."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# ------------------------------------------------------------------------------------------------- model


def model_dir(cfg: CampaignConfig) -> Path:
    """The local folder of the base model's files, or a one-line :class:`ConfigError` saying why there is none."""
    from fedtune.ml.tiny import BUILTIN_MODELS, builtin_path

    name = cfg.model.name
    expected = f"a model directory, a hub id, or one of the built-in models {list(BUILTIN_MODELS)}"
    if is_builtin(name):
        if name not in BUILTIN_MODELS:
            raise _error(cfg, "[model] name", expected, name)
        return builtin_path(name)
    if Path(name).is_absolute() and Path(name).is_dir():  # config resolved a local path against the campaign file
        return Path(name)
    return _hub_model_dir(cfg)


def _hub_model_dir(cfg: CampaignConfig) -> Path:
    """A hub id: the local cache first; the hub itself only when not offline, small files only, no retries."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from fedtune.config import WEIGHT_FILES

    name, revision = cfg.model.name, cfg.model.revision
    try:
        cached = Path(snapshot_download(name, revision=revision, local_files_only=True))
        if any((cached / w).exists() for w in WEIGHT_FILES) or not hub_offline():
            return cached
    except (LocalEntryNotFoundError, ValueError, OSError):
        pass
    if hub_offline():
        raise _error(
            cfg,
            "[model] name",
            "a model directory, a built-in model, or a hub id whose files are in the local cache "
            "(HF_HUB_OFFLINE is set: nothing is downloaded)",
            name,
        )
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=_SMALL_HUB_FILES))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise _error(
            cfg,
            "[model] name",
            f"a model directory, a built-in model, or a hub id the hub serves (not in the local cache; "
            f"the hub answered: {one_line(exc)})",
            name,
        ) from None


def _load_config_and_tokenizer(cfg: CampaignConfig, folder: Path) -> tuple[Any, Any]:
    """transformers' config and tokenizer of the model, plus a header check of its safetensors weights."""
    from transformers import AutoConfig, AutoTokenizer

    def load(auto: Any, what: str) -> Any:
        try:
            return auto.from_pretrained(folder)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _error(cfg, "[model] name", f"a model whose {what}", f"{folder}: {one_line(exc)}") from None

    hf_config = load(AutoConfig, "config.json transformers can read")
    for weights in sorted(folder.glob("*.safetensors")):
        _check_safetensors(cfg, weights)
    return hf_config, load(AutoTokenizer, "tokenizer transformers can load")


def _check_safetensors(cfg: CampaignConfig, path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # safetensors raises its own SafetensorError (not exported) for a damaged file
        raise _error(
            cfg, "[model] name", "a model whose weight files are complete", f"{path}: {one_line(exc)}"
        ) from None


def _meta_model(cfg: CampaignConfig, hf_config: Any) -> Any:
    """The model's architecture on the ``meta`` device: every module and shape, no memory, no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise _error(cfg, "[model] name", "a causal language model transformers can build", one_line(exc)) from None


def check_lora(cfg: CampaignConfig, hf_config: Any) -> None:
    """Every target module name matches a layer LoRA can adapt; the rank fits the smallest of them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import check_target_module_exists

    from fedtune.ml.model import lora_config

    model = _meta_model(cfg, hf_config)
    lora = cfg.lora
    modules = dict(model.named_modules())
    adaptable = sorted(
        {n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)}
    )
    dims: dict[str, tuple[int, int]] = {}
    for target in lora.target_modules:
        probe = LoraConfig(target_modules=[target])
        matched = [n for n in modules if n and check_target_module_exists(probe, n)]
        if not matched:
            raise _error(
                cfg,
                "[lora] target_modules",
                f"names of layers of {cfg.model.name} (e.g. {', '.join(adaptable[:8])})",
                target,
            )
        if cfg.privacy.mechanism == "dp-sgd" and any(isinstance(modules[n], torch.nn.Embedding) for n in matched):
            raise _error(
                cfg,
                "[lora] target_modules",
                "linear layers under DP-SGD (Opacus computes no per-sequence gradients for PEFT's embedding LoRA, "
                "so every round would fail)",
                target,
            )
        for name in matched:
            weight = getattr(modules[name], "weight", None)
            if weight is not None and weight.dim() >= 2:
                dims[name] = (int(weight.shape[0]), math.prod(int(d) for d in weight.shape[1:]))
    if dims:
        smallest = min(dims, key=lambda n: min(dims[n]))
        limit = min(dims[smallest])
        if lora.rank > limit:
            shape = "x".join(map(str, dims[smallest]))
            raise _error(
                cfg,
                "[lora] rank",
                f"an integer <= {limit} (the smallest dimension of the targeted layers: {smallest} is {shape})",
                lora.rank,
            )
    try:
        with torch.device("meta"):
            get_peft_model(model, lora_config(lora))
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise _error(
            cfg, "[lora] target_modules", "layers LoRA can adapt (linear, embedding or convolution)", one_line(exc)
        ) from None


def check_sequence_length(cfg: CampaignConfig, hf_config: Any) -> None:
    """``max_seq_len`` within the positions the model has."""
    positions = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if isinstance(positions, int) and cfg.data.max_seq_len > positions:
        raise _error(
            cfg,
            "[data] max_seq_len",
            f"an integer <= {positions} (the model's max_position_embeddings)",
            cfg.data.max_seq_len,
        )


# -------------------------------------------------------------------------------------------------- data


def _check_hub_dataset(cfg: CampaignConfig, source: str, key: str) -> None:
    """A hub dataset id: fail in a second when the hub is unreachable (datasets retries for half a minute)."""
    if looks_local(source) or hub_offline():
        return  # offline, datasets reads its cache or fails at once
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(source, timeout=10)
    except Exception as exc:  # HfHubHTTPError, and httpx's transport errors (no DNS, refused): not OSErrors
        raise _error(
            cfg,
            key,
            "a local data file or folder, or a dataset id the hub serves (set HF_HUB_OFFLINE=1 to use a cached copy)",
            f"{source} (the hub did not answer: {one_line(exc)})",
        ) from None


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


def check_contributor_data(source: str | Path) -> int:
    """A deployed contributor's own data (``fedtune join --data``): records fedtune reads; their number.

    Checked before ``join`` writes or starts anything, with the loader the contributor's rounds use
    (:func:`fedtune.ml.data.load_table`: a ``.jsonl``/``.json``/``.txt``/``.parquet``/``.csv`` file or a folder of
    them). The fields are checked when a campaign names them (``[data]``). Raises :class:`DataError` (one line).
    """
    from datasets.utils import logging as ds_logging

    from fedtune.ml.data import DataError, load_table

    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # "Generating train split" bars would precede the one error line
    try:
        with _quiet():
            table = load_table(str(source))
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    if len(table) == 0:
        raise DataError(f"{source}: expected records, found none")
    return len(table)


def check_data(cfg: CampaignConfig, tokenizer: Any) -> tuple[int, list[int]]:
    """(tokenized eval examples, every virtual contributor's shard size); errors name the key to fix."""
    import dataclasses

    from fedtune.ml.data import DataError, load_eval, load_raw, partition, training_pool

    try:
        pool = training_pool(cfg, load_raw(cfg.data))
        n_eval = len(load_eval(cfg, tokenizer))
    except DataError as exc:
        raise _error(cfg, "[data] source", "records the [data] section can read", str(exc)) from None
    if n_eval == 0:
        key = "[evaluation] source" if cfg.evaluation.source else "[data] source"
        raise _error(cfg, key, "text in the evaluation records", "only empty texts")
    n = cfg.simulation.contributors
    sizes = []
    for pid in range(n):
        try:
            size = len(partition(cfg, pool, pid, n))
        except (DataError, ValueError, KeyError) as exc:
            raise _error(
                cfg,
                "[simulation] partitioner",
                f"a partitioner that can split {len(pool)} training records among {n} contributors",
                f"{cfg.simulation.partitioner}: {one_line(exc)}",
            ) from None
        extra = cfg.simulation.extra_data.get(str(pid))
        if extra:
            try:
                size += len(load_raw(dataclasses.replace(cfg.data, source=extra)))
            except DataError as exc:
                raise _error(cfg, f"[simulation] extra_data.{pid}", "records like [data] source's", str(exc)) from None
        if size == 0:
            raise _error(
                cfg,
                "[simulation] contributors",
                f"few enough contributors that each gets training records ({len(pool)} records in all)",
                f"{n} (contributor {pid} gets none)",
            )
        sizes.append(size)
    return n_eval, sizes


# ----------------------------------------------------------------------------------------- privacy, secagg


def check_privacy(cfg: CampaignConfig, shard_sizes: list[int]) -> None:
    """DP-SGD: a noise multiplier reaching the target ε over the planned steps exists for every shard size.

    Opacus' search doubles σ from 20 until ε falls below the target and gives up above σ = 10⁶, which takes
    minutes with the PRV accountant; evaluating ε once at its last σ decides the same thing in a fraction of
    a second. The calibration itself then runs for the smallest shard (the hardest sampling rate).
    """
    priv, fed = cfg.privacy, cfg.federation
    if priv.mechanism != "dp-sgd" or not shard_sizes:
        return
    from fedtune.privacy import PrivacyParams, calibrate_noise, delta_fits, epsilon_of, resolve_delta, sample_rate_for
    from fedtune.privacy.accounting import new_accountant

    params = PrivacyParams.from_campaign(priv, campaign_rounds=fed.rounds)
    steps = fed.local_steps * params.planned_rounds
    last_sigma = 20.0 * 2**16  # the largest σ opacus.accountants.utils.get_noise_multiplier tries
    delta = resolve_delta(params.target_delta)
    for size in sorted(set(shard_sizes)):
        if not delta_fits(delta, size):
            raise _error(
                cfg,
                "[privacy] delta",
                f"δ at most 1/(10 × records) for every virtual contributor (one has {size} records; its own policy "
                "would decline every round): use more data, fewer contributors or a smaller δ",
                delta,
            )
        rate = sample_rate_for(fed.batch_size, size)
        accountant = new_accountant(params.accountant)
        accountant.history = [(last_sigma, rate, steps)]
        if epsilon_of(accountant, delta) > params.target_epsilon:
            raise _error(
                cfg,
                "[privacy] target_epsilon",
                f"an ε DP-SGD can reach for a shard of {size} records (batch {fed.batch_size}, {steps} steps, "
                f"δ={delta:g}, {params.accountant}): raise it, or lower local_steps/planned_rounds",
                priv.target_epsilon,
            )
    smallest = min(shard_sizes)
    try:
        calibrate_noise(
            params.target_epsilon, delta, sample_rate_for(fed.batch_size, smallest), steps, params.accountant
        )
    except ValueError as exc:
        raise _error(cfg, "[privacy] target_epsilon", "an ε DP-SGD can reach", str(exc)) from None


def check_secure_aggregation(cfg: CampaignConfig) -> None:
    """SecAgg+ setup sound for the campaign's cohort (raises :class:`ConfigError`)."""
    if cfg.secure_aggregation.protocol == "none":
        return
    from fedtune.secagg.campaign import check_setup

    check_setup(cfg)
