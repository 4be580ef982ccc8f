"""Int8 quantization: linear layers (dynamic or weight-only) and rankers' embedding tables.

Each quantized module keeps its weights as plain tensors (int8 values and their scales), so a child's export is
an ordinary safetensors file that loads with no code of its own (nothing pickled), and the module's kernels are
chosen when it is built, not when it is saved.

Which kernels, measured on this project's 2-core CPU (AVX-512 with VNNI, torch 2.13) by the kernel table of
scripts/bench_optimize.py (torchao's columns appear when torchao is importable):
- int8_dynamic runs on torch's own quantized engine (fbgemm / x86: `torch.ao.nn.quantized.dynamic.Linear`): the
  activations are quantized per call, the product is an int8 GEMM. Against fp32 it ran 3.7x faster on a 2048x768
  layer at batch 1 and 2.2x on a 429x429 layer at batch 512, where torchao 0.18's eager CPU paths ran at 0.47x and
  1.0x (dynamic) or 0.37x and 0.8x (weight-only): torchao's int8 kernels are written for GPUs and torch.compile.
  Small layers lose (0.3x at 128x128, batch 1): quantizing the activations costs more than the GEMM saves.
  torch marks the eager quantization API as deprecated in favour of torchao, so the engine is checked for when a
  child loads, and a torch without it gets an error that says so rather than a silent fp32 model.
- int8_weight_only stores int8 weights and multiplies in the activations' dtype after widening them. On a CPU that
  saves memory (4x smaller linear weights) but not time (the widening costs more than the smaller read saves at
  these sizes); its speed-up needs a fused GPU kernel, which this project has not run.
- int8_tables stores each embedding row as uint8 with its own fp16 scale and offset (FBGEMM's row-wise
  layout, with fp16 rather than fp32 scales: for 16-wide rows fp32 pairs would leave tables only 2.7x smaller).
"""

import torch
import torch.nn.functional as F
from torch import nn

from trainers.families import PLAIN_LAYOUT, Family
from trainers.optimizations import Method

INT8_MAX = 127


def per_row_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output row: (values, scales), weight ~= values * scales[:, None]."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    values = torch.round(weight / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values, scales.float()


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with one fp32 scale per output row. `dynamic` quantizes activations
    per call and multiplies in int8 (fbgemm, CPU only); otherwise the weight is widened to the activations'
    dtype at each call (weight-only)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dynamic: bool):
        super().__init__()
        self.in_features, self.out_features, self.dynamic = in_features, out_features, dynamic
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None  # the engine's packed weights, built from the buffers at the first call

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, dynamic: bool) -> "Int8Linear":
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dynamic=dynamic)
        values, scales = per_row_int8(linear.weight.detach().float())
        module.weight_int8.copy_(values)
        module.weight_scale.copy_(scales)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module.to(linear.weight.device)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new weights: pack again
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic:
            out = F.linear(x, self.weight_int8.to(x.dtype)) * self.weight_scale.to(x.dtype)
            return out + self.bias.to(x.dtype) if self.bias is not None else out
        if self._packed is None:
            self._packed = _dynamic_engine_linear(self)
        return self._packed(x.float()).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "weight-only"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {kind}"


def _dynamic_engine_linear(module: Int8Linear) -> nn.Module:
    """torch's fbgemm dynamic linear over the module's int8 weights (per-channel scales, zero points 0)."""
    dynamic = getattr(getattr(torch.ao.nn, "quantized", None), "dynamic", None)
    if dynamic is None or not hasattr(dynamic, "Linear"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.ao.nn.quantized.dynamic.Linear, which "
                           "int8_dynamic children run on; serve them with a torch that has it, or derive an "
                           "int8_weight_only child instead")
    zero_points = torch.zeros(module.out_features, dtype=torch.long)
    weight = torch._make_per_channel_quantized_tensor(module.weight_int8.cpu(), module.weight_scale.double().cpu(),
                                                      zero_points, 0)
    linear = dynamic.Linear(module.in_features, module.out_features, bias_=module.bias is not None,
                            dtype=torch.qint8)
    linear.set_weight_bias(weight, None if module.bias is None else module.bias.float().cpu())
    return linear


