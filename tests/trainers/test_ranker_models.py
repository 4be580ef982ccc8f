import pytest
import torch

from conf.schema import RankerConfig
from trainers.ranker import DLRM, build_ranker, count_parameters

TABLES = [7, 3, 11, 5]


def inputs(rows: int = 6):
    torch.manual_seed(0)
    return torch.randn(rows, 13), torch.stack([torch.randint(0, size, (rows,)) for size in TABLES], dim=1)


def test_dlrm_interaction_is_every_pairwise_dot_product():
    model = build_ranker(RankerConfig(arch="dlrm", embedding_dim=4, bottom_mlp=[8, 4], top_mlp=[5]),
                         num_dense=13, table_sizes=TABLES)
    dense, sparse = inputs()
    captured = {}
    model.top.register_forward_hook(lambda module, args, out: captured.setdefault("top_input", args[0]))
    model(dense, sparse)
    bottom = model.bottom(dense)
    vectors = [bottom] + [model.tables[t].weight[sparse[:, t]] for t in range(len(TABLES))]
    expected = [(vectors[i] * vectors[j]).sum(dim=1) for i in range(len(vectors)) for j in range(i)]
    top_input = captured["top_input"]
    assert top_input.shape == (6, 4 + 5 * 4 // 2)
    torch.testing.assert_close(top_input[:, :4], bottom)
    torch.testing.assert_close(top_input[:, 4:], torch.stack(expected, dim=1))


def test_dcn_cross_layer_formula_and_low_rank():
    full = build_ranker(RankerConfig(arch="dcn", embedding_dim=2, cross_layers=1, deep_mlp=[3]),
                        num_dense=13, table_sizes=TABLES)
    x0 = torch.randn(4, 13 + 2 * len(TABLES))
    layer = full.cross[0]
    torch.testing.assert_close(layer(x0, x0), x0 * (x0 @ layer.project.weight.T + layer.project.bias) + x0)
    low_rank = RankerConfig(arch="dcn", embedding_dim=2, cross_layers=2, cross_rank=3, deep_mlp=[3])
    full_rank = RankerConfig(arch="dcn", embedding_dim=2, cross_layers=2, cross_rank=0, deep_mlp=[3])
    width = 13 + 2 * len(TABLES)
    saved = count_parameters(full_rank, num_dense=13, table_sizes=TABLES)["total"] - \
        count_parameters(low_rank, num_dense=13, table_sizes=TABLES)["total"]
    assert saved == 2 * (width * width - 2 * width * 3)


@pytest.mark.parametrize("arch", ["dlrm", "dcn"])
def test_every_table_gets_gradients_and_counts_match(arch):
    cfg = RankerConfig(arch=arch)
    model = build_ranker(cfg, num_dense=13, table_sizes=TABLES)
    dense, sparse = inputs()
    logits = model(dense, sparse.int())  # the prepared shards hold int32 buckets
    assert logits.shape == (6,)
    logits.sum().backward()
    assert all(table.weight.grad.abs().sum() > 0 for table in model.tables)
    assert count_parameters(cfg, num_dense=13, table_sizes=TABLES)["total"] == \
        sum(param.numel() for param in model.parameters())


def test_meta_build_allocates_nothing_until_initialized():
    model = build_ranker(RankerConfig(), num_dense=13, table_sizes=[10**9, 5], device="meta")  # 16G params
    assert all(param.is_meta for param in model.parameters())
    small = build_ranker(RankerConfig(), num_dense=13, table_sizes=TABLES, device="meta")
    small.to_empty(device="cpu")
    small.init_weights()
    bound = 1 / TABLES[0] ** 0.5
    assert small.tables[0].weight.abs().max() <= bound and small.tables[0].weight.std() > bound / 4
    assert isinstance(small, DLRM) and torch.isfinite(small(*inputs())).all()


def test_bottom_mlp_must_end_at_the_embedding_width():
    with pytest.raises(ValueError, match=r"model.bottom_mlp=\[64, 32\] must end with model.embedding_dim=16"):
        build_ranker(RankerConfig(bottom_mlp=[64, 32]), num_dense=13, table_sizes=TABLES)
