"""Campaign data: load with ``datasets``, hold out the server's eval split, partition, tokenize, batch.

Every process (server and each contributor) derives the same split from the campaign seed, so in
simulation a virtual contributor loads only its own partition and never sees the eval split. With an
explicit ``[evaluation] source`` nothing is carved out: the eval set is its own file or hub split, and the
server never needs the training data.

Pitfalls: the dirichlet partitioner splits by ``[data] label_field`` and nothing else (a guessed column, say an
``id``, silently starves contributors), and :func:`check_partitions` refuses an id-like or starving column
before a run starts. A chat template that writes its own BOS plus ``add_special_tokens`` would double it: the
duplicate is dropped. EOS is appended unless the tokenizer already ended the example with one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, load_dataset

from fedtune.config import CampaignConfig, DataSection
from fedtune.console import one_line

_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n### Response:\n{response}"
INSTRUCTION_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n{response}"
ID_LIKE_FRACTION = 0.5
"""A dirichlet label column with more distinct values than this fraction of the rows is an id, not a label."""


class DataError(ValueError):
    """Data that does not match the campaign's ``[data]`` section."""


def load_table(source: str, split: str = "train", subset: str = "") -> Dataset:
    """One split of a local file (any of ``_BUILDERS``), a local dataset folder, or a ``datasets`` hub id.

    A local file is a single split whatever ``split`` says. Anything ``datasets`` raises (an empty or unparsable
    file, an empty folder, no such hub id, no network, an unknown split) becomes a one-line :class:`DataError`
    naming the source.
    """
    path = Path(source)
    builder = _BUILDERS.get(path.suffix)
    if path.is_file() and builder is None:
        raise DataError(f"{source}: expected a file ending in {sorted(_BUILDERS)}")
    try:
        if path.is_file():
            return load_dataset(builder, data_files=str(path), split="train")
        return load_dataset(source, subset or None, split=split)
    except StopIteration:  # datasets' json builder on a file without a single record
        raise DataError(f"{source}: expected records, found none (an empty file)") from None
    except Exception as exc:  # datasets raises many types (DatasetsError, OSError, ValueError, ConnectionError...)
        what = f"{builder} records" if path.is_file() else f"a dataset with split {split!r}"
        raise DataError(f"{source}: expected {what}, found an error: {one_line(exc)}") from None


def data_fields(data: DataSection) -> list[str]:
    """The columns ``[data]`` renders every row from (the label column is checked by :func:`partition`)."""
    if data.format == "text":
        return [data.text_field]
    return [data.instruction_field, data.response_field] + ([data.input_field] if data.input_field else [])


def require_fields(ds: Dataset, needed: list[str], source: str, what: str) -> None:
    missing = [f for f in needed if f not in ds.column_names]
    if missing:
        raise DataError(f"{source}: {what} needs field(s) {missing}, found columns {ds.column_names}")


def load_raw(data: DataSection) -> Dataset:
    """The whole training dataset as one ``datasets.Dataset`` (local file, local dataset folder, or hub id).

    Raises :class:`DataError` (one line) for anything that is not usable records with the configured fields:
    an empty or unparsable file, an empty folder, an unreachable hub id, a missing field, a field that does
    not hold text in every record.
    """
    ds = load_table(data.source, data.split, data.subset)
    needed = ["text"] if Path(data.source).suffix == ".txt" else data_fields(data)
    require_fields(ds, needed, data.source, f"[data] {data.format} format")
    if len(ds) == 0:
        raise DataError(f"{data.source}: expected records, found none")
    for name in needed:
        _check_text_column(data, ds, name)
    return ds


def _check_text_column(data: DataSection, ds: Dataset, name: str) -> None:
    """Every record's ``name`` must be a string: a number, a list or a missing value cannot be tokenized."""
    feature = ds.features[name]
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string"):
        example = next((v for v in ds[name] if not isinstance(v, str)), None)
        raise DataError(
            f"{data.source}: field {name!r} must hold text in every record, found {type(example).__name__} "
            f"values such as {example!r}"
        )
    nulls = ds.data.column(name).null_count
    if nulls:
        raise DataError(f"{data.source}: field {name!r} must hold text in every record, {nulls} record(s) lack it")


