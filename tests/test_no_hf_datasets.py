"""Our `datasets/` package shadows HuggingFace `datasets` (DESIGN.md section 5); keep it that way."""

import importlib.metadata
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_import_datasets_is_our_package():
    import datasets

    assert Path(datasets.__file__).resolve() == REPO_ROOT / "datasets" / "__init__.py"


def test_huggingface_datasets_is_not_installed():
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("datasets")
