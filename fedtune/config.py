"""Campaign configuration: typed sections, validated in full before any work starts.

A campaign is one TOML file. Every section is a dataclass (the PEFT ``LoraConfig`` style): typed,
validated, serialisable back to TOML. Validation names the file, the key, what was expected and
what was found, so a researcher can fix the file from one line.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

BUILTIN_PREFIX = "builtin:"
"""``[model] name = "builtin:NAME"`` names a model fedtune builds locally (:mod:`fedtune.ml.tiny`)."""
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ConfigError(ValueError):
    """A campaign file that cannot be run. ``str()`` is the one line shown to the user."""

    def __init__(self, file: str | Path, key: str, expected: str, found: object | None = None) -> None:
        self.file, self.key, self.expected, self.found = str(file), key, expected, found
        found_txt = "" if found is None else f", found {found!r}"
        super().__init__(f"{self.file}: {key}: expected {expected}{found_txt}")


@dataclass
class CampaignSection:
    """Identity of the campaign; ``seed`` is public and derives FFA-LoRA's frozen A on every contributor."""

    name: str = "campaign"
    seed: int = 0
    run_dir: str = "runs/campaign"


@dataclass
class ModelSection:
    """The frozen base: a hub id, a local directory with weights, or ``builtin:tiny-llama``."""

    name: str = "builtin:tiny-llama"
    revision: str = "main"
    # the frozen base's weights and the training loop's autocast dtype; the trainable adapter stays float32
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "8bit", "4bit"] = "none"  # bitsandbytes base (QLoRA-style): LLM.int8 or NF4
    gradient_checkpointing: bool = False  # reentrant, with input grads: the form DP-SGD's per-sample hooks need


@dataclass
class LoraSection:
    """LoRA adapter. ``ffa`` freezes A (derived from the campaign seed) so aggregation is exact.

    FFA trains B only, so it needs about twice the rank A+B LoRA would get for the same quality (and sends about
    the same bytes): the default is 16, twice the usual A+B rank of 8 (``bench/bench_quality.py``, README).
    """

    mode: Literal["ffa", "lora"] = "ffa"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class DataSection:
    """Training text: a local jsonl/json/txt/parquet/csv file or a ``datasets`` hub id.

    Instruction rows render through ``template`` (``{instruction}``, ``{input}``, ``{response}``), or through the
    tokenizer's own chat template with ``chat_template = true``. ``label_field`` is the column the dirichlet
    partitioner splits by; it must be named (no column is guessed).
    """

    source: str = ""
    format: Literal["text", "instruction"] = "text"
    text_field: str = "text"
    instruction_field: str = "instruction"
    response_field: str = "response"
    max_seq_len: int = 128
    eval_fraction: float = 0.1
    eval_max_examples: int = 256
    split: str = "train"
    subset: str = ""  # a hub dataset's configuration name ("" = its default)
    input_field: str = ""  # instruction format: an optional context column (alpaca's "input")
    template: str = ""  # instruction format: "" = fedtune's "### Instruction/### Input/### Response" layout
    chat_template: bool = False  # instruction format: render with the tokenizer's chat template
    system_prompt: str = ""  # chat_template: a system message before each example ("" = none)
    add_special_tokens: bool = False  # let the tokenizer add its own special tokens (e.g. a Llama BOS)
    append_eos: bool = True  # end every example with the tokenizer's EOS (trained on, and scored)
    label_field: str = ""  # the column the dirichlet partitioner splits by


