"""Slipway's data package, which shares its import name with Hugging Face `datasets` without shadowing it.

The layout fixes this folder's name, and the repo root is first on sys.path wherever Slipway runs (launch.py,
pytest, Ray workers), so `import datasets` finds this folder first. When Hugging Face `datasets` is installed
too (lm-eval needs it), this module steps aside: it imports theirs under the name `datasets`, appends this
folder to that package's search path and leaves theirs in sys.modules. So `import datasets` is always
theirs when they are installed (`datasets.load_dataset` works next to Slipway), and `datasets.text`,
`datasets.chat` and the rest of our modules still resolve, from this folder. Without theirs, this folder is
the package and nothing changes.

Our module names must not be theirs (theirs would win); `_check_no_clash` turns a future clash into an error
that names the module instead of an import of the wrong file.
"""

import importlib.machinery
import importlib.util
import os
import sys
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))


def _huggingface_spec():
    """The spec of Hugging Face `datasets` on sys.path past our own folder's parent, or None."""
    parent = os.path.dirname(_HERE)
    others = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != parent]
    spec = importlib.machinery.PathFinder.find_spec(__name__, others)
    if spec is None or not spec.submodule_search_locations:
        return None
    if any(os.path.abspath(location) == _HERE for location in spec.submodule_search_locations):
        return None  # our own folder, reached through another spelling of the same path
    return spec


def _check_no_clash(theirs: list[str]) -> None:
    ours = {name.removesuffix(".py") for name in os.listdir(_HERE)
            if name.endswith(".py") and name != "__init__.py"}
    for location in theirs:
        clash = sorted(ours & {name.removesuffix(".py") for name in os.listdir(location)})
        if clash:
            raise ImportError(f"Slipway's datasets/{clash[0]}.py has the name of a module of Hugging Face datasets "
                              f"({location}), which would win; rename ours")


def _hand_over(spec) -> None:
    _check_no_clash(list(spec.submodule_search_locations))
    theirs = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = theirs  # the import system returns what sys.modules holds once this file has run
    try:
        spec.loader.exec_module(theirs)
    except Exception as err:  # a broken install of theirs must not stop Slipway: keep ours, say why
        sys.modules[__name__] = _ours
        warnings.warn(f"Hugging Face datasets at {spec.origin} failed to import ({err!r}); `import datasets` "
                      "gives Slipway's data package only", stacklevel=2)
        return
    theirs.__path__.append(_HERE)


_ours = sys.modules[__name__]
_spec = _huggingface_spec()
if _spec is not None:
    _hand_over(_spec)
