"""serve.engine=vllm: an LLM's registry versions decoded by vLLM through Ray Serve LLM, behind Slipway's ingress.

    SLIPWAY_EXTRAS=vllm TORCH_INDEX_URL=<a CUDA wheel index> bash scripts/setup.sh   # Ray Serve LLM, vLLM
    python launch.py stage=serve serve.model=llm_1b serve.engine=vllm serve.accelerator_type=H100 \\
        'serve.vllm_engine_kwargs={dtype: bfloat16, gpu_memory_utilization: 0.85}'

The application has one deployment per engine and one in front of them:

  llm_replica       the ingress (VllmIngress), named as the native engine's: the API key, the body limit, the
                    version choice (production, or the canary's share once it passed its check), `x-model-version`
                    on every answer and Slipway's request metrics, as on the native engine (serve/ingress.py:
                    Ingress). A request is checked by the same parsers as the native engine's, so a bad one gets
                    the same named error on either engine; the client's body then goes on unchanged to the
                    version's engine.
  LLMServer:<model>_v<N>
                    Ray Serve LLM's LLMServer (a vLLM engine) for version N, built from the version's export in the
                    registry: a Hugging Face Llama directory (config.json, safetensors shards, tokenizer.json, and
                    tokenizer_config.json with the chat template) that vLLM reads as it is. Every engine serves the
                    model under the registry's model name, so the client's `model` needs no rewriting.

One engine per version because a vLLM engine holds one set of weights, allocated up front on its GPUs. The versions
with an engine are those that production and the canary name when `stage=serve` runs. The ingress follows the
registry among them with no redeploy: a canary share that changes, a canary promoted to production, and a rollback
to the version production held before (its engine still runs) all take effect within serve.refresh_s. An alias
moved to a version with no engine keeps the current routes and logs that `stage=serve` must run again; Serve then
adds that engine and leaves the running ones as they are.

Loading runs no code: vLLM is told `trust_remote_code=False` (and refuses it in serve.vllm_engine_kwargs), and the
export is safetensors and JSON. The driver verifies the versions' checksums before it deploys (serve/deploy.py);
from a remote registry (s3://, gs://) vLLM's replicas download the version directory themselves.

Tokens per second, time to first token and KV-cache use are vLLM's own metrics (Ray Serve LLM exports them through
Ray's Prometheus endpoint, `log_engine_metrics`); the ingress adds Slipway's per-version request counts, errors and
latencies.
"""

import logging

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from conf.schema import ServeConfig
from serve import api
from serve.deployments import autoscaling_config, ingress_deployment, serve_settings
from serve.ingress import (
    CHAT,
    COMPLETIONS,
    AsciiJSONResponse,
    Ingress,
    LLMRoute,
    Routes,
    routes_from_aliases,
    unknown_route,
)
from serve.registry import Registry

logger = logging.getLogger(__name__)

VLLM_EXTRA = ("install them on the GPU machines with SLIPWAY_EXTRAS=vllm TORCH_INDEX_URL=<a CUDA wheel index> bash "
              "scripts/setup.sh (pyproject.toml's vllm group)")
# Files vLLM reads from a version's directory; a version without them was not exported for it.
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
# Engine settings Slipway owns: what vLLM loads is the registry's version, and loading it must run no code.
OWNED_ENGINE_KWARGS = ("model", "served_model_name", "tokenizer", "trust_remote_code")


def engine_deployment_name(model: str, version: int) -> str:
    return f"{model}_v{version}"


def vllm_engine_kwargs(serve_cfg: ServeConfig) -> dict:
    """vLLM's engine arguments: the native engine's limits under vLLM's names, then serve.vllm_engine_kwargs."""
    extra = dict(serve_cfg.vllm_engine_kwargs or {})
    owned = sorted(set(extra) & set(OWNED_ENGINE_KWARGS))
    if owned:
        raise ValueError(f"serve.vllm_engine_kwargs: {', '.join(owned)} cannot be set: the engine loads the "
                         "registry's version under the model's name, and loading it runs no code "
                         "(trust_remote_code stays false)")
    return {"max_num_seqs": serve_cfg.max_running_requests, "max_num_batched_tokens": serve_cfg.max_batched_tokens,
            "enable_chunked_prefill": True, "trust_remote_code": False, **extra}


def engine_deployment_config(serve_cfg: ServeConfig, *, model: str, version: int) -> dict:
    """Serve's options of one version's engine: autoscaled like the native replicas, and bounded the same way
    (running plus queued; beyond that the ingress's call raises BackPressureError, answered 503)."""
    return {"name": engine_deployment_name(model, version),
            "autoscaling_config": autoscaling_config(serve_cfg, min_replicas=max(serve_cfg.min_replicas, 1),
                                                     initial_replicas=max(serve_cfg.min_replicas, 1)),
            "max_ongoing_requests": serve_cfg.max_running_requests + serve_cfg.max_queued_requests,
            "max_queued_requests": serve_cfg.max_queued_requests,
            "health_check_period_s": serve_cfg.health_check_period_s,
            "graceful_shutdown_timeout_s": serve_cfg.graceful_shutdown_timeout_s}


