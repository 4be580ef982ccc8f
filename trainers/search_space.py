"""Sweep search spaces: read `sweep.space` and `sweep.family_space`, check every dimension against the
config before Ray starts, and turn them into Ray Tune's distributions.

A dimension is a config key and a list with its kind first, as written in conf/sweep/*.yaml:

    trainer.lr: [loguniform, 3.0e-4, 1.0e-2]
    model.n_layers: [choice, 1, 2, 3]

Lists (not one-key mappings) because a Hydra override replaces a list but merges a mapping: with lists,
`sweep.space.trainer.lr=[uniform,1e-3,1e-2]` swaps the kind of an existing dimension.
"""

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# kind -> how many numbers follow it (None: one or more values)
KINDS = {"loguniform": 2, "uniform": 2, "quniform": 3, "randint": 2, "choice": None, "grid": None}
# Where a trial runs and what it is called is the sweep's business, not a trial's; the family and the kind of
# data pick the config schema itself.
UNSWEEPABLE = ("cluster", "paths", "logger", "sweep", "model.family", "data.kind")


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key, e.g. trainer.lr
    kind: str  # one of KINDS
    args: tuple  # the numbers or values after the kind
    source: str  # where it was written, e.g. sweep.family_space.llm.trainer.lr (for error messages)
    integer: bool = False  # the config key holds an int: numeric draws are rounded to ints

    def candidates(self) -> list:
        """Values that stand for the whole dimension when checking it: the ends of a range, every choice."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args[0], self.args[1]
        if self.kind == "randint":
            return [low, high - 1]
        return [int(low), int(high)] if self.integer else [low, high]

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "randint":
            return tune.randint(int(self.args[0]), int(self.args[1]))
        if self.kind == "quniform" and self.integer:  # whole numbers for an int key (high included)
            return tune.qrandint(*(int(arg) for arg in self.args))
        draw = {"quniform": tune.quniform, "loguniform": tune.loguniform, "uniform": tune.uniform}[self.kind]
        return draw(*self.args)


def parse_space(sweep, *, family: str, config: dict, typed=None) -> list[Dimension]:
    """The sweep's dimensions for this model family: `family_space[family]`, then `space` on top. Every key
    must exist in `config` (the resolved config as a plain dict) and hold a value, not a section. `typed`, the
    frozen config, tells the type of a key left null to be derived (trainer.warmup_steps holds an int)."""
    from trainers.families import all_families

    unknown = set(sweep.family_space) - set(all_families())
    if unknown:
        raise ValueError(f"sweep.family_space.{sorted(unknown)[0]}: not a model family; use "
                         f"{' or '.join(sorted(all_families()))}")
    entries = _flatten(sweep.family_space.get(family) or {}, prefix=f"sweep.family_space.{family}")
    entries.update(_flatten(sweep.space or {}, prefix="sweep.space"))
    dimensions = [_parse_dimension(key, source, spec, config=config, typed=typed)
                  for key, (source, spec) in entries.items()]
    if not dimensions:
        raise ValueError(
            f"sweep={sweep.name} has nothing to search for model.family={family}: add dimensions under "
            f"sweep.space or sweep.family_space.{family} (e.g. +sweep.space.trainer.lr=[loguniform,1e-4,1e-2])"
        )
    return dimensions


def _flatten(node: dict, *, prefix: str, path: str = "") -> dict[str, tuple[str, Any]]:
    """{dotted config key: (where it was written, its list)} from nested and dotted keys alike."""
    flat: dict[str, tuple[str, Any]] = {}
    for name, value in node.items():
        key = f"{path}.{name}" if path else str(name)
        if isinstance(value, dict):
            nested = _flatten(value, prefix=prefix, path=key)
        else:
            nested = {key: (f"{prefix}.{key}", value)}
        for inner, entry in nested.items():
            if inner in flat:
                raise ValueError(f"{entry[0]}: {inner} is given twice in {prefix} (nested and dotted)")
            flat[inner] = entry
    return flat


def _parse_dimension(key: str, source: str, spec: Any, *, config: dict, typed=None) -> Dimension:
    if any(key == prefix or key.startswith(prefix + ".") for prefix in UNSWEEPABLE):
        raise ValueError(f"{source}: {key} cannot be swept (sweeps leave {', '.join(UNSWEEPABLE)} alone)")
    current = _lookup(config, key, source=source)
    if current is None and typed is not None:  # null in the plain config: derived when the config is frozen
        current = _typed_value(typed, key)
    kinds = ", ".join(KINDS)
    if not isinstance(spec, (list, tuple)) or not spec or spec[0] not in KINDS:
        raise ValueError(f"{source}: expected a list with its kind first ({kinds}), e.g. [loguniform, 1e-4, 1e-2]; "
                         f"got {spec!r}")
    kind, args = spec[0], tuple(spec[1:])
    integer = isinstance(current, int) and not isinstance(current, bool)
    _check_args(kind, args, source=source, integer=integer)
    return Dimension(key=key, kind=kind, args=args, source=source, integer=integer)


def _lookup(config: dict, key: str, *, source: str) -> Any:
    node: Any = config
    walked = []
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            options = list(node) if isinstance(node, dict) else []
            close = difflib.get_close_matches(part, options, n=1)
            hint = f"; did you mean {'.'.join([*walked, close[0]])}?" if close else ""
            where = ".".join(walked) or "the config"
            raise ValueError(f"{source}: {key} is not a config key ({where} has no {part!r}){hint}")
        node = node[part]
        walked.append(part)
    if isinstance(node, dict):
        raise ValueError(f"{source}: {key} is a config section; sweep one of its keys ({', '.join(node)})")
    return node


def _typed_value(typed, key: str) -> Any:
    node = typed
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def _check_args(kind: str, args: tuple, *, source: str, integer: bool) -> None:
    wanted = KINDS[kind]
    if wanted is None:
        if not args:
            raise ValueError(f"{source}: [{kind}, ...] needs at least one value")
        return
    if len(args) != wanted or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        shape = {"quniform": "[quniform, low, high, q]"}.get(kind, f"[{kind}, low, high]")
        raise ValueError(f"{source}: expected {shape} with numbers, got {[kind, *args]}")
    low, high = args[0], args[1]
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{source}: [{kind}, low, high] needs low < high, got low={low}, high={high}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{source}: loguniform needs low > 0, got {low}")
    if kind == "quniform" and args[2] <= 0:
        raise ValueError(f"{source}: quniform needs q > 0, got {args[2]}")
    if integer and kind in ("uniform", "loguniform"):
        raise ValueError(f"{source}: the key holds an integer; use [randint, low, high], [quniform, low, high, q] "
                         f"or [choice, ...] instead of {kind}")
    if kind == "randint" and not all(float(a).is_integer() for a in args):
        raise ValueError(f"{source}: randint needs integer bounds, got {list(args)}")


def with_values(config: dict, values: dict[str, Any]) -> dict:
    """A copy of `config` (plain nested dicts) with the dotted keys of `values` set."""
    import copy

    updated = copy.deepcopy(config)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = updated
        for part in parents:
            node = node[part]
        node[leaf] = value
    return updated


def check_candidates(dimensions: list[Dimension], config: dict, *, check: Callable[[dict], None]) -> None:
    """Run `check` on the config with each dimension set to each of its candidate values in turn, so that a
    value no trial could train with (a wrong type, a batch size that does not divide) fails now, naming it."""
    for dimension in dimensions:
        for value in dimension.candidates():
            try:
                check(with_values(config, {dimension.key: value}))
            except ValueError as err:
                raise ValueError(f"{dimension.source}: with {dimension.key}={value!r}: {err}") from err
