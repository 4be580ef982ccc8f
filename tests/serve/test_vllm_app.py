"""serve.engine=vllm (serve/vllm_app.py) on a machine without GPUs: the application's config is built and checked
by Ray Serve LLM's own schema from a real registry (one engine per version, our limits under vLLM's names, the
version's Hugging Face directory as the source, no remote code), bad settings are refused by name, and a missing
vLLM is said before anything starts. Running vLLM itself needs CUDA GPUs."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conf.schema import ServeConfig
from serve.ingress import Routes
from serve.registry import RESERVED_EXPORT_NAMES, RESERVED_VERSION_KEYS, Registry
from tests.helpers import REPO_ROOT, composition_error

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


@pytest.fixture
def two_versions(fine_tuned_llm, tmp_path):
    """A copy of the fine-tuned chat model's registry with the same export registered again as v2, the canary
    at 10%: production and canary, each a Hugging Face directory."""
    root = tmp_path / "registry"
    shutil.copytree(fine_tuned_llm.registry, root)
    registry = Registry(root)
    model = fine_tuned_llm.model
    first = registry.version(model, 1)
    export = tmp_path / "export"
    export.mkdir()
    for path in Path(registry.version_location(model, 1)).iterdir():
        if path.name not in RESERVED_EXPORT_NAMES:
            shutil.copy(path, export / path.name)
    metadata = {key: value for key, value in first.items() if key not in RESERVED_VERSION_KEYS}
    second = registry.register(model, export, metadata=metadata)["version"]
    registry.move_alias(model, "canary", second, reason="test", alias_fields={"percent": 10.0})
    return registry, model, second


def _serve_cfg(registry: Registry, **settings) -> ServeConfig:
    defaults = {"engine": "vllm", "max_running_requests": 8, "max_batched_tokens": 512, "max_queued_requests": 32,
                "min_replicas": 1, "max_replicas": 3, "accelerator_type": "H100",
                "vllm_engine_kwargs": {"dtype": "bfloat16", "gpu_memory_utilization": 0.8}}
    return ServeConfig(registry=str(registry.uri), **{**defaults, **settings})


def test_the_app_config_has_one_engine_per_version_from_its_hugging_face_directory(two_versions):
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig  # ray.serve.llm's base; no vLLM
    from transformers import AutoConfig, AutoTokenizer

    from serve.vllm_app import ingress_settings, llm_configs

    registry, model, canary = two_versions
    serve_cfg = _serve_cfg(registry, api_key="not-a-real-key")
    configs = llm_configs(serve_cfg, model=model)
    assert sorted(configs) == [1, canary]
    for version, config in configs.items():
        assert isinstance(config, LLMConfig)  # validated by Ray Serve LLM's own schema
        # Every engine serves the registry's model name, so a client's `model` goes through unchanged.
        assert config.model_id == model
        source = config.model_loading_config.model_source
        assert source == registry.version_location(model, version)
        # What vLLM reads there loads in transformers as a Llama with its tokenizer and chat template.
        assert AutoConfig.from_pretrained(source).architectures == ["LlamaForCausalLM"]
        assert AutoTokenizer.from_pretrained(source).chat_template
        assert config.engine_kwargs == {"max_num_seqs": 8, "max_num_batched_tokens": 512,
                                        "enable_chunked_prefill": True, "trust_remote_code": False,
                                        "dtype": "bfloat16", "gpu_memory_utilization": 0.8}
        assert config.accelerator_type == "H100"
        deployment = config.deployment_config
        assert deployment["name"] == f"{model}_v{version}"
        assert deployment["max_ongoing_requests"] == 8 + 32 and deployment["max_queued_requests"] == 32
        autoscaling = deployment["autoscaling_config"]
        assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 3)
        assert autoscaling["metrics_interval_s"] == 0.5  # the fast reaction the native replicas have
    settings = ingress_settings(serve_cfg, model=model, versions=sorted(configs))
    assert settings["versions"] == [1, canary] and settings["engine"] == "vllm"
    assert settings["api_key"] == "not-a-real-key" and settings["family"] == "llm"
    assert settings["ongoing_limit"] == (8 + 32) * 3 * 2


def test_the_ingress_deployment_takes_no_gpu(two_versions):
    from serve.vllm_app import ingress_settings, vllm_ingress_deployment

    registry, model, canary = two_versions
    serve_cfg = _serve_cfg(registry, num_gpus=1.0)  # the native replicas' GPUs; vLLM's engines size their own
    settings = ingress_settings(serve_cfg, model=model, versions=[1, canary])
    deployment = vllm_ingress_deployment(serve_cfg, settings=settings)  # what build_vllm_app binds
    assert deployment.name == "llm_replica"
    assert deployment.ray_actor_options["num_gpus"] == 0
    assert deployment.max_ongoing_requests >= settings["ongoing_limit"]  # so that the ingress's own 503 answers


def test_without_a_canary_only_production_gets_an_engine(two_versions):
    from serve.vllm_app import llm_configs

    registry, model, _ = two_versions
    registry.move_alias(model, "canary", None, reason="test")
    assert list(llm_configs(_serve_cfg(registry), model=model)) == [1]


def test_a_remote_registry_is_read_by_the_engines_from_its_bucket(fine_tuned_llm):
    from ray.llm._internal.common.utils.cloud_utils import CloudMirrorConfig

    from serve.vllm_app import model_source

    registry = Registry(fine_tuned_llm.registry)
    assert model_source(registry, fine_tuned_llm.model, 1) == registry.version_location(fine_tuned_llm.model, 1)

    class Bucket(Registry):  # the location a registry on S3 gives, without needing S3 here
        def version_location(self, model, number):
            return f"s3://bucket/registry/{model}/versions/{number:06d}"

    source = model_source(Bucket(fine_tuned_llm.registry), fine_tuned_llm.model, 1)
    assert isinstance(source, CloudMirrorConfig)
    assert source.bucket_uri == f"s3://bucket/registry/{fine_tuned_llm.model}/versions/000001"


@pytest.mark.parametrize("key", ["trust_remote_code", "model", "served_model_name", "tokenizer"])
def test_engine_kwargs_that_slipway_owns_are_refused_by_name(two_versions, key):
    from serve.vllm_app import llm_configs

    registry, model, _ = two_versions
    with pytest.raises(ValueError, match=rf"serve.vllm_engine_kwargs: {key} cannot be set"):
        llm_configs(_serve_cfg(registry, vllm_engine_kwargs={key: True}), model=model)


def test_an_unknown_accelerator_is_named_with_the_setting(two_versions):
    from serve.vllm_app import llm_configs

    registry, model, _ = two_versions
    cfg = _serve_cfg(registry)
    cfg.accelerator_type = "H9000"
    with pytest.raises(ValueError, match=r"serve.accelerator_type.*accelerator_type: .*H9000"):
        llm_configs(cfg, model=model)


def test_versions_that_vllm_cannot_read_are_refused_by_name():
    from serve.vllm_app import check_exported_for_vllm

    llm_files = {name: {} for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                                       "model-00001-of-00001.safetensors")}
    check_exported_for_vllm({"version": 3, "family": "llm", "files": llm_files}, model="m")
    with pytest.raises(ValueError, match=r"vllm serves LLMs; m v3 is a ranker model: serve it with serve.engine"):
        check_exported_for_vllm({"version": 3, "family": "ranker", "files": {"model.safetensors": {}}}, model="m")
    no_tokenizer = {name: {} for name in llm_files if name != "tokenizer.json"}
    with pytest.raises(ValueError, match=r"m v3 lacks tokenizer.json in the registry"):
        check_exported_for_vllm({"version": 3, "family": "llm", "files": no_tokenizer}, model="m")
    no_weights = {name: {} for name in llm_files if not name.endswith(".safetensors")}
    with pytest.raises(ValueError, match=r"m v3 lacks \*.safetensors"):
        check_exported_for_vllm({"version": 3, "family": "llm", "files": no_weights}, model="m")


def test_the_ingress_follows_aliases_only_among_versions_with_an_engine():
    from serve.vllm_app import routes_with_engines

    promoted = Routes(production=2, canary=None)
    assert routes_with_engines(promoted, [1, 2]) is promoted  # the canary promoted: its engine already runs
    assert routes_with_engines(Routes(production=1, canary=2, canary_percent=50.0), [1, 2]).canary_percent == 50.0
    with pytest.raises(ValueError, match=r"names v5, which has no vLLM engine .*engines: \[1, 2\].*stage=serve"):
        routes_with_engines(Routes(production=1, canary=5, canary_percent=10.0), [1, 2])


def test_an_unknown_engine_is_refused_at_composition():
    message = composition_error(["serve.engine=tensorrt"])
    assert "serve.engine" in message and "native" in message and "vllm" in message


@pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here: the missing-extra message cannot be shown")
def test_serving_with_vllm_where_it_is_not_installed_says_what_to_install(two_versions):
    """launch.py names the extra and the way back, before it touches the registry or starts Ray."""
    registry, model, canary = two_versions
    before = json.dumps(registry.aliases(model), sort_keys=True)
    result = subprocess.run(
        [sys.executable, "launch.py", "stage=serve", f"serve.model={model}", f"serve.registry={registry.uri}",
         "serve.engine=vllm", f"serve.canary_version={canary}", "serve.canary_percent=50"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "serve.engine=vllm needs Ray Serve LLM and vLLM" in output and "SLIPWAY_EXTRAS=vllm" in output
    assert "serve.engine=native" in output and "Traceback" not in output
    assert json.dumps(registry.aliases(model), sort_keys=True) == before  # the canary was not set
