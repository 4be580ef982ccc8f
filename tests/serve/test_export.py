"""Exports from every strategy: the consolidated model, loaded in one process, must give what the trained
(sharded, distributed) model reported on the same held-out rows, and load without any strategy code."""

import json
import subprocess
import sys

import pytest
import yaml

from serve.evaluate import evaluate_on_run_data
from serve.export import EXPORT_INFO_FILE, export_checkpoint, load_export
from tests.helpers import LLM_STRATEGY_RUNS, RANKER_REFERENCE_RUN, REPO_ROOT, read_metrics
from trainers.config import config_from_dict


def export_best(run_dir, out_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    checkpoint = run_dir / summary["best_checkpoint"].rsplit("/", 1)[1]
    step = json.loads((checkpoint / "train_state.json").read_text())["step"]
    return export_checkpoint(checkpoint, out_dir, info={"step": step}), step


def reported(run_dir, step: int, metric: str) -> float:
    return next(row[metric] for row in read_metrics(run_dir) if row["step"] == step and metric in row)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_export_reproduces_the_trained_models_validation_loss(strategy, trained_runs, tmp_path):
    """FSDP2 shards gathered from DCP, ZeRO partitions merged from their fp32 masters: the exported model's
    loss over the validation rows training scored equals what the 2 workers reported at that step."""
    run_dir = trained_runs(f"llm-{strategy}", LLM_STRATEGY_RUNS[strategy])
    export_dir, step = export_best(run_dir, tmp_path / "export")
    info = json.loads((export_dir / EXPORT_INFO_FILE).read_text())
    assert info["strategy"] == ("deepspeed" if strategy.startswith("zero") else strategy)
    run_cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    metrics = evaluate_on_run_data(load_export(export_dir), run_cfg, rows=None)
    assert metrics["val_loss"] == pytest.approx(reported(run_dir, step, "val_loss"), rel=1e-6)


def test_an_hsdp_export_gathers_every_shard_group_and_reproduces_the_loss(trained_runs, tmp_path):
    """HSDP on 2 replicas of 2-way shard groups: DCP stores each replicated shard once, in files from all 4
    ranks; export reads them back whole and reproduces what the run reported."""
    run_dir = trained_runs("llm-hsdp", LLM_STRATEGY_RUNS["hsdp"])
    export_dir, step = export_best(run_dir, tmp_path / "export")
    checkpoint = json.loads((export_dir / EXPORT_INFO_FILE).read_text())["checkpoint"]
    assert len(list((run_dir / checkpoint.rsplit("/", 1)[1] / "dcp").glob("*.distcp"))) == 4
    info = json.loads((export_dir / EXPORT_INFO_FILE).read_text())
    assert info["strategy"] == "fsdp" and info["trained_with"] == "hsdp"  # FSDP2's DCP format, written by HSDP
    run_cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    metrics = evaluate_on_run_data(load_export(export_dir), run_cfg, rows=None)
    assert metrics["val_loss"] == pytest.approx(reported(run_dir, step, "val_loss"), rel=1e-6)


def test_ranker_export_reproduces_the_reported_auc(trained_runs, tmp_path):
    run_dir = trained_runs("ranker-reference", RANKER_REFERENCE_RUN, ranker=True)
    export_dir, step = export_best(run_dir, tmp_path / "export")
    assert (export_dir / "feature_spec.json").exists()
    run_cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    metrics = evaluate_on_run_data(load_export(export_dir), run_cfg, rows=None)
    for metric in ("auc", "logloss"):
        assert metrics[metric] == pytest.approx(reported(run_dir, step, metric), abs=1e-6)


def test_an_export_loads_in_a_plain_process_without_strategy_code(trained_runs, tmp_path):
    """A fresh interpreter loads the ZeRO-3 export and runs it; DeepSpeed and Ray are never imported."""
    export_dir, _ = export_best(trained_runs("llm-zero3", LLM_STRATEGY_RUNS["zero3"]), tmp_path / "export")
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from serve.export import load_export\n"
        f"loaded = load_export({str(export_dir)!r})\n"
        "logits = loaded.model(torch.zeros(1, 4, dtype=torch.long))\n"
        "assert torch.isfinite(logits).all()\n"
        "print(sorted(m for m in ('deepspeed', 'ray') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_checkpoint_without_weights_is_refused_by_name(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model_config.json").write_text(json.dumps({"family": "llm", "model": {}}))
    with pytest.raises(ValueError, match="holds no model weights: expected model.pt"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", info={})


def test_an_export_with_a_wrong_tensor_is_refused_at_load(trained_runs, tmp_path):
    from safetensors.torch import load_file, save_file

    export_dir, _ = export_best(trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"]), tmp_path / "export")
    shard = next(export_dir.glob("model-*.safetensors"))
    state = load_file(shard)
    state["model.norm.weight"] = state["model.norm.weight"][:1]  # ours: norm.weight
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"\bnorm.weight has shape \(1,\)"):
        load_export(export_dir)


@pytest.mark.parametrize("name", ["../stolen.json", "/etc/hostname"])
def test_an_asset_name_that_leaves_the_directory_is_refused(name, trained_runs, tmp_path):
    """model_config.json names the side files that export copies and serving opens: a crafted one must not
    read or write outside the checkpoint and export directories."""
    import shutil

    run_dir = trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"])
    summary = json.loads((run_dir / "summary.json").read_text())
    checkpoint = shutil.copytree(run_dir / summary["best_checkpoint"].rsplit("/", 1)[1], tmp_path / "ckpt")
    (tmp_path / "stolen.json").write_text("{}")
    model_config = json.loads((checkpoint / "model_config.json").read_text())
    (checkpoint / "model_config.json").write_text(json.dumps({**model_config, "tokenizer": name}))
    with pytest.raises(ValueError, match=f"model_config.json: tokenizer is '{name}'; expected a plain file name"):
        export_checkpoint(checkpoint, tmp_path / "out" / "export", info={})
    assert not (tmp_path / "out" / "stolen.json").exists()
    assert not (tmp_path / "out" / "export").exists()
