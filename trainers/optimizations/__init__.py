"""Optimization methods: how a registered version becomes a cheaper child version (quantized, pruned, compiled).

Each method is one record (Method) declared in SPECS by a module of this package, looked up by the name
`serve.optimize` lists; nothing else switches on a method's name. A child is an export like any other: the
method's name and settings go into its model_config.json under "derived", and the one loader
(trainers/exported.py) builds the plain model, lets the method reshape it (`prepare`: swap linear layers for
int8 ones, ...), loads the child's weights strictly and lets the method finish it (`finish`: compile). So every
replica, the gate and the harness serve a child through the code that serves its parent.

Deriving (serve/optimize.py) is `derive`: the parent's loaded model, and for methods that need activations a
few calibration batches of the parent run's training split, in; the child's model out, whose state dict is
what the export stores.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from trainers.discovery import Registry
from trainers.families import ExportLayout


def _unchanged(model: nn.Module, **_) -> nn.Module:
    return model


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line, for `stage=optimize` and errors
    families: tuple[str, ...]  # the model families it applies to
    # (model, *, family, settings, calibration: Iterable[batch] | None) -> the child model (may be `model` changed)
    derive: Callable[..., nn.Module]
    # (plain model, *, family, settings) -> the model in the child's shape, ready for the child's state dict
    prepare: Callable[..., nn.Module] = _unchanged
    # (loaded child, *, family, settings) -> the model replicas run (e.g. compiled)
    finish: Callable[..., nn.Module] = _unchanged
    settings: dict = field(default_factory=dict)  # the method's settings, recorded in the child's lineage
    layout: ExportLayout | None = None  # where the child's weights lie; None: the family's own layout
    needs_calibration: bool = False
    cpu_only: bool = False  # its kernels run on CPUs only (fbgemm)

    def check_family(self, family: str) -> None:
        if family not in self.families:
            raise ValueError(f"serve.optimize={self.name} applies to {' and '.join(self.families)} models, not "
                             f"{family} ones ({self.summary})")

    def check_device(self, device: torch.device) -> None:
        if self.cpu_only and device.type != "cpu":
            raise ValueError(f"{self.name} children run on CPU replicas only ({self.summary}); this replica is on "
                             f"{device}")


_REGISTRY = Registry(__name__, key="serve.optimize")


def all_methods() -> dict[str, Method]:
    return dict(_REGISTRY.records)


def get_method(name: str) -> Method:
    return _REGISTRY.get(name)


def derived_steps(model_config: dict, *, source) -> list[tuple[Method, dict]]:
    """The methods (with their settings) a child's model_config.json records under "derived", oldest first: a
    child of a child (int8 of a pruned version, compile of an int8 one) carries its parent's steps before its
    own. Empty for a trained version."""
    steps = model_config.get("derived", [])
    if not isinstance(steps, list) or not all(isinstance(step, dict) and isinstance(step.get("settings"), dict)
                                              for step in steps):
        raise ValueError(f"{source}: 'derived' must be a list of steps, each with 'method' and 'settings'")
    methods = []
    for step in steps:
        try:
            methods.append((get_method(step.get("method")), step["settings"]))
        except ValueError as err:
            raise ValueError(f"{source}: derived.method: {err}") from err
    return methods


def child_layout(steps: list[tuple[Method, dict]]) -> ExportLayout | None:
    """Where a child's weights lie: the layout of its last step that has one (compile after int8 keeps int8's),
    or None for the family's own."""
    layouts = [method.layout for method, _ in steps if method.layout is not None]
    return layouts[-1] if layouts else None


CalibrationBatches = Iterable[dict[str, torch.Tensor]]
