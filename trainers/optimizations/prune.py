"""Pruning an LLM's linear layers: Wanda (Sun et al. 2023, arXiv:2306.11695) and magnitude, unstructured at 50%
or in the 2:4 pattern (two of every four consecutive input weights kept, the pattern sparse tensor cores run).

Wanda scores weight W_ij by |W_ij| * ||X_j||_2, the size of the weight times the norm of the input channel it
multiplies over calibration tokens, and removes the lowest scores within each output row. As in the paper, the
blocks are pruned in order, each one's input norms taken with the blocks before it already pruned. Magnitude
ranks |W_ij| within the same groups (each output row, or each group of four), so the two differ only in the
activation term, which is the paper's comparison.

The pruned weights stay dense (zeros), in the family's own layout: a pruned LLM child is still a Hugging Face
directory. Zeros in a dense matrix save no time on dense CPU kernels; 2:4 pays off only where a kernel skips them
(sparse tensor cores on Ampere and later GPUs), which this project has not run.
"""

import torch
from torch import nn

from trainers.families import Family
from trainers.optimizations import CalibrationBatches, Method


def _linears(block: nn.Module) -> list[nn.Linear]:
    return [module for module in block.modules() if isinstance(module, nn.Linear)]


def prune_mask(scores: torch.Tensor, *, sparsity: float, pattern: str) -> torch.Tensor:
    """True where a weight is kept: within each output row the lowest `sparsity` share of scores go
    ("unstructured"), or in each group of four consecutive inputs the two lowest go ("2:4")."""
    rows, columns = scores.shape
    if pattern == "2:4":
        if columns % 4:
            raise ValueError(f"2:4 pruning needs input widths divisible by 4, got a layer of width {columns}")
        groups = scores.reshape(rows, columns // 4, 4)
        dropped = groups.topk(2, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, dropped, False)
        return keep.reshape(rows, columns)
    count = int(columns * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count:
        keep.scatter_(1, scores.topk(count, dim=1, largest=False).indices, False)
    return keep


@torch.no_grad()
def _input_norms(model: nn.Module, linears: list[nn.Linear], *, family: Family,
                 calibration: list[dict]) -> dict[nn.Linear, torch.Tensor]:
    """||X_j||_2 over every calibration token, per input channel of each linear layer."""
    squares = {linear: torch.zeros(linear.in_features, dtype=torch.float64) for linear in linears}

    def hook(module, inputs, _output):
        x = inputs[0].detach().reshape(-1, module.in_features).double()
        squares[module] += (x * x).sum(dim=0).cpu()

    handles = [linear.register_forward_hook(hook) for linear in linears]
    try:
        for batch in calibration:
            family.loss(model, batch)  # one forward pass; the loss itself is not used
    finally:
        for handle in handles:
            handle.remove()
    return {linear: total.sqrt().float() for linear, total in squares.items()}


def _prune(scoring: str, pattern: str, sparsity: float):
    @torch.no_grad()
    def derive(model: nn.Module, *, family: Family, settings: dict, calibration: CalibrationBatches | None = None):
        batches = list(calibration or [])
        if scoring == "wanda" and not batches:
            raise ValueError("Wanda pruning needs calibration batches from the run's training split")
        if not any(_linears(block) for block in family.blocks(model)):
            raise ValueError("the model has no float linear layers to prune (is it quantized?): prune first, "
                             "then quantize the pruned version")
        for block in family.blocks(model):
            linears = _linears(block)
            norms = _input_norms(model, linears, family=family, calibration=batches) if scoring == "wanda" else {}
            for linear in linears:
                scores = linear.weight.abs().float()
                if scoring == "wanda":
                    scores = scores * norms[linear].to(scores.device)[None, :]
                mask = prune_mask(scores, sparsity=sparsity, pattern=pattern)
                linear.weight.mul_(mask.to(linear.weight.dtype))
        return model
    return derive


def _spec(name: str, scoring: str, pattern: str, summary: str) -> Method:
    sparsity = 0.5
    return Method(name=name, summary=summary, families=("llm",), derive=_prune(scoring, pattern, sparsity),
                  settings={"scoring": scoring, "pattern": pattern, "sparsity": sparsity, "layers": "blocks' linears"},
                  needs_calibration=scoring == "wanda")


SPECS = (
    _spec("prune_wanda_50", "wanda", "unstructured", "Wanda: 50% of each row's weights by |W| x input norm"),
    _spec("prune_2of4", "wanda", "2:4", "Wanda scores in the 2:4 pattern (2 of each 4 inputs kept)"),
    _spec("prune_magnitude_50", "magnitude", "unstructured", "magnitude: 50% of each row's weights by |W|"),
    _spec("prune_magnitude_2of4", "magnitude", "2:4", "magnitude in the 2:4 pattern"),
)
