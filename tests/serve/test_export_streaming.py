"""Export streams: the checkpoint is read one group (one output shard) at a time, and a group's tensors are all
freed before the next group is read, for every checkpoint format; what it writes is what the whole-dict path
(every tensor consolidated at once, then written) writes, byte for byte."""

import dataclasses
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file

import serve.export
from serve.export import asset_files, consolidated_from_checkpoint, export_checkpoint, family_of, read_model_config
from tests.helpers import LLM_STRATEGY_RUNS
from trainers.checkpointing import checkpoint_format
from trainers.pretrained import INDEX_FILE, to_hf_name

SHARD_BYTES = 60_000  # llm_tiny's blocks are ~0.5 MB in bf16: a shard per tensor or two


def _best_checkpoint(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    return run_dir / summary["best_checkpoint"].rsplit("/", 1)[1]


def _watching(layout, live: dict, seen: list):
    """The layout's writer, fed through a watch: each group's tensors are registered as they are handed over
    and unregistered when freed; asking for the next group while any is alive fails."""

    def write_groups(groups, out_dir, **kwargs):
        def watched():
            iterator = iter(groups)
            while True:
                assert not live, f"still alive when group {len(seen) + 1} is read: {sorted(live)[:4]}"
                group = next(iterator, None)
                if group is None:
                    return
                for name in group:
                    key = (len(seen), name)
                    live[key] = group[name].numel() * group[name].element_size()
                    weakref.finalize(group[name], live.pop, key)
                seen.append(list(group))
                yield group
                del group

        layout.write_groups(watched(), out_dir, **kwargs)

    return dataclasses.replace(layout, write_groups=write_groups)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_export_holds_one_group_at_a_time_and_writes_what_the_whole_dict_path_writes(strategy, trained_runs,
                                                                                   tmp_path, monkeypatch):
    checkpoint = _best_checkpoint(trained_runs(f"llm-{strategy}", LLM_STRATEGY_RUNS[strategy]))
    model_config = read_model_config(checkpoint)
    layout = family_of(model_config).export_layout
    live, seen = {}, []
    watched = _watching(layout, live, seen)
    monkeypatch.setattr(serve.export, "family_of",
                        lambda config: dataclasses.replace(family_of(config), export_layout=watched))
    streamed = export_checkpoint(checkpoint, tmp_path / "streamed", info={}, dtype=torch.bfloat16,
                                 shard_bytes=SHARD_BYTES)
    assert not live  # the last group too
    monkeypatch.undo()

    # One group per shard, as planned, each read and freed before the next.
    index = json.loads((streamed / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(seen) == len(shards) > 3
    assert [[to_hf_name(name) for name in group] for group in seen] == [
        [hf for hf, file in index["weight_map"].items() if file == shard] for shard in shards]

    # The whole-dict path: every tensor consolidated at once, then written in the same layout.
    state = consolidated_from_checkpoint(checkpoint, model_config=model_config, stored=checkpoint_format(checkpoint))
    whole = tmp_path / "whole"
    whole.mkdir()
    for name in asset_files(model_config):  # the layout reads the tokenizer's special tokens
        (whole / name).write_bytes((checkpoint / name).read_bytes())
    layout.write(state, whole, model_config=model_config, dtype=torch.bfloat16, shard_bytes=SHARD_BYTES)
    assert json.loads((whole / INDEX_FILE).read_text()) == index  # the weights digest included
    for shard in shards:
        assert (streamed / shard).read_bytes() == (whole / shard).read_bytes(), shard
    tensors = {}
    for shard in shards:
        tensors.update(load_file(streamed / shard))
    tied = model_config["model"].get("tie_embeddings")
    expected = {to_hf_name(name): t.to(torch.bfloat16) for name, t in state.items()
                if not (tied and name == "output.weight")}
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_groups_equal_deepspeeds_own_merge(strategy, trained_runs):
    """ZeRO-1/2 parameters are cut from the fp32 partitions by our own reading of zero_to_fp32's offsets (its lazy
    mode still concatenates them whole), ZeRO-3's gathered by its lazy mode: both equal its eager merge."""
    import contextlib

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainers.safe_loading import weights_only_loads
    from trainers.strategies.zero import STATE_DIR

    checkpoint = _best_checkpoint(trained_runs(f"llm-{strategy}", LLM_STRATEGY_RUNS[strategy]))
    template = serve.export.model_template(read_model_config(checkpoint))
    with weights_only_loads(), contextlib.redirect_stdout(None):
        reference = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / STATE_DIR), tag="state")
    groups = [[name] for name in template]  # one tensor at a time: every offset on its own
    for (name,), group in zip(groups, checkpoint_format(checkpoint).consolidate_groups(checkpoint, template,
                                                                                         groups=groups), strict=True):
        assert torch.equal(group[name], reference[name]), name

