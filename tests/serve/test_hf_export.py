"""A registered LLM version is a Hugging Face model directory: transformers loads it as is and computes the same
logits as the checkpoint it was imported from (0 effective training steps), its files are all checksummed by
the registry, and stage=export copies a verified version out. After real fine-tuning the export still speaks
for the model: transformers' greedy generation from it equals the endpoint's temperature-0 completion."""

import json
import subprocess
import sys

import torch

from serve.registry import Registry
from tests.helpers import REPO_ROOT

TOKENS = torch.arange(2 * 48).reshape(2, 48) % 300


def _logits(directory) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def test_the_registered_version_loads_in_transformers_with_the_originals_logits(imported_llm, hf_checkpoint):
    version_dir = Registry(imported_llm.registry).fetch(imported_llm.model, 1, cache_dir=imported_llm.root / "c")
    assert (_logits(version_dir) - _logits(hf_checkpoint)).abs().max().item() < 1e-4
    config = json.loads((version_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["torch_dtype"] == "float32"
    # The tokenizer travels with its chat template and special tokens; the checkpoint's stop token too.
    original = json.loads((hf_checkpoint / "tokenizer_config.json").read_text())
    assert json.loads((version_dir / "tokenizer_config.json").read_text()) == original
    generation = json.loads((version_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == json.loads((hf_checkpoint / "generation_config.json").read_text())[
        "eos_token_id"]


def test_shards_respect_the_size_limit_and_every_file_is_checksummed(imported_llm):
    registry = Registry(imported_llm.registry)
    version_dir = registry.fetch(imported_llm.model, 1, cache_dir=imported_llm.root / "c")
    index = json.loads((version_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1  # serve.export_shard_gb=0.0001: 100 kB per file
    for shard in shards:  # a file over the limit holds a single tensor larger than the limit
        size = (version_dir / shard).stat().st_size
        held = [name for name, file in index["weight_map"].items() if file == shard]
        assert size <= 100_000 + 4096 or len(held) == 1, (shard, size, held)
    assert "lm_head.weight" not in index["weight_map"]  # tied: the embedding is the output projection
    recorded = set(registry.version(imported_llm.model, 1)["files"])
    on_disk = {path.name for path in version_dir.iterdir()} - {"version.json", "claim.json"}  # the registry's own
    assert on_disk <= recorded and {"config.json", "tokenizer.json", "generation_config.json", *shards} <= recorded


def _launch(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *overrides], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_stage_export_copies_a_verified_version_out(imported_llm, tmp_path):
    common = [f"serve.registry={imported_llm.registry}", f"serve.model={imported_llm.model}",
              f"paths.root={tmp_path}"]
    done = _launch("stage=export", *common, f"serve.export_dir={tmp_path / 'out'}", "serve.version=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"export_dir: {tmp_path / 'out'}"
    assert (_logits(tmp_path / "out") - _logits(imported_llm.registry / imported_llm.model / "versions" / "000001")
            ).abs().max().item() == 0
    # A directory with something in it is refused and left as it was.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    done = _launch("stage=export", *common, f"serve.export_dir={tmp_path / 'busy'}")
    assert done.returncode == 2 and "exists and is not an empty directory; nothing was written" in done.stdout
    assert [path.name for path in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    # A bit flipped in a registered shard is named, and nothing is copied.
    shard = next((imported_llm.registry / imported_llm.model / "versions" / "000001").glob("model-0000*.safetensors"))
    original = shard.read_bytes()
    try:
        shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        done = _launch("stage=export", *common, f"serve.export_dir={tmp_path / 'tampered'}")
        assert done.returncode == 2 and shard.name in done.stdout, done.stdout[-2000:]
        assert not (tmp_path / "tampered").exists()
    finally:
        shard.write_bytes(original)


def test_fine_tuning_keeps_tied_embeddings_one_tensor_through_a_restart(fine_tuned_llm, hf_checkpoint):
    from serve.export import consolidated_from_checkpoint, read_model_config
    from tests.conftest import FINE_TUNE_CRASH_AT_STEP
    from trainers.checkpointing import checkpoint_format

    assert (fine_tuned_llm.run_dir / f".crash_injected_at_{FINE_TUNE_CRASH_AT_STEP}").exists()
    summary = json.loads((fine_tuned_llm.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 20
    checkpoint = fine_tuned_llm.run_dir / summary["best_checkpoint"].rsplit("/", 1)[1]
    state = consolidated_from_checkpoint(checkpoint, model_config=read_model_config(checkpoint),
                                         stored=checkpoint_format(checkpoint))
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    # and the weights did move: 20 steps at lr 1e-3 from the imported checkpoint
    version_dir = Registry(fine_tuned_llm.registry).fetch(fine_tuned_llm.model, 1, cache_dir=fine_tuned_llm.root)
    index = json.loads((version_dir / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    assert (_logits(version_dir) - _logits(hf_checkpoint)).abs().max().item() > 0.1