def render(data: DataSection, row: dict, tokenizer=None) -> str:
    """One example as the text the model trains on (instruction rows through the template or chat template)."""
    if data.format != "instruction":
        return row[data.text_field if data.text_field in row else "text"]
    instruction, response = str(row[data.instruction_field]), str(row[data.response_field])
    context = str(row.get(data.input_field) or "") if data.input_field else ""
    if data.chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{data.source}: [data] chat_template = true, but the tokenizer has no chat template")
        user = f"{instruction}\n\n{context}" if context else instruction
        messages = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    template = data.template or (INSTRUCTION_INPUT_TEMPLATE if context else INSTRUCTION_TEMPLATE)
    return template.format(instruction=instruction, input=context, response=response)


def split_eval(cfg: CampaignConfig, ds: Dataset) -> tuple[Dataset, Dataset]:
    """(train pool, held-out eval set): a seeded shuffle, the first ``eval_fraction`` held out."""
    ds = ds.shuffle(seed=cfg.campaign.seed)
    n_eval = max(1, min(cfg.data.eval_max_examples, int(len(ds) * cfg.data.eval_fraction)))
    if len(ds) - n_eval < cfg.simulation.contributors:
        raise DataError(
            f"{cfg.data.source}: {len(ds)} examples is too few for an eval split of {n_eval} "
            f"and {cfg.simulation.contributors} contributors"
        )
    return ds.select(range(n_eval, len(ds))), ds.select(range(n_eval))


def training_pool(cfg: CampaignConfig, ds: Dataset, hold_out: bool = True) -> Dataset:
    """What the contributors share out: everything, or what the carved-out eval split leaves (no explicit eval set).

    ``hold_out=False``: everything, whatever the campaign says; a deployed contributor's own data is nobody's
    eval set, so carving one out of it would only cost it examples (and hand the coordinator a knob for that).
    """
    if cfg.evaluation.source or not hold_out:
        if len(ds) < cfg.simulation.contributors:
            raise DataError(
                f"{cfg.data.source}: {len(ds)} examples is too few for {cfg.simulation.contributors} contributors"
            )
        return ds.shuffle(seed=cfg.campaign.seed)
    return split_eval(cfg, ds)[0]