def model_source(registry: Registry, model: str, version: int):
    """Where vLLM's replicas read the version: the registry's directory, on a shared disk or in a bucket."""
    from ray.llm._internal.common.utils.cloud_utils import CloudMirrorConfig  # see llm_configs

    location = registry.version_location(model, version)
    return CloudMirrorConfig(bucket_uri=location) if "://" in location else location


def check_exported_for_vllm(record: dict, *, model: str) -> None:
    """Refuse a version that is not an LLM's Hugging Face export, by the files its record lists."""
    version, files = record["version"], set(record.get("files", {}))
    if record.get("family") != "llm":
        raise ValueError(f"serve.engine=vllm serves LLMs; {model} v{version} is a {record.get('family')} model: "
                         "serve it with serve.engine=native")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing or not any(name.endswith(".safetensors") for name in files):
        raise ValueError(f"serve.engine=vllm: {model} v{version} lacks {', '.join(missing) or '*.safetensors'} in "
                         f"the registry; vLLM reads a Hugging Face directory: promote the run again with this "
                         f"Slipway (stage=promote) to register one")


def llm_configs(serve_cfg: ServeConfig, *, model: str) -> dict[int, object]:
    """One Ray Serve LLM config per version that production and the canary name now, checked by Ray's own schema
    (ray.serve.llm.LLMConfig). Imported from where Ray defines it: ray.serve.llm imports vLLM on import, its
    config module does not, so configs are built and checked on machines without GPUs (Ray is pinned, so the
    path holds; ray.serve.llm.LLMConfig subclasses this class and its builders take either)."""
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    registry = Registry(serve_cfg.registry)
    versions = deployed_versions(registry, model)
    engine_kwargs = vllm_engine_kwargs(serve_cfg)
    configs = {}
    for version in versions:
        check_exported_for_vllm(registry.version(model, version), model=model)
        try:
            configs[version] = LLMConfig(
                model_loading_config={"model_id": model, "model_source": model_source(registry, model, version)},
                engine_kwargs=engine_kwargs, accelerator_type=serve_cfg.accelerator_type,
                deployment_config=engine_deployment_config(serve_cfg, model=model, version=version),
                log_engine_metrics=True)
        except pydantic.ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ValueError(f"serve.engine=vllm: Ray Serve LLM refuses the engine config of {model} v{version} "
                             f"(serve.accelerator_type, serve.vllm_engine_kwargs): {problems}") from None
    return configs


def deployed_versions(registry: Registry, model: str) -> list[int]:
    """Production's version, and the canary's when there is one: the versions that get an engine."""
    routes = routes_from_aliases(registry.aliases(model), model=model)
    return [routes.production] + ([routes.canary] if routes.canary not in (None, routes.production) else [])


def ingress_settings(serve_cfg: ServeConfig, *, model: str, versions: list[int]) -> dict:
    """What the ingress needs (a plain dict: it travels to the replicas)."""
    settings = serve_settings(serve_cfg, model=model, family="llm")
    # The engines bound their own queues (engine_deployment_config); the ingress admits what all of them can hold.
    per_engine = serve_cfg.max_running_requests + serve_cfg.max_queued_requests
    return {**settings, "engine": "vllm", "versions": list(versions),
            "ongoing_limit": per_engine * serve_cfg.max_replicas * len(versions)}


def require_ray_serve_llm():
    """Ray Serve LLM's deployment builder; ValueError saying what to install when vLLM is missing (checked before
    anything starts: Ray Serve LLM's configs import without vLLM, its deployments do not)."""
    try:
        from ray.serve.llm import build_llm_deployment
    except ImportError as err:
        raise ValueError(f"serve.engine=vllm needs Ray Serve LLM and vLLM, which are not installed here ({err}): "
                         f"{VLLM_EXTRA}; or serve with serve.engine=native") from None
    return build_llm_deployment


def build_vllm_app(serve_cfg: ServeConfig, *, model: str):
    """The Serve application: an engine deployment per version (Ray Serve LLM's builder) and the ingress."""
    build_llm_deployment = require_ray_serve_llm()
    configs = llm_configs(serve_cfg, model=model)
    engines = {str(version): build_llm_deployment(config) for version, config in configs.items()}
    settings = ingress_settings(serve_cfg, model=model, versions=list(configs))
    return vllm_ingress_deployment(serve_cfg, settings=settings).bind(engines, settings=settings)


