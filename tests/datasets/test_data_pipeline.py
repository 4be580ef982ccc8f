from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conf.schema import TextDataConfig
from datasets.pipeline import build_ray_datasets
from datasets.text import prepare_text

ray = pytest.importorskip("ray")

# About 6,000 train rows, so several train shards whose order must survive the read.
CFG = TextDataConfig(source="stdlib", max_chars=200_000, vocab_size=300, seq_len=32, rows_per_shard=1000)


def parquet_order(directory):
    tables = [pq.read_table(shard) for shard in sorted(Path(directory).glob("part-*.parquet"))]
    return np.concatenate([np.array(table["tokens"].to_pylist(), dtype=np.int32) for table in tables])


@pytest.mark.parametrize("in_memory_limit_mb", [512, 0], ids=["in_memory", "streamed"])
def test_ray_datasets_yield_rows_in_parquet_order(ray_session, tmp_path, in_memory_limit_mb):
    prepared = prepare_text(CFG, cache_root=tmp_path, max_seq_len=32)

    datasets = build_ray_datasets(prepared, in_memory_limit_mb=in_memory_limit_mb)

    assert ray.data.DataContext.get_current().execution_options.preserve_order
    assert set(datasets) == {"train", "val"}
    for name, directory in (("train", prepared.train_dir), ("val", prepared.val_dir)):
        batches = list(datasets[name].iter_torch_batches(batch_size=64))
        tokens = np.concatenate([batch["tokens"].numpy() for batch in batches])
        assert batches[0]["tokens"].dtype.is_floating_point is False
        assert str(batches[0]["tokens"].dtype) == "torch.int32"
        assert tokens.shape == (getattr(prepared, f"{name}_rows"), CFG.seq_len + 1)
        np.testing.assert_array_equal(tokens, parquet_order(directory))
