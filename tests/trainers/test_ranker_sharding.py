"""Large tables: a ranker built on the meta device and sharded by FSDP2 holds only its rows of each table.

Two gloo processes (no Ray needed): each must end with half of every table's rows as its local shard, the
weights initialized, and a training step that changes them.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conf.schema import RankerConfig, TrainerConfig
from trainers import optim
from trainers.ranker import build_ranker
from trainers.strategies import build_strategy
from trainers.strategies.fsdp import FSDPConfig

TABLES = [1001, 7] + [5] * 24


def shard_on_meta(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_ranker(RankerConfig(), num_dense=13, table_sizes=TABLES, device="meta")
    strategy = build_strategy(FSDPConfig(), device=torch.device("cpu"), precision="fp32",
                              accum_steps=1, grad_clip=1.0, micro_batch_size=8)
    trainer = TrainerConfig(lr=0.01, warmup_steps=1)
    strategy.setup(model, blocks=model.tables, weight_decay=0.0,
                   build_optimizer=lambda groups: optim.build_optimizer(groups, trainer),
                   build_scheduler=lambda opt: optim.build_scheduler(opt, trainer))
    big = model.tables[0].weight
    before = big.to_local().clone()
    dense, sparse = torch.randn(8, 13), torch.randint(0, 5, (8, 26))
    sparse[:, 0] = torch.tensor([0, 100, 300, 500, 501, 700, 900, 1000])  # rows in both ranks' shards
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), torch.ones(8))
    strategy.backward(loss)
    strategy.step()
    report = {"local_rows": big.to_local().shape[0], "global_rows": big.shape[0],
              "on_meta": any(param.is_meta for param in model.parameters()),
              "init_std": float(before.std().detach()), "changed": bool((big.to_local() != before).any())}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)
    dist.destroy_process_group()


def test_meta_built_tables_are_materialized_only_as_local_shards(tmp_path):
    mp.spawn(shard_on_meta, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [report["local_rows"] for report in reports] == [501, 500]  # FSDP2 shards dim 0, the rows
    for report in reports:
        assert report["global_rows"] == 1001 and not report["on_meta"]
        assert report["init_std"] == pytest.approx((2 / 1001**0.5) / 12**0.5, rel=0.15)  # uniform +-1/sqrt(rows)
        assert report["changed"]