@dataclass
class FederationSection:
    """The round loop and the server optimizer (Flower's strategies)."""

    rounds: int = 3
    contributors_per_round: int = 2
    min_cohort: int = 2
    local_steps: int = 10
    batch_size: int = 8
    micro_batch_size: int = 0  # > 0: run each batch in chunks of this many sequences (same step, less memory)
    learning_rate: float = 1e-3
    # per-round contributor learning rate: "cosine" anneals from learning_rate (round 1) towards min_learning_rate
    # (reached after the last round), as FlowerTune's baselines do; late DP noise then moves the adapter less
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_learning_rate: float = 0.0
    keep_optimizer_state: bool = True  # each contributor's local AdamW moments carry over to its next round
    server_optimizer: Literal["fedavg", "fedadam", "fedyogi", "fedavgm"] = "fedavg"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9
    round_timeout_s: float = 3600.0

    def learning_rate_for(self, server_round: int) -> float:
        """The contributors' learning rate in ``server_round`` (1-based) under :attr:`lr_schedule`."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        progress = min(max(server_round - 1, 0), self.rounds) / self.rounds  # min only after the last round
        span = self.learning_rate - self.min_learning_rate
        return self.min_learning_rate + 0.5 * span * (1.0 + math.cos(math.pi * progress))


@dataclass
class SimulationSection:
    """Virtual contributors for ``fedtune simulate``."""

    contributors: int = 4
    partitioner: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = 0.5
    cpus_per_contributor: float = 1.0
    # partition id -> a data file whose records join that virtual contributor's shard (audits, targeted tests)
    extra_data: dict[str, str] = field(default_factory=dict)
    # partition id -> that virtual contributor's own choice (what `fedtune join --max-rank/--batch-size/--micro-batch`
    # sets on a real contributor): a smaller LoRA rank, a smaller batch, chunks that fit its memory
    max_rank: dict[str, int] = field(default_factory=dict)
    batch_size: dict[str, int] = field(default_factory=dict)
    micro_batch_size: dict[str, int] = field(default_factory=dict)
    # keep each Ray actor's models and shards across rounds (false: rebuild on every change of contributor)
    workspace_cache: bool = True


@dataclass
class PrivacySection:
    """Record-level DP-SGD on every contributor (Opacus), accounted over its whole participation."""

    mechanism: Literal["none", "dp-sgd"] = "none"
    target_epsilon: float = 8.0
    delta: float = 0.0  # 0: derived from the shard size
    max_grad_norm: float = 1.0
    accountant: Literal["prv", "rdp"] = "prv"
    planned_rounds: int = 0  # 0: the campaign's rounds
    grad_sample_mode: Literal["hooks", "ghost"] = "hooks"
    update_clip_norm: float = 0.0  # 0: no clipping of the round's update
    personal_max_epsilon: dict[str, float] = field(default_factory=dict)  # simulation: partition id -> budget


@dataclass
class SecureAggregationSection:
    """SecAgg+ (Bell et al. 2020): the coordinator learns only the sum of the cohort's updates."""

    protocol: Literal["none", "secagg+"] = "none"
    neighbours: int = 0  # 0: chosen from the cohort size
    threshold: int = 0  # 0: floor(neighbours / 2) + 1
    clip_range: float = 0.0  # 0: from [privacy] update_clip_norm, else 1.0
    bits: int = 16
    min_cohort: int = 2
    stage_timeout_s: float = 600.0


@dataclass
class TaskSection:
    """One task metric computed on the shared adapter (:mod:`fedtune.ml.tasks`); ``kind`` picks which keys apply.

    - ``choice``: multiple-choice accuracy by log-likelihood (``acc``, and ``acc_norm`` per answer character).
      Choices come from a list/dict column (``choices_field``), from separate columns (``choice_fields``), or
      are the constant ``choices``; ``answer_field`` holds an index, a letter or the right choice's text.
    - ``exact_match``: greedy generation, SQuAD-normalised exact match and token F1 against ``answer_field``
      (a string or a list of acceptable strings).
    - ``pass_at_k``: ``samples`` completions per problem, each run with ``test_field`` (and
      ``check(entry_point)``) in a resource-limited subprocess; the unbiased pass@k of Chen et al. (2021).
    """

    name: str = ""
    kind: Literal["choice", "exact_match", "pass_at_k"] = "choice"
    source: str = ""
    subset: str = ""
    split: str = "test"
    max_examples: int = 100  # 0: all
    prompt_template: str = "{question}"  # str.format over the row's columns
    choices_field: str = ""
    choice_fields: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    choice_prefix: str = " "  # put between prompt and each choice
    answer_field: str = "answer"
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["\n"])
    test_field: str = "test"
    entry_point_field: str = ""  # HumanEval: "entry_point", appends check(<entry point>) to the test
    samples: int = 1
    k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.0  # 0: greedy (then samples must be 1)
    timeout_s: float = 5.0
    memory_mb: int = 512


