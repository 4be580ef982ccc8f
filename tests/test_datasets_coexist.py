"""Our `datasets/` package and Hugging Face `datasets` in one environment (datasets/__init__.py): with theirs
installed, `import datasets` is theirs and works, and our modules still import from our folder; without
theirs, ours is the package; a module name of ours that theirs also has is an error naming it."""

import importlib.metadata
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *, first: list[str], site_packages: bool = True) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with `first` ahead of everything on sys.path (the repo root comes first
    under launch.py, pytest and Ray workers alike), and without site-packages unless `site_packages`."""
    prelude = (f"import sys; sys.path[:] = {first!r} + [p for p in sys.path if {site_packages!r} or "
               "'-packages' not in p]\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT.parent)


def _stdout(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_huggingface_datasets_and_ours_work_in_one_process(tmp_path):
    importlib.metadata.distribution("datasets")  # a test dependency (lm-eval needs it): it must be installed
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"text": "world"}) + "\n")
    out = _stdout(_run(f"""
import datasets, datasets.text, datasets.chat_template
from datasets.tokenizer import EOS_TOKEN
print(datasets.__file__)
print(datasets.text.__file__)
loaded = datasets.load_dataset("json", data_files={str(rows)!r}, split="train")
print(list(loaded["text"]))
print(EOS_TOKEN)
""", first=[str(REPO_ROOT)]))
    theirs, ours, texts, eos = out.strip().splitlines()[-4:]
    assert Path(theirs).parent.parent == Path(sysconfig.get_paths()["purelib"])  # site-packages/datasets
    assert Path(ours) == REPO_ROOT / "datasets" / "text.py"
    assert texts == "['hello', 'world']"
    assert eos == "<|endoftext|>"


def test_without_huggingface_datasets_ours_is_the_package():
    out = _stdout(_run("import datasets, datasets.cache; print(datasets.__file__)", first=[str(REPO_ROOT)],
                       site_packages=False))
    assert Path(out.strip()) == REPO_ROOT / "datasets" / "__init__.py"


def test_a_module_name_of_theirs_in_our_folder_is_named(tmp_path):
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "text.py").write_text("")  # theirs has a text module too: ours would be unreachable
    done = _run("import datasets", first=[str(REPO_ROOT), str(fake.parent)], site_packages=False)
    assert done.returncode != 0
    assert "datasets/text.py has the name of a module of Hugging Face datasets" in done.stderr