def partition(
    cfg: CampaignConfig, pool: Dataset, partition_id: int, num_partitions: int, partition_by: str | None = None
) -> Dataset:
    """One virtual contributor's shard, cut by ``flwr-datasets`` partitioners (dirichlet: by ``[data] label_field``)."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    sim = cfg.simulation
    if sim.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        key = partition_by or cfg.data.label_field
        if not key or key not in pool.column_names:
            raise DataError(
                f"{cfg.data.source}: the dirichlet partitioner needs [data] label_field naming a column, "
                f"found {key!r} among {pool.column_names}"
            )
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=key,
            alpha=sim.dirichlet_alpha,
            min_partition_size=1,
            seed=cfg.campaign.seed,
        )
    partitioner.dataset = pool
    return partitioner.load_partition(partition_id)


def check_partitions(cfg: CampaignConfig, pool: Dataset) -> list[int]:
    """Every virtual contributor's shard size; a :class:`DataError` if the partitioning fails or leaves one empty.

    Preflight runs this so a bad label column (an id, a column with one value) stops the campaign before its
    run dir exists, instead of silently giving rounds without contributors.
    """
    n, key = cfg.simulation.contributors, cfg.data.label_field
    if cfg.simulation.partitioner == "dirichlet" and key in pool.column_names:
        distinct = len(set(pool[key]))
        if distinct > ID_LIKE_FRACTION * len(pool):
            raise DataError(
                f"{cfg.data.source}: [data] label_field {key!r} has {distinct} distinct values in {len(pool)} rows: "
                "an id, not a label; name a class column"
            )
    try:
        sizes = [len(partition(cfg, pool, pid, n)) for pid in range(n)]
    except DataError:
        raise
    except Exception as exc:  # flwr-datasets gives up after its sampling attempts
        raise DataError(f"{cfg.data.source}: partitioning by {key or 'iid'!r} failed: {exc}") from None
    empty = [pid for pid, size in enumerate(sizes) if size == 0]
    if empty:
        raise DataError(f"{cfg.data.source}: partitioning by {key!r} leaves contributors {empty} without data")
    return sizes


@dataclass
class TokenizedSet(torch.utils.data.Dataset[list[int]]):
    """Token ids of each example, unpadded: a map-style dataset (item = one example's ids), padded by :meth:`pad`.

    Items are lists, not indices: Opacus' ``DPDataLoader`` inspects ``dataset[0]`` to shape empty batches.
    """

    ids: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> list[int]:
        return self.ids[index]

    def pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad ``rows`` to the longest one; padding has ``attention_mask == 0`` (a loader's collate_fn)."""
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.pad([self.ids[i] for i in indices])

    def tokens(self) -> int:
        return sum(len(r) - 1 for r in self.ids)


def tokenize(
    data: DataSection, ds: Dataset, tokenizer, *, bos: bool | None = None, eos: bool | None = None
) -> TokenizedSet:
    """Token ids of every rendered example, at most ``max_seq_len`` long, empty examples dropped.

    By default ``[data] add_special_tokens`` decides whether the tokenizer adds its own special tokens and
    ``[data] append_eos`` whether an EOS ends each example. ``bos``/``eos`` given explicitly (the evaluation set)
    override both: no tokenizer specials, and BOS/EOS exactly as asked.
    """
    explicit = bos is not None or eos is not None
    add_eos = data.append_eos if eos is None else eos
    add_bos = bool(bos)
    if add_bos and tokenizer.bos_token_id is None:
        raise DataError(f"{data.source}: a BOS token was asked for, but the tokenizer has none")
    texts = [render(data, row, tokenizer) for row in ds]
    reserve = int(add_eos) + int(add_bos)
    special = data.add_special_tokens and not explicit
    ids = tokenizer(texts, truncation=True, max_length=data.max_seq_len - reserve, add_special_tokens=special)[
        "input_ids"
    ]
    bos_id, eos_id, out = tokenizer.bos_token_id, tokenizer.eos_token_id, []
    for r in ids:
        if len(r) > 1 and r[0] == r[1] == bos_id:  # a chat template that writes BOS, plus the tokenizer's own
            r = r[1:]
        if not [t for t in r if t not in (bos_id, eos_id)]:
            continue
        if add_bos and r[0] != bos_id:
            r = [bos_id, *r]
        if add_eos and r[-1] != eos_id:
            r = [*r, eos_id]
        out.append(r)
    return TokenizedSet(ids=out, pad_id=tokenizer.pad_token_id)


def load_eval_rows(cfg: CampaignConfig) -> Dataset:
    """The evaluation rows: ``[evaluation] source`` (its first ``max_examples``) or the carve-out of ``[data]``."""
    ev = cfg.evaluation
    if not ev.source:
        return split_eval(cfg, load_raw(cfg.data))[1]
    ds = load_table(ev.source, ev.split, ev.subset)
    needed = ["text"] if Path(ev.source).suffix == ".txt" else data_fields(cfg.data)
    require_fields(ds, needed, ev.source, f"[evaluation] source, rendered as [data] {cfg.data.format},")
    if ev.max_examples:
        ds = ds.select(range(min(ev.max_examples, len(ds))))
    if len(ds) == 0:
        raise DataError(f"{ev.source}: the evaluation split {ev.split!r} is empty")
    return ds


def load_eval(cfg: CampaignConfig, tokenizer) -> TokenizedSet:
    """The tokenized evaluation set, with BOS/EOS as ``[evaluation]`` states them."""
    ev = cfg.evaluation
    return tokenize(cfg.data, load_eval_rows(cfg), tokenizer, bos=ev.bos, eos=ev.eos)


def load_shard(
    cfg: CampaignConfig, tokenizer, partition_id: int, num_partitions: int, hold_out: bool = True
) -> TokenizedSet:
    """A contributor's tokenized shard, plus its ``[simulation] extra_data`` records if any.

    ``hold_out`` as in :func:`training_pool` (``False`` for a deployed contributor's own ``--data``).
    """
    from datasets import concatenate_datasets

    pool = training_pool(cfg, load_raw(cfg.data), hold_out)
    shard = partition(cfg, pool, partition_id, num_partitions)
    extra = cfg.simulation.extra_data.get(str(partition_id))
    if extra:
        added = load_raw(dataclasses.replace(cfg.data, source=extra)).select_columns(shard.column_names)
        shard = concatenate_datasets([shard, added.cast(shard.features)])
    return tokenize(cfg.data, shard, tokenizer)