@dataclass
class EvaluationSection:
    """The server's evaluation of the shared adapter after every round.

    ``source`` names an explicit eval set (a local file or a hub id and ``split``), rendered like ``[data]``;
    empty keeps the old carve-out of ``[data] eval_fraction`` from the training source. The loss is the mean
    next-token cross-entropy in nats: ``token_mean`` over all predicted tokens of the set, or ``sequence_mean``
    (each sequence's mean, averaged). ``bos`` prepends the tokenizer's BOS so the first token is scored; ``eos``
    appends EOS and scores it. ``tasks`` run at round 0, every ``every`` rounds and at the last round.
    """

    source: str = ""
    subset: str = ""
    split: str = "test"
    max_examples: int = 256  # 0: all (explicit source only; the carve-out uses [data] eval_max_examples)
    loss: Literal["token_mean", "sequence_mean"] = "token_mean"
    bos: bool = False
    eos: bool = True
    batch_size: int = 32
    every: int = 1
    threads: int = 1  # torch threads for the server's evaluation (0: leave torch's default, all cores)
    tasks: list[TaskSection] = field(default_factory=list)


@dataclass
class RequirementsSection:
    """What a contributor's hardware must offer; each contributor checks its own before it accepts a round."""

    gpu: bool = False  # a CUDA GPU
    min_vram_gb: float = 0.0  # GiB of GPU memory (0: no minimum)
    min_compute_capability: str = ""  # e.g. "8.0" ("": any)
    bf16: bool = False  # bfloat16 support (a GPU of compute capability >= 8.0, or a CPU)
    min_ram_gb: float = 0.0  # GiB of system memory (0: no minimum)


@dataclass
class CreditSection:
    """The compute-credit ledger: SQLite in the run dir unless ``db`` names an SQLAlchemy URL."""

    db: str = ""


