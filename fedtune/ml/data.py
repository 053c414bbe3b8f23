"""Campaign data: load with ``datasets``, hold out the server's eval split, partition, tokenize, batch.

Every process (server and each contributor) derives the same split from the campaign seed, so in
simulation a virtual contributor loads only its own partition and never sees the eval split.
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


class DataError(ValueError):
    """Data that does not match the campaign's ``[data]`` section."""


def load_raw(data: DataSection) -> Dataset:
    """The whole dataset as one ``datasets.Dataset`` (local file, local dataset folder, or hub id).

    Raises :class:`DataError` (one line) for anything that is not usable records with the configured fields:
    an empty or unparsable file, an empty folder, an unreachable hub id, a missing field, a field that does
    not hold text in every record.
    """
    from datasets.exceptions import DatasetsError

    path = Path(data.source)
    builder = _BUILDERS.get(path.suffix)
    if path.is_file() and builder is None:
        raise DataError(f"{data.source}: expected a file ending in {sorted(_BUILDERS)}")
    try:
        if path.is_file():
            ds = load_dataset(builder, data_files=str(path), split="train")
        else:
            ds = load_dataset(data.source, split=data.split)
    except StopIteration:  # datasets' json builder on a file without a single record
        raise DataError(f"{data.source}: expected records, found none (an empty file)") from None
    except (DatasetsError, OSError, ValueError, TypeError) as exc:
        what = f"{builder} records" if path.is_file() else "a dataset"
        raise DataError(f"{data.source}: expected {what}, found an error: {one_line(exc)}") from None
    needed = [data.text_field] if data.format == "text" else [data.instruction_field, data.response_field]
    if path.suffix == ".txt":
        needed = ["text"]
    missing = [f for f in needed if f not in ds.column_names]
    if missing:
        raise DataError(
            f"{data.source}: [data] {data.format} format needs field(s) {missing}, found columns {ds.column_names}"
        )
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


def render(data: DataSection, row: dict) -> str:
    if data.format == "instruction":
        return INSTRUCTION_TEMPLATE.format(instruction=row[data.instruction_field], response=row[data.response_field])
    return row[data.text_field if data.text_field in row else "text"]


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


def partition(
    cfg: CampaignConfig, pool: Dataset, partition_id: int, num_partitions: int, partition_by: str | None = None
) -> Dataset:
    """One virtual contributor's shard, cut by ``flwr-datasets`` partitioners."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    sim = cfg.simulation
    if sim.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        key = partition_by or _label_column(cfg, pool)
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=key,
            alpha=sim.dirichlet_alpha,
            min_partition_size=1,
            seed=cfg.campaign.seed,
        )
    partitioner.dataset = pool
    return partitioner.load_partition(partition_id)


def _label_column(cfg: CampaignConfig, pool: Dataset) -> str:
    """Dirichlet needs a label: the first string column that is not the text itself."""
    text_cols = {cfg.data.text_field, cfg.data.instruction_field, cfg.data.response_field}
    for name in pool.column_names:
        if name not in text_cols:
            return name
    raise DataError(
        f"{cfg.data.source}: the dirichlet partitioner needs a label column besides the text; "
        f"found only {pool.column_names}"
    )


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


def tokenize(data: DataSection, ds: Dataset, tokenizer) -> TokenizedSet:
    texts = [render(data, row) for row in ds]
    ids = tokenizer(texts, truncation=True, max_length=data.max_seq_len - 1, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return TokenizedSet(ids=[r + [eos] for r in ids if len(r) > 0], pad_id=tokenizer.pad_token_id)


def load_eval(cfg: CampaignConfig, tokenizer) -> TokenizedSet:
    _, eval_ds = split_eval(cfg, load_raw(cfg.data))
    return tokenize(cfg.data, eval_ds, tokenizer)


def load_shard(cfg: CampaignConfig, tokenizer, partition_id: int, num_partitions: int) -> TokenizedSet:
    """A virtual contributor's tokenized shard, plus its ``[simulation] extra_data`` records if any."""
    from datasets import concatenate_datasets

    pool, _ = split_eval(cfg, load_raw(cfg.data))
    shard = partition(cfg, pool, partition_id, num_partitions)
    extra = cfg.simulation.extra_data.get(str(partition_id))
    if extra:
        added = load_raw(dataclasses.replace(cfg.data, source=extra)).select_columns(shard.column_names)
        shard = concatenate_datasets([shard, added.cast(shard.features)])
    return tokenize(cfg.data, shard, tokenizer)