class Int8EmbeddingBag(nn.Module):
    """nn.EmbeddingBag(mode="sum") over rows stored as uint8 with a per-row fp16 scale and offset:
    row ~= values * scale + offset. Takes (batch, bag) ids, as the rankers' lookup passes them."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("rows_uint8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.uint8))
        self.register_buffer("row_scale", torch.ones(num_embeddings, dtype=torch.float16))
        self.register_buffer("row_offset", torch.zeros(num_embeddings, dtype=torch.float16))

    @classmethod
    def from_embedding_bag(cls, table: nn.EmbeddingBag) -> "Int8EmbeddingBag":
        if table.mode != "sum":
            raise ValueError(f"int8_tables quantizes sum-pooled tables; this one pools by {table.mode!r}")
        module = cls(table.num_embeddings, table.embedding_dim)
        weight = table.weight.detach().float()
        low, high = weight.amin(dim=1), weight.amax(dim=1)
        # The fp16 scale and offset are what dequantizing uses, so the values are rounded against them.
        scale = ((high - low) / 255).clamp(min=1e-8).half()
        offset = low.half()
        values = torch.round((weight - offset.float()[:, None]) / scale.float()[:, None]).clamp(0, 255)
        module.rows_uint8.copy_(values.to(torch.uint8))
        module.row_scale.copy_(scale)
        module.row_offset.copy_(offset)
        return module.to(table.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows_uint8[ids].float()  # (batch, bag, dim)
        rows = rows * self.row_scale[ids].float().unsqueeze(-1) + self.row_offset[ids].float().unsqueeze(-1)
        return rows.sum(dim=1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, uint8 rows with fp16 scale and offset"


# ----------------------------------------------------------------------------------------- swapping modules

def _replace(model: nn.Module, kind: type, build) -> nn.Module:
    """Every submodule of type `kind` replaced by build(submodule), in place; a Linear whose weight another module
    shares (an output projection tied to the embedding) is left as it is, since quantizing it would untie it."""
    shared = _shared_weights(model)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is kind and not (kind is nn.Linear and id(module.weight) in shared)]
    if not targets:
        raise ValueError(f"the model has no {kind.__name__} layers to quantize (is it quantized already?)")
    for name, module in targets:
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, build(module))
    return model


def _shared_weights(model: nn.Module) -> set[int]:
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {key for key, count in owners.items() if count > 1}


def _linear_shell(dynamic: bool):
    def build(linear: nn.Linear) -> Int8Linear:
        return Int8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          dynamic=dynamic).to(linear.weight.device)
    return build


def _quantize_linears(dynamic: bool):
    def derive(model: nn.Module, *, family: Family, settings: dict, calibration=None) -> nn.Module:
        return _replace(model, nn.Linear, lambda linear: Int8Linear.from_linear(linear, dynamic=dynamic))

    def prepare(model: nn.Module, *, family: Family, settings: dict) -> nn.Module:
        return _replace(model, nn.Linear, _linear_shell(dynamic))
    return derive, prepare


def _derive_tables(model: nn.Module, *, family: Family, settings: dict, calibration=None) -> nn.Module:
    return _replace(model, nn.EmbeddingBag, Int8EmbeddingBag.from_embedding_bag)


def _prepare_tables(model: nn.Module, *, family: Family, settings: dict) -> nn.Module:
    return _replace(model, nn.EmbeddingBag, lambda table: Int8EmbeddingBag(table.num_embeddings, table.embedding_dim))


_dynamic_derive, _dynamic_prepare = _quantize_linears(dynamic=True)
_weight_only_derive, _weight_only_prepare = _quantize_linears(dynamic=False)

# Quantized children keep their int8 tensors in one model.safetensors under the module's own names (the plain
# layout writes integer tensors as they are): no Hugging Face layout describes these modules, so an LLM's int8
# child is served by Slipway (and stage=export copies it) but is not a transformers directory.
SPECS = (
    Method(name="int8_dynamic", summary="int8 linear weights, activations quantized per call (fbgemm)",
           families=("llm", "ranker"), derive=_dynamic_derive, prepare=_dynamic_prepare,
           settings={"weights": "int8 per output row, symmetric", "activations": "int8 per call"},
           layout=PLAIN_LAYOUT, cpu_only=True),
    Method(name="int8_weight_only", summary="int8 linear weights widened at each call",
           families=("llm", "ranker"), derive=_weight_only_derive, prepare=_weight_only_prepare,
           settings={"weights": "int8 per output row, symmetric"}, layout=PLAIN_LAYOUT),
    Method(name="int8_tables", summary="embedding rows in uint8 with a per-row fp16 scale and offset",
           families=("ranker",), derive=_derive_tables, prepare=_prepare_tables,
           settings={"rows": "uint8, asymmetric, fp16 scale and offset per row"}, layout=PLAIN_LAYOUT),
)
