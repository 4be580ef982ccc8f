"""Issue 14, small validation splits: a split smaller than one eval batch (micro_batch_size x workers) is
evaluated, its short batch padded and the padding masked out; only an empty split is refused. The evaluation
runs on two gloo processes (no Ray): the padding only matters when ranks share a batch."""

import contextlib
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.helpers import RANKER_OVERRIDES, compose_config
from trainers.config import config_from_dict, plain_config
from trainers.run import _check_data_fits

MICRO, WORLD = 2, 2  # one eval batch: 4 rows


class _Shard:
    """What evaluate() reads of a Ray Data shard: ordered batches of a column dict, the last one short."""

    def __init__(self, rows: int):
        self.values = torch.arange(1, rows + 1, dtype=torch.float32)

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool):
        for start in range(0, len(self.values), batch_size):
            yield {"x": self.values[start:start + batch_size]}


class _Family:
    """A family whose metrics count and sum the rows they saw, so padding would show."""

    @staticmethod
    def predict(model, batch):
        return {"x": model(batch["x"])}

    @staticmethod
    def eval_metrics(outputs):
        return {"rows": float(len(outputs["x"])), "total": float(outputs["x"].sum())}


class _Strategy:
    def __init__(self):
        self.model = nn.Identity()

    def autocast(self):
        return contextlib.nullcontext()


def _evaluate_on_rank(rank: int, world: int, init_file: str, out_dir: str, rows: int) -> None:
    from conf.schema import Precision
    from trainers.loop import WorkerContext, evaluate

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ctx = WorkerContext(rank=rank, world_size=world, device=torch.device("cpu"), precision=Precision.fp32,
                        accum_steps=1, rows_per_rank=MICRO)
    metrics = evaluate(_Strategy(), _Family(), _Shard(rows), ctx, micro=MICRO, max_batches=0)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(metrics, handle)
    dist.destroy_process_group()


@pytest.mark.parametrize("rows", [1, 3, 5])  # one row (rank 1 holds only padding), under a batch, a batch and one
def test_a_validation_split_smaller_than_an_eval_batch_is_evaluated_row_for_row(tmp_path, rows):
    mp.spawn(_evaluate_on_rank, args=(WORLD, str(tmp_path / "init"), str(tmp_path), rows), nprocs=WORLD, join=True)
    for rank in range(WORLD):  # every rank ends with the same metrics over exactly the split's rows
        metrics = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert metrics == {"rows": rows, "total": rows * (rows + 1) / 2}


def _ranker_dcn():
    return config_from_dict(plain_config(compose_config(["+exp=ranker_dcn", *RANKER_OVERRIDES[1:]])))


def test_a_validation_split_smaller_than_an_eval_batch_passes_the_data_check():
    cfg = _ranker_dcn()  # micro batches of 128 on 2 workers: an eval batch is 256 rows
    _check_data_fits(cfg, train_rows=20_000, val_rows=100)
    _check_data_fits(cfg, train_rows=20_000, val_rows=1)


def test_an_empty_validation_split_is_refused_naming_the_key_that_fills_it():
    with pytest.raises(ValueError, match="validation split is empty .*data.val_fraction"):
        _check_data_fits(_ranker_dcn(), train_rows=20_000, val_rows=0)


def test_a_real_run_evaluates_a_two_row_validation_split(ray_session, data_cache, tmp_path):
    """The whole path: 2 validation rows against an eval batch of 4 (2 workers x micro batches of 2), which the
    data check used to refuse. One of the stdlib's documents is held out: 34 tokens, 2 rows of 16 + 1."""
    from tests.helpers import read_metrics, run_training

    run_dir = run_training(tmp_path, data_cache, ["data.max_chars=100000", "data.seq_len=16",
                                                  "data.val_fraction=0.004", "trainer.max_steps=3",
                                                  "trainer.eval_every_n_steps=3", "checkpoint.every_n_steps=3"])
    evaluations = [row for row in read_metrics(run_dir) if "val_loss" in row]
    assert [row["step"] for row in evaluations] == [3] and evaluations[0]["val_loss"] > 0
    assert json.loads((run_dir / "manifest.json").read_text())["world_size"] == WORLD
