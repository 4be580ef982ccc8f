"""`compile`: the same weights, with the serving forward compiled by torch.compile (TorchInductor) when a replica
loads the child: each of the family's compile units (Family.compile_units), compiled in place. For a ranker
that is the whole forward; for an LLM, each block's norms and feed-forward and the output head, which run in
both the prefill and the engine's decode step (trainers/llm.py: forward_slots). An LLM's attention stays eager:
it reads the engine's slot layout (which sequence sits where, Python data), and a graph holding it was
recompiled at almost every engine step when tried.

Shapes change with every batch, so the units are compiled with dynamic shapes: one graph serves every batch
size. Compiling happens at the first calls (seconds to tens of seconds on a small CPU; a replica's health check
waits for it) and needs a C++ compiler on the replica's machine.
"""

from torch import nn

from trainers.families import Family
from trainers.optimizations import Method


def _derive(model: nn.Module, **_) -> nn.Module:
    return model  # nothing changes in the weights: the child differs in how it runs


def _finish(model: nn.Module, *, family: Family, settings: dict) -> nn.Module:
    for unit in family.compile_units(model):
        unit.compile(dynamic=True, mode=settings.get("mode"))
    return model


SPECS = (
    Method(name="compile", summary="torch.compile (Inductor) of the serving forward, dynamic shapes",
           families=("llm", "ranker"), derive=_derive, finish=_finish,
           settings={"mode": None, "dynamic": True, "units": "the family's compile units"}),
)