@dataclass
class CampaignConfig:
    """A whole campaign. Build with :func:`load_config`; it is valid once built."""

    campaign: CampaignSection = field(default_factory=CampaignSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    federation: FederationSection = field(default_factory=FederationSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    secure_aggregation: SecureAggregationSection = field(default_factory=SecureAggregationSection)
    requirements: RequirementsSection = field(default_factory=RequirementsSection)
    credit: CreditSection = field(default_factory=CreditSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    source_file: str = field(default="", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (TOML-serialisable, internal fields left out)."""
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in _sections()}

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str | Path = "<dict>") -> CampaignConfig:
        return _build(raw, Path(source), resolve_paths=False)


def _sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(CampaignConfig) if not f.metadata.get("internal")]


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> CampaignConfig:
    """Read, validate and resolve a campaign file. Raises :class:`ConfigError` on the first problem.

    Relative paths (data source, local model, run dir) are resolved against the file's folder.
    ``overrides`` (section -> key -> value) are what command-line flags set.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "(file)", "a readable campaign TOML file", "nothing at that path")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "(syntax)", "valid TOML", str(exc)) from None
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return _build(raw, path, resolve_paths=True)


def _build(raw: dict[str, Any], path: Path, resolve_paths: bool) -> CampaignConfig:
    known = {f.name: f for f in _sections()}
    for key in raw:
        if key not in known:
            raise ConfigError(path, f"[{key}]", f"one of the sections {sorted(known)}", "an unknown section")
    sections = {}
    hints = typing.get_type_hints(CampaignConfig)
    for name in known:
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(path, f"[{name}]", "a table", values)
        sections[name] = _build_section(hints[name], values, path, name)
    cfg = CampaignConfig(**sections, source_file=str(path))
    _check_semantics(cfg, path)
    if resolve_paths:
        _resolve_paths(cfg, path)
    return cfg


def _build_section(cls: type, values: dict[str, Any], path: Path, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(path, f"[{section}] {key}", f"one of the keys {sorted(names)}", "an unknown key")
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _check_type(value, hints[key], path, f"[{section}] {key}")
    return cls(**kwargs)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return "a table"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is dict:
        return "a table of " + _describe(get_args(tp)[1]).split(" ", 1)[-1] + "s"
    if origin is list:
        return "a list of " + _describe(get_args(tp)[0]).split(" ", 1)[-1] + "s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "nothing"}.get(
        tp, str(tp)
    )


def _check_type(value: Any, tp: Any, path: Path, key: str) -> Any:
    origin = get_origin(tp)
    ok = False
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build_section(tp, value, path, key.removeprefix("[").replace("] ", "."))
    elif origin is Literal:
        ok = value in get_args(tp)
    elif origin is dict:
        ok = isinstance(value, dict)
        if ok:
            return {str(k): _check_type(v, get_args(tp)[1], path, f"{key}.{k}") for k, v in value.items()}
    elif origin is list:
        ok = isinstance(value, list)
        if ok:
            return [_check_type(v, get_args(tp)[0], path, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _check_type(value, option, path, key)
            except ConfigError:
                continue
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is type(None):
        ok = value is None
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(path, key, _describe(tp), value)
    return value


def _require(cond: bool, path: Path, key: str, expected: str, found: object) -> None:
    if not cond:
        raise ConfigError(path, key, expected, found)


def _check_semantics(cfg: CampaignConfig, path: Path) -> None:
    """Value ranges and cross-field rules that types alone cannot express."""
    fed, sim, lora, data = cfg.federation, cfg.simulation, cfg.lora, cfg.data
    positive_ints = {
        "[lora] rank": lora.rank,
        "[federation] rounds": fed.rounds,
        "[federation] contributors_per_round": fed.contributors_per_round,
        "[federation] min_cohort": fed.min_cohort,
        "[federation] local_steps": fed.local_steps,
        "[federation] batch_size": fed.batch_size,
        "[simulation] contributors": sim.contributors,
    }
    for key, value in positive_ints.items():
        _require(value >= 1, path, key, "an integer >= 1", value)
    for key, value in {
        "[federation] learning_rate": fed.learning_rate,
        "[lora] alpha": lora.alpha,
        "[federation] server_learning_rate": fed.server_learning_rate,
        "[simulation] dirichlet_alpha": sim.dirichlet_alpha,
        "[federation] round_timeout_s": fed.round_timeout_s,
        "[simulation] cpus_per_contributor": sim.cpus_per_contributor,
    }.items():
        _require(value > 0, path, key, "a number > 0", value)
    _require(
        data.max_seq_len >= 2,
        path,
        "[data] max_seq_len",
        "an integer >= 2 (at least one token plus the end-of-sequence token)",
        data.max_seq_len,
    )
    _require(
        0 <= fed.min_learning_rate <= fed.learning_rate,
        path,
        "[federation] min_learning_rate",
        f"a number in [0, learning_rate = {fed.learning_rate:g}]",
        fed.min_learning_rate,
    )
    _require(0 <= lora.dropout < 1, path, "[lora] dropout", "a number in [0, 1)", lora.dropout)
    _require(
        0 <= fed.server_momentum < 1, path, "[federation] server_momentum", "a number in [0, 1)", fed.server_momentum
    )
    _require(0 < data.eval_fraction < 1, path, "[data] eval_fraction", "a number in (0, 1)", data.eval_fraction)
    _require(data.eval_max_examples >= 1, path, "[data] eval_max_examples", "an integer >= 1", data.eval_max_examples)
    _require(
        len(lora.target_modules) > 0,
        path,
        "[lora] target_modules",
        "a non-empty list of module names",
        lora.target_modules,
    )
    _require(data.source != "", path, "[data] source", "a local data file or a datasets hub id", data.source)
    _require(
        fed.min_cohort <= fed.contributors_per_round,
        path,
        "[federation] min_cohort",
        f"at most contributors_per_round ({fed.contributors_per_round})",
        fed.min_cohort,
    )
    _require(
        fed.contributors_per_round <= sim.contributors,
        path,
        "[federation] contributors_per_round",
        f"at most [simulation] contributors ({sim.contributors})",
        fed.contributors_per_round,
    )
    priv, sec = cfg.privacy, cfg.secure_aggregation
    for key, value in {
        "[privacy] target_epsilon": priv.target_epsilon,
        "[privacy] max_grad_norm": priv.max_grad_norm,
        "[secure_aggregation] stage_timeout_s": sec.stage_timeout_s,
    }.items():
        _require(value > 0, path, key, "a number > 0", value)
    for key, value in {
        "[privacy] delta": priv.delta,
        "[privacy] update_clip_norm": priv.update_clip_norm,
        "[secure_aggregation] clip_range": sec.clip_range,
    }.items():
        _require(value >= 0, path, key, "a number >= 0 (0 = automatic or off)", value)
    _require(priv.delta < 1, path, "[privacy] delta", "a number in [0, 1)", priv.delta)
    for key, value in {
        "[privacy] planned_rounds": priv.planned_rounds,
        "[secure_aggregation] neighbours": sec.neighbours,
        "[secure_aggregation] threshold": sec.threshold,
    }.items():
        _require(value >= 0, path, key, "an integer >= 0 (0 = automatic)", value)
    for pid, eps in priv.personal_max_epsilon.items():
        _require(
            pid.isdigit() and int(pid) < sim.contributors,
            path,
            f"[privacy] personal_max_epsilon.{pid}",
            f"a contributor partition id below {sim.contributors}",
            pid,
        )
        _require(eps > 0, path, f"[privacy] personal_max_epsilon.{pid}", "a number > 0", eps)
    for pid in sim.extra_data:
        _require(
            pid.isdigit() and int(pid) < sim.contributors,
            path,
            f"[simulation] extra_data.{pid}",
            f"a contributor partition id below {sim.contributors}",
            pid,
        )
    _check_data_options(cfg, path)
    _check_evaluation(cfg, path)
    _require(1 <= sec.bits <= 30, path, "[secure_aggregation] bits", "an integer in [1, 30]", sec.bits)
    _require(sec.min_cohort >= 2, path, "[secure_aggregation] min_cohort", "an integer >= 2", sec.min_cohort)
    _require(cfg.campaign.run_dir != "", path, "[campaign] run_dir", "a directory path", cfg.campaign.run_dir)
    _check_hardware_keys(cfg, path)


def _check_hardware_keys(cfg: CampaignConfig, path: Path) -> None:
    """Home-GPU keys: precision, quantization, micro-batches, per-contributor choices, requirements."""
    model, fed, sim, req = cfg.model, cfg.federation, cfg.simulation, cfg.requirements
    _require(
        not (model.dtype == "float16" and cfg.privacy.mechanism == "dp-sgd"),
        path,
        "[model] dtype",
        "'bfloat16' or 'float32' under DP-SGD (float16 needs loss scaling, which per-sample clipping would see)",
        model.dtype,
    )
    _require(
        fed.micro_batch_size >= 0,
        path,
        "[federation] micro_batch_size",
        "an integer >= 0 (0 = the whole batch at once)",
        fed.micro_batch_size,
    )
    limits = {
        "max_rank": (sim.max_rank, cfg.lora.rank, "the campaign's [lora] rank"),
        "batch_size": (sim.batch_size, fed.batch_size, "the campaign's [federation] batch_size"),
        "micro_batch_size": (sim.micro_batch_size, None, None),
    }
    for key, (table, most, what) in limits.items():
        for pid, value in table.items():
            name = f"[simulation] {key}.{pid}"
            _require(
                pid.isdigit() and int(pid) < sim.contributors,
                path,
                name,
                f"a contributor partition id below {sim.contributors}",
                pid,
            )
            _require(value >= 1, path, name, "an integer >= 1", value)
            if most is not None:
                _require(value <= most, path, name, f"at most {what} ({most})", value)
    _require(
        not sim.max_rank or cfg.lora.mode == "ffa",
        path,
        "[simulation] max_rank",
        "no per-contributor rank unless [lora] mode = 'ffa' (plain LoRA averages A too: ranks cannot mix)",
        sim.max_rank,
    )
    minimums = {"[requirements] min_vram_gb": req.min_vram_gb, "[requirements] min_ram_gb": req.min_ram_gb}
    for key, value in minimums.items():
        _require(value >= 0, path, key, "a number >= 0 (0 = no minimum)", value)
    _require(
        req.min_compute_capability == "" or parse_capability(req.min_compute_capability) is not None,
        path,
        "[requirements] min_compute_capability",
        'a CUDA compute capability "MAJOR.MINOR" such as "8.0" (or "" for any)',
        req.min_compute_capability,
    )


def parse_capability(text: str) -> tuple[int, int] | None:
    """``"8.6"`` -> ``(8, 6)``; ``None`` when ``text`` is not ``MAJOR.MINOR``."""
    major, dot, minor = text.strip().partition(".")
    if not (major.isdigit() and dot and minor.isdigit()):
        return None
    return int(major), int(minor)


def _check_data_options(cfg: CampaignConfig, path: Path) -> None:
    data, sim = cfg.data, cfg.simulation
    _require(
        sim.partitioner != "dirichlet" or data.label_field != "",
        path,
        "[data] label_field",
        'the column the dirichlet partitioner splits by (e.g. "label"), since [simulation] partitioner = "dirichlet"',
        data.label_field,
    )
    if data.template:
        _check_template(data.template, {"instruction", "input", "response"}, path, "[data] template")
        _require(
            "{response}" in data.template, path, "[data] template", "a template containing {response}", data.template
        )
    for key, value in {"[data] chat_template": data.chat_template, "[data] template": data.template}.items():
        _require(
            not value or data.format == "instruction",
            path,
            key,
            'to be set only with [data] format = "instruction"',
            value,
        )
    _require(
        not (data.chat_template and data.template),
        path,
        "[data] template",
        "empty when [data] chat_template = true (the tokenizer's template renders the rows)",
        data.template,
    )


def _check_template(template: str, allowed: set[str] | None, path: Path, key: str) -> None:
    """A ``str.format`` template: well-formed, and naming only ``allowed`` fields (None: any field)."""
    import string

    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(path, key, "a str.format template (double {{ }} for literal braces)", str(exc)) from None
    unknown = sorted(n for n in names if n == "" or n.isdigit() or (allowed is not None and n not in allowed))
    _require(not unknown, path, key, f"a template naming only {sorted(allowed or ['columns'])}", unknown)


def _check_evaluation(cfg: CampaignConfig, path: Path) -> None:
    ev = cfg.evaluation
    for key, value in {
        "[evaluation] batch_size": ev.batch_size,
        "[evaluation] every": ev.every,
    }.items():
        _require(value >= 1, path, key, "an integer >= 1", value)
    for key, value in {"[evaluation] max_examples": ev.max_examples, "[evaluation] threads": ev.threads}.items():
        _require(value >= 0, path, key, "an integer >= 0 (0 = all / torch's default)", value)
    names = [t.name for t in ev.tasks]
    for i, task in enumerate(ev.tasks):
        key = f"[evaluation.tasks[{i}]]"
        _require(
            task.name != "" and names.count(task.name) == 1, path, f"{key} name", "a unique, non-empty name", task.name
        )
        _require(task.source != "", path, f"{key} source", "a local data file or a datasets hub id", task.source)
        _require(task.max_examples >= 0, path, f"{key} max_examples", "an integer >= 0 (0 = all)", task.max_examples)
        _check_template(task.prompt_template, None, path, f"{key} prompt_template")
        if task.kind == "choice":
            given = [bool(task.choices_field), bool(task.choice_fields), bool(task.choices)]
            _require(
                sum(given) == 1,
                path,
                f"{key} choices_field",
                "exactly one of choices_field (a list or dict column), choice_fields (columns) or choices (labels)",
                {"choices_field": task.choices_field, "choice_fields": task.choice_fields, "choices": task.choices},
            )
            _require(
                not task.choices or len(task.choices) >= 2, path, f"{key} choices", "at least 2 labels", task.choices
            )
            continue
        _require(task.max_new_tokens >= 1, path, f"{key} max_new_tokens", "an integer >= 1", task.max_new_tokens)
        _require(task.temperature >= 0, path, f"{key} temperature", "a number >= 0 (0 = greedy)", task.temperature)
        if task.kind == "pass_at_k":
            _require(task.samples >= 1, path, f"{key} samples", "an integer >= 1", task.samples)
            _require(
                len(task.k) > 0 and all(1 <= k <= task.samples for k in task.k),
                path,
                f"{key} k",
                f"a non-empty list of integers in [1, samples = {task.samples}]",
                task.k,
            )
            _require(
                task.samples == 1 or task.temperature > 0,
                path,
                f"{key} temperature",
                "a number > 0 when samples > 1 (greedy decoding gives one completion)",
                task.temperature,
            )
            _require(task.timeout_s > 0, path, f"{key} timeout_s", "a number > 0", task.timeout_s)
            _require(task.memory_mb >= 16, path, f"{key} memory_mb", "an integer >= 16", task.memory_mb)


def is_builtin(name: str) -> bool:
    """A ``builtin:`` model name (built locally, never downloaded)."""
    return name.startswith(BUILTIN_PREFIX)


def looks_local(source: str) -> bool:
    """A data source or model name that is written as a local path rather than a hub id ("org/name").

    Deliberately blind to the working directory: a relative path means the campaign file's folder.
    """
    return source.startswith((".", "/", "~")) or source.endswith(LOCAL_DATA_SUFFIXES) or source.count("/") > 1


def _resolve_paths(cfg: CampaignConfig, path: Path) -> None:
    """Make every local path absolute against the campaign file's folder (never the working directory).

    A name is local when it exists relative to that folder or looks like a path (:func:`looks_local`);
    anything else is a hub id, checked by preflight when it resolves the model and loads the data.
    """
    base = path.resolve().parent

    def resolve(p: str) -> str:
        return str((base / Path(p).expanduser()).resolve())

    def is_local(name: str) -> bool:
        return (base / Path(name).expanduser()).exists() or looks_local(name)

    sources = {"[data] source": (cfg.data, "source")}
    if cfg.evaluation.source:
        sources["[evaluation] source"] = (cfg.evaluation, "source")
    for i, task in enumerate(cfg.evaluation.tasks):
        sources[f"[evaluation.tasks[{i}]] source"] = (task, "source")
    for key, (section, attr) in sources.items():
        value = getattr(section, attr)
        if is_local(value):
            setattr(section, attr, resolve(value))
            _require(
                Path(getattr(section, attr)).exists(),
                path,
                key,
                f"an existing data file or directory (relative paths are read from {base})",
                value,
            )
    if not is_builtin(cfg.model.name) and is_local(cfg.model.name):
        cfg.model.name = resolve(cfg.model.name)
        model_dir = Path(cfg.model.name)
        _require(
            model_dir.is_dir(),
            path,
            "[model] name",
            f"a model directory (relative paths are read from {base}) or a hub id",
            cfg.model.name,
        )
        _require(
            (model_dir / "config.json").is_file(),
            path,
            "[model] name",
            "a model directory containing config.json",
            cfg.model.name,
        )
        _require(
            any((model_dir / w).is_file() for w in WEIGHT_FILES),
            path,
            "[model] name",
            f"a model directory with weights ({' or '.join(WEIGHT_FILES[::2])})",
            cfg.model.name,
        )
    for pid, extra in list(cfg.simulation.extra_data.items()):
        cfg.simulation.extra_data[pid] = resolve(extra)
        _require(
            Path(cfg.simulation.extra_data[pid]).is_file(),
            path,
            f"[simulation] extra_data.{pid}",
            "an existing data file",
            extra,
        )
    cfg.campaign.run_dir = resolve(cfg.campaign.run_dir)
