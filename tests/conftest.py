import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from trainers.config import register_configs  # noqa: E402

register_configs()  # as launch.py does before composing


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session, sized for 2 training workers plus Ray Data tasks."""
    import os

    import ray

    from cluster.connection import RAY_ENV_DEFAULTS

    os.environ.update(RAY_ENV_DEFAULTS)  # as launch.py's connect() does
    # Custom metrics reach the Prometheus endpoint in a second rather than ten, so the serving tests can read them.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), **RAY_ENV_DEFAULTS}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Prepared corpora shared by every training test (the first run prepares, later runs reuse)."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def trained_runs(ray_session, data_cache, tmp_path_factory):
    """Finished training runs shared by test modules that only read them (strategy parity, export, serving),
    keyed by name: the first test that asks trains it, the others reuse it."""
    import os

    from tests.helpers import CRASH_AT_STEP, run_ranker, run_training
    from trainers.loop import CRASH_AT_STEP_ENV

    runs: dict[str, Path] = {}

    def get(name: str, overrides: list[str], *, ranker: bool = False) -> Path:
        if name not in runs:
            train = run_ranker if ranker else run_training
            if name in CRASH_AT_STEP:
                os.environ[CRASH_AT_STEP_ENV] = str(CRASH_AT_STEP[name])
            try:
                runs[name] = train(tmp_path_factory.mktemp(name), data_cache, overrides)
            finally:
                os.environ.pop(CRASH_AT_STEP_ENV, None)
        return runs[name]

    return get


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A tiny random transformers LlamaForCausalLM (GQA, llama3 RoPE scaling, tied embeddings, sharded
    safetensors) with a Llama 3 style tokenizer and chat template: what model.init_from imports."""
    from tests.hf_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("hf_checkpoint") / "tiny-llama", tied=True, shard=True)


@pytest.fixture(scope="session")
def imported_llm(ray_session, data_cache, hf_checkpoint, tmp_path_factory):
    """hf_checkpoint imported with FSDP2 on 2 workers, trained 0 effective steps (trainer.lr=0), and promoted
    into a registry of its own with shards of at most 100 kB (so the export has several)."""
    from types import SimpleNamespace

    from tests.helpers import run_training

    root = tmp_path_factory.mktemp("imported_llm")
    run_dir = run_training(root, data_cache, [
        f"model.init_from={hf_checkpoint}", "trainer.lr=0", "strategy=fsdp", "stages=[train,promote]",
        "serve.model=tiny-hf", "serve.export_shard_gb=0.0001"])
    return SimpleNamespace(root=root, run_dir=run_dir, registry=root / "registry", model="tiny-hf")


# 20 real fine-tuning steps of the imported checkpoint on a generated chat file: enough to move the weights
# far from the checkpoint's, so that comparing the export's generations with the endpoint's means something.
SFT_OVERRIDES = ["+exp=llm_sft", "data.seq_len=128", "trainer.max_steps=20", "trainer.lr=1e-3",
                 "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.log_every_n_steps=5",
                 "trainer.eval_batches=2", "strategy=fsdp"]


@pytest.fixture(scope="session")
def fine_tuned_llm(ray_session, hf_checkpoint, tmp_path_factory):
    """hf_checkpoint fine-tuned on chat data (+exp=llm_sft) and promoted: a Hugging Face directory in a registry."""
    import os
    from types import SimpleNamespace

    from tests.helpers import run_training
    from tests.hf_models import write_chat_jsonl
    from trainers.loop import CRASH_AT_STEP_ENV

    root = tmp_path_factory.mktemp("fine_tuned_llm")
    chats = write_chat_jsonl(root / "chats.jsonl", 200, 0)
    # A worker crashes once at step 12 and the run goes on from its step-10 checkpoint: tied embeddings must stay
    # one tensor through the checkpoint and the restore too (tests/serve/test_hf_export.py checks).
    os.environ[CRASH_AT_STEP_ENV] = str(FINE_TUNE_CRASH_AT_STEP)
    try:
        run_dir = run_training(root, root / "data", [f"model.init_from={hf_checkpoint}", f"data.path={chats}",
                                                     "stages=[train,promote]", "serve.model=tiny-chat"],
                               experiment="llm_sft", base=SFT_OVERRIDES)
    finally:
        os.environ.pop(CRASH_AT_STEP_ENV, None)
    return SimpleNamespace(root=root, run_dir=run_dir, registry=root / "registry", model="tiny-chat", chats=chats)


FINE_TUNE_CRASH_AT_STEP = 12
