"""Registries filled by their packages' modules: a new strategy or model family is a new module, not an edit to
a list somewhere else."""

import importlib
import pkgutil
from functools import cached_property


class Registry:
    """The records (each with a `.name`) that the modules of `package` declare in their SPECS tuples. Modules
    are imported on the first lookup, not when the package is; modules without SPECS (shared helpers) add
    nothing. `key` is the config key that names a record, for errors."""

    def __init__(self, package: str, *, key: str):
        self.package, self.key = package, key

    @cached_property
    def records(self) -> dict[str, object]:
        found: dict[str, object] = {}
        for module_info in pkgutil.iter_modules(importlib.import_module(self.package).__path__):
            module = importlib.import_module(f"{self.package}.{module_info.name}")
            for record in getattr(module, "SPECS", ()):
                if record.name in found:
                    raise RuntimeError(f"{self.package}: {record.name} is declared twice")
                found[record.name] = record
        return found

    def get(self, name: str):
        if name not in self.records:
            raise ValueError(f"{self.key}={name!r} is not one of {', '.join(sorted(self.records))}")
        return self.records[name]
