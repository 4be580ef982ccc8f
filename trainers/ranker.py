"""Click-through models over 13 dense and 26 categorical features: DLRM and DCN-v2.

Both take `dense` (batch, num_dense) floats and `sparse` (batch, num_tables) bucket ids and return one logit per
row. The embedding tables are plain `nn.EmbeddingBag` modules in `model.tables`, so every strategy applies
as it does to any module: DDP replicates them, FSDP2 shards each table as its own unit and ZeRO partitions
them with the rest. Like the LLM, the models know nothing about parallelism, and `init_weights` lets a model
built on the meta device be initialized after sharding.

DLRM (Naumov et al. 2019, arXiv:1906.00091): a bottom MLP maps the dense features to one embedding-sized
vector; the dot products of every pair among it and the 26 embeddings, with the bottom output itself, feed
a top MLP. DCN-v2 (Wang et al. 2021, arXiv:2008.13535): the dense features and all embeddings are
concatenated into x0, and each cross layer computes x0 * (W x + b) + x, so layer l holds feature
interactions of degree l + 1; a deep MLP follows (the paper's "stacked" form).
"""

import math

import torch
from torch import nn

from conf.schema import RankerConfig


def mlp(sizes: list[int], *, last_activation: bool) -> nn.Sequential:
    """Linear layers between consecutive sizes, ReLU after each except (optionally) the last."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if last_activation or index < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def embedding_tables(table_sizes: list[int], dim: int) -> nn.ModuleList:
    # mode="sum" over bags of one id is a lookup; bags leave room for multi-hot features.
    return nn.ModuleList(nn.EmbeddingBag(size, dim, mode="sum") for size in table_sizes)


def lookup(tables: nn.ModuleList, sparse: torch.Tensor) -> list[torch.Tensor]:
    """One (batch, dim) embedding per table; `sparse` holds one bucket id per row and table."""
    return [table(sparse[:, index:index + 1]) for index, table in enumerate(tables)]


def _logits(column: torch.Tensor) -> torch.Tensor:
    # (batch, 1) -> (batch,) as a new tensor: FSDP2 warns about (and hooks badly into) a root output that is a view.
    return column.squeeze(-1).clone()


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Embeddings uniform in +-1/sqrt(rows) as in the DLRM reference code; linear layers as torch does.

    Runs in place on whatever each parameter holds: the full tensor, or after FSDP2 materialized a model built
    on the meta device, only this rank's shard.
    """
    for module in model.modules():
        if isinstance(module, nn.EmbeddingBag):
            bound = 1.0 / math.sqrt(module.num_embeddings)
            nn.init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()


class CrossLayer(nn.Module):
    """x0 * (W x + b) + x, with W full-rank or factored as U V^T (rank > 0) to save parameters."""

    def __init__(self, width: int, *, rank: int):
        super().__init__()
        if rank > 0:
            self.project = nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width))
        else:
            self.project = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.project(x) + x


class DLRM(nn.Module):
    init_weights = init_weights  # the hook FSDPStrategy calls after materializing a meta-device model

    def __init__(self, cfg: RankerConfig, *, num_dense: int, table_sizes: list[int]):
        super().__init__()
        dim = cfg.embedding_dim
        if not cfg.bottom_mlp or cfg.bottom_mlp[-1] != dim:
            raise ValueError(
                f"model.bottom_mlp={list(cfg.bottom_mlp)} must end with model.embedding_dim={dim}: its output "
                f"takes part in the dot products with the embeddings"
            )
        self.bottom = mlp([num_dense, *cfg.bottom_mlp], last_activation=True)
        self.tables = embedding_tables(table_sizes, dim)
        features = len(table_sizes) + 1
        self.top = mlp([dim + features * (features - 1) // 2, *cfg.top_mlp, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)
        stacked = torch.stack([bottom, *lookup(self.tables, sparse)], dim=1)  # (batch, features, dim)
        dots = torch.bmm(stacked, stacked.transpose(1, 2))  # (batch, features, features)
        # Each unordered pair once, no self-products. Built per call rather than kept as a buffer, which a model
        # built on the meta device would leave uninitialized.
        rows, cols = torch.tril_indices(dots.shape[1], dots.shape[1], offset=-1, device=dots.device)
        pairs = dots[:, rows, cols]
        return _logits(self.top(torch.cat([bottom, pairs], dim=1)))


class DCNv2(nn.Module):
    init_weights = init_weights

    def __init__(self, cfg: RankerConfig, *, num_dense: int, table_sizes: list[int]):
        super().__init__()
        if cfg.cross_layers < 1:
            raise ValueError(f"model.cross_layers must be at least 1, got {cfg.cross_layers}")
        self.tables = embedding_tables(table_sizes, cfg.embedding_dim)
        width = num_dense + len(table_sizes) * cfg.embedding_dim
        self.cross = nn.ModuleList(CrossLayer(width, rank=cfg.cross_rank) for _ in range(cfg.cross_layers))
        self.deep = mlp([width, *cfg.deep_mlp], last_activation=True)
        self.head = nn.Linear(cfg.deep_mlp[-1] if cfg.deep_mlp else width, 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([dense, *lookup(self.tables, sparse)], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return _logits(self.head(self.deep(x)))


def build_ranker(cfg: RankerConfig, *, num_dense: int, table_sizes: list[int],
                 device: str | torch.device = "cpu") -> nn.Module:
    """A new DLRM or DCN-v2 on `device`; on "meta" no memory is allocated and `init_weights` runs later."""
    if cfg.embedding_dim < 1:
        raise ValueError(f"model.embedding_dim must be at least 1, got {cfg.embedding_dim}")
    with torch.device(device):
        model = (DLRM if cfg.arch == "dlrm" else DCNv2)(cfg, num_dense=num_dense, table_sizes=table_sizes)
    if str(device) != "meta":
        model.init_weights()
    return model


def count_parameters(cfg: RankerConfig, *, num_dense: int, table_sizes: list[int]) -> dict[str, int]:
    """Parameter counts without building the model: total, and the dense (non-embedding) part."""
    with torch.device("meta"):
        model = (DLRM if cfg.arch == "dlrm" else DCNv2)(cfg, num_dense=num_dense, table_sizes=table_sizes)
    total = sum(param.numel() for param in model.parameters())
    embedding = sum(table.weight.numel() for table in model.tables)
    return {"total": total, "non_embedding": total - embedding}


def training_flops_per_sample(cfg: RankerConfig, *, num_dense: int, table_sizes: list[int]) -> float:
    """6 x the dense parameters (forward + backward of every matmul weight), plus DLRM's pairwise dot products.

    Embedding lookups are memory traffic, not FLOPs, and are left out, as the MFU convention does for LLMs.
    """
    dense_params = count_parameters(cfg, num_dense=num_dense, table_sizes=table_sizes)["non_embedding"]
    features = len(table_sizes) + 1
    interaction = 6.0 * features * features * cfg.embedding_dim if cfg.arch == "dlrm" else 0.0
    return 6.0 * dense_params + interaction
