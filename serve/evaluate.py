"""Score an exported model on a run's held-out split, in one process, with the family's own metrics.

This is what the eval gate compares, and it reproduces what training reported: the same rows in the same
order (the first `trainer.eval_batches x micro_batch_size x num_workers` validation rows, as the training loop
reads them), the same per-row outputs (`Family.predict`) and the same metrics (`Family.eval_metrics`).
"""

import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from conf.derived import worker_range
from conf.schema import RootConfig
from serve.export import LoadedModel, family_of, read_model_config
from trainers.families import get_family

logger = logging.getLogger(__name__)

BATCH_ROWS = 64  # rows per forward pass; the metrics do not depend on it


def training_eval_rows(cfg: RootConfig) -> int:
    """Rows the training loop scored at each evaluation; 0 means the whole validation split. An elastic run
    scored as many rows as the workers it had at the time; this takes its maximum."""
    return cfg.trainer.eval_batches * cfg.trainer.micro_batch_size * worker_range(cfg.cluster)[1]


def _column_to_tensor(column: pa.ChunkedArray) -> torch.Tensor:
    array = column.combine_chunks()
    if pa.types.is_fixed_size_list(array.type):
        values = array.flatten().to_numpy(zero_copy_only=False)
        return torch.from_numpy(values.reshape(len(array), array.type.list_size).copy())
    return torch.from_numpy(array.to_numpy(zero_copy_only=False).copy())


def held_out_batches(val_dir: Path, *, columns: list[str], rows: int) -> Iterator[dict[str, torch.Tensor]]:
    """The first `rows` validation rows (0: all) in shard order, in batches of BATCH_ROWS."""
    files = sorted(Path(val_dir).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{val_dir} has no part-*.parquet shards: prepare the run's data again")
    remaining = rows or None
    for file in files:
        table = pq.read_table(file, columns=columns)
        if remaining is not None:
            table = table.slice(0, remaining)
            remaining -= table.num_rows
        for start in range(0, table.num_rows, BATCH_ROWS):
            part = table.slice(start, BATCH_ROWS)
            yield {name: _column_to_tensor(part.column(name)) for name in columns}
        if remaining == 0:
            return


@torch.no_grad()
def evaluate_model(loaded: LoadedModel, batches) -> dict[str, float]:
    """The family's validation metrics of an exported model over `batches`."""
    family = family_of(loaded.model_config)
    outputs: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        for key, values in family.predict(loaded.model, batch).items():
            outputs.setdefault(key, []).append(values.float())
    if not outputs:
        raise ValueError("the held-out split has no rows to evaluate")
    return family.eval_metrics({key: torch.cat(values).numpy() for key, values in outputs.items()})


def evaluate_on_run_data(loaded: LoadedModel, run_cfg: RootConfig, *, rows: int | None,
                         trained_on: str | None = None) -> dict[str, float]:
    """Metrics on the held-out split the run trained against (prepared again if the cache lost it). With
    `trained_on` (the run's data fingerprint), data that changed since (edited files under data.path) is
    refused: the gate would score the checkpoint on rows it may have trained on, or with other token ids."""
    count = training_eval_rows(run_cfg) if rows is None else rows
    return evaluate_model(loaded, run_held_out_batches(run_cfg, rows=count, trained_on=trained_on))


def profile_on_run_data(export_dir: Path, run_cfg: RootConfig, *, rows: int, trained_on: str | None = None):
    """The export's reference profile (serve/profiles.py) from the first `rows` (0: all) rows of the run's
    held-out split, as its family's replica class profiles live traffic."""
    from serve.replicas import replica_class

    build = replica_class(read_model_config(export_dir)["family"]).reference_profile
    with torch.no_grad():
        return build(Path(export_dir), run_held_out_batches(run_cfg, rows=rows, trained_on=trained_on))


def run_held_out_batches(run_cfg: RootConfig, *, rows: int, trained_on: str | None,
                         split: str = "val") -> Iterator[dict]:
    """The run's held-out split, or with split="train" its training split (scripts/replay_traffic.py replays rows
    the reference never saw); see evaluate_on_run_data for `trained_on`."""
    family = get_family(run_cfg.model.family)
    prepared = family.prepare_data(run_cfg.model, run_cfg.data, cache_root=Path(run_cfg.paths.data_cache).resolve())
    if trained_on and prepared.fingerprint != trained_on:
        raise ValueError(
            f"the run's data changed since it trained (data fingerprint {trained_on[:12]} -> "
            f"{prepared.fingerprint[:12]}): its held-out split is not the one the run held out. Train again on "
            "this data (checkpoint.resume=fresh), or restore the data the run trained on"
        )
    directory = prepared.val_dir if split == "val" else prepared.train_dir
    return held_out_batches(Path(directory), columns=prepared.columns(split), rows=rows)