def vllm_ingress_deployment(serve_cfg: ServeConfig, *, settings: dict):
    """The ingress's deployment. It holds no model, so its replicas take no GPU (vLLM's engines size theirs from
    tensor_parallel_size)."""
    return ingress_deployment(serve_cfg, VllmIngress, family="llm", settings=settings, num_gpus=0)


# ------------------------------------------------------------------------------------------------ the ingress

vllm_http = FastAPI(title="Slipway (vLLM)", docs_url=None, redoc_url=None)
vllm_http.exception_handler(HTTPException)(unknown_route)


def routes_with_engines(routes: Routes, versions: list[int]) -> Routes:
    """`routes` if every version it names has an engine; else ValueError saying how to start one."""
    missing = [version for version in (routes.production, routes.canary) if version is not None
               and version not in versions]
    if missing:
        raise ValueError(f"the registry now names v{missing[0]}, which has no vLLM engine in this application "
                         f"(engines: {versions}); run stage=serve again to start one")
    return routes


def _sse(item) -> str:
    """One item of an LLMServer stream as SSE text: Ray Serve LLM yields lists of "data: ..." strings (its
    stream batching), single strings, or response objects."""
    if isinstance(item, list):
        return "".join(_sse(part) for part in item)
    if isinstance(item, str):
        return item
    return f"data: {item.model_dump_json()}\n\n"


def _engine_error(item):
    """The RequestError of an LLMServer's ErrorResponse (first of a batch), or None."""
    first = item[0] if isinstance(item, list) and item else item
    error = getattr(first, "error", None)
    if error is None or not hasattr(error, "message"):
        return None
    code = int(getattr(error, "code", 500) or 500)
    return api.RequestError(code, error.message, getattr(error, "param", None),
                            type=getattr(error, "type", None) or "invalid_request_error")


@serve.ingress(vllm_http)
class VllmIngress(Ingress):
    """The ingress of serve.engine=vllm: the engines are Ray Serve LLM deployments, one per version."""

    async def __init__(self, engines: dict, *, settings: dict):
        self.engines = {int(version): handle for version, handle in engines.items()}
        super().__init__(settings=settings)
        self.routes = routes_with_engines(self.routes, settings["versions"])
        self._start_tasks()

    async def _accept_routes(self, routes: Routes) -> Routes:
        return routes_with_engines(routes, self.settings["versions"])

    async def _probe_canary(self, version: int) -> None:
        await self.engines[version].check_health.remote()

    @vllm_http.get("/v1/models")
    async def list_models(self, request: Request):
        return await self._models(request)

    @vllm_http.get("/healthz")
    async def health(self) -> dict:
        return self._health()

    @vllm_http.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, COMPLETIONS.path, lambda *args: self._forward(COMPLETIONS, *args))

    @vllm_http.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, CHAT.path, lambda *args: self._forward(CHAT, *args))

    async def _forward(self, route: LLMRoute, payload: dict, version: int, canary: bool, served: dict):
        """Check the body as the native engine would, then hand it to the version's engine as it came."""
        route.parse(payload, served=self.model, max_tokens_limit=self.settings["max_tokens_limit"])
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        request_type, method = ((CompletionRequest, "completions") if route is COMPLETIONS
                                else (ChatCompletionRequest, "chat"))
        try:
            body = request_type.model_validate(payload)
        except pydantic.ValidationError as err:  # what our parser let through and vLLM's request model does not
            problem = err.errors()[0]
            field = ".".join(map(str, problem["loc"])) or None
            raise api.RequestError(400, f"{field}: {problem['msg']}", field) from None

        async def attempt(target: int, on_canary: bool):
            chunks = getattr(self.engines[target].options(stream=True), method).remote(body, None)
            return target, chunks, await chunks.__anext__()

        answered, chunks, first = await self._with_production_fallback(attempt, version, canary)
        served["version"] = answered
        error = _engine_error(first)
        if error is not None:
            chunks.cancel()
            raise error
        headers = {"x-model-version": str(answered)}
        if not payload.get("stream"):
            chunks.cancel()
            return AsciiJSONResponse(first.model_dump(mode="json"), headers=headers)
        return StreamingResponse(self._events(first, chunks), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    @staticmethod
    async def _events(first, chunks):
        """The SSE body: the engine's events as they come (a client that goes away cancels the generation),
        ending with [DONE] as OpenAI's do; a failure after the 200 is told as a last error event, as the native
        engine's streams do (serve/router.py)."""
        finished = False
        try:
            text = _sse(first)
            yield text
            async for item in chunks:
                text = _sse(item)
                yield text
            finished = True
        except Exception:
            logger.exception("a streamed vLLM completion failed after it started")
            yield api.stream_error_event(api.RequestError(500, "generation failed after the stream started; the "
                                                               "text so far is incomplete", type="server_error"))
            return
        finally:
            if not finished:
                chunks.cancel()
        if not text.rstrip().endswith("data: [DONE]"):
            yield "data: [DONE]\n\n"
