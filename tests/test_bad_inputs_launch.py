"""Issue 14 as users meet it: `python launch.py` with a bad value exits 2, naming the key (or the file and line),
before any data is prepared or Ray starts. The launches run side by side, as tests/test_launch.py's do: each
spends its seconds importing."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, TINY_OVERRIDES

SURROGATE_CORPUS = "corpus"  # a text_dir the fixture writes, with a lone surrogate on line 2 of a .jsonl file

# One of each kind (the whole table is checked in-process: tests/test_bad_inputs_config.py): a division by zero,
# a shape that used to fail in the workers after retries, a retry-forever, a busy loop, a placement no embedded
# Ray can meet, and text no tokenizer can read.
BAD_VALUES = [
    # (overrides on TINY_OVERRIDES, what the output must name)
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size=0 must be at least 1"),
    (["model.n_heads=0"], "model.n_heads=0 must be at least 1"),
    (["model.n_heads=3"], "model.n_heads=3 must divide model.dim=128"),
    (["checkpoint.max_failures=-1"], "checkpoint.max_failures=-1 must be at least 0"),
    (["serve.refresh_s=0"], "serve.refresh_s=0.0 must be above 0"),
    (["cluster.placement_strategy=STRICT_SPREAD"], "cluster.placement_strategy=STRICT_SPREAD puts each of the"),
    (["data=text_dir", f"data.path={SURROGATE_CORPUS}"], "docs.jsonl: line 2 field 'text' (data.column) holds a lone"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[tuple[int, str]]:
    root = tmp_path_factory.mktemp("bad_values")
    corpus = root / SURROGATE_CORPUS
    corpus.mkdir()
    (corpus / "a.txt").write_text("def f():\n    return 1\n" * 50)
    (corpus / "docs.jsonl").write_text(json.dumps({"text": "fine"}) + '\n{"text": "half a pair: \\ud800"}\n')
    processes = [
        subprocess.Popen([sys.executable, "launch.py", *TINY_OVERRIDES, f"paths.root={root / str(index)}",
                          *[item.replace(SURROGATE_CORPUS, str(corpus)) for item in overrides]],
                         cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index, (overrides, _) in enumerate(BAD_VALUES)
    ]
    return [(process.wait(timeout=240), process.stdout.read()) for process in processes]


@pytest.mark.parametrize("index", range(len(BAD_VALUES)), ids=[" ".join(overrides) for overrides, _ in BAD_VALUES])
def test_a_bad_value_exits_2_naming_it_before_ray_starts(index, outcomes):
    returncode, output = outcomes[index]
    assert returncode == 2, output[-3000:]
    assert BAD_VALUES[index][1] in output, output[-3000:]
    assert "Traceback" not in output
    assert "starting an embedded local Ray" not in output and "connecting to the Ray cluster" not in output
