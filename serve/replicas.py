"""The model deployments: replicas that hold registry versions and answer the router.

Each replica loads versions on demand through Ray Serve's model multiplexing: the router tags every call with
the version it chose (`multiplexed_model_id`), Serve prefers replicas that already hold it, and a replica keeps
the few most recently used versions (production, canary and the one being swapped out). A version change is
therefore never a redeploy: in-flight requests finish on the model object they started with, new ones go to
the new version, and the router warms a version on a replica before sending traffic to it.

The canary runs in a deployment of its own (settings["role"] is "production" or "canary", see serve/deploy.py):
a canary that fails its health check gets its own replicas restarted, never those serving production.

Request errors that only a loaded model can detect (a prompt longer than its context, an unknown feature) come
back as `{"error": {"message", "param"}}` answers rather than exceptions, so the router can turn them into 4xx.

A model family's spec (trainers/families/) names its replica class here. Besides serving, the class says what
the serve stage needs to know of the family: its ROUTES (the router answers others with 404), a
`sample_request` that the production version accepts, and how to show its answer (`describe_sample`).
"""

import asyncio
import logging
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ray import serve
from ray.serve import metrics

from serve.export import LoadedModel, load_export
from serve.registry import Registry

logger = logging.getLogger(__name__)

VERSIONS_PER_REPLICA = 3  # production, canary, and the version a swap is moving away from


def replica_cache_dir() -> Path:
    """Where a replica keeps downloaded versions of a remote registry: local to its node."""
    return Path(tempfile.gettempdir()) / "slipway-registry-cache"


def replica_device() -> torch.device:
    """The GPU Ray gave this replica (serve.num_gpus > 0), else the CPU: Ray hides the GPUs of a replica that
    asked for none, so CUDA is available here only when one was assigned."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fetch_and_load(registry_uri: str, model: str, version: int) -> LoadedModel:
    started = time.perf_counter()
    directory = Registry(registry_uri).fetch(model, version, cache_dir=replica_cache_dir())  # checksums verified
    loaded = load_export(directory, device=replica_device())
    logger.info("loaded %s v%d in %.2f s", model, version, time.perf_counter() - started)
    return loaded


def _error(message: str, param: str | None) -> dict:
    return {"error": {"message": message, "param": param}}


class _VersionedReplica:
    """What both families share: settings, loading versions by id, and a health check that runs them."""

    def __init__(self, settings: dict):
        self.settings = settings
        # Weak: Serve's multiplexer owns the loaded versions and evicts the least recently used; a strong
        # reference here would keep every version this replica ever served in memory (and in check_health).
        self.loaded: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()

    async def reconfigure(self, config: dict) -> None:
        """Load the version this deployment's alias (its role) routes to before this replica takes traffic.
        Serve awaits this before a replica counts as running (build_app passes a user_config for that).
        Multiplexed routing sends a version's requests only to replicas that hold it, and to others only when
        those are full, so a replica the autoscaler adds would otherwise stay idle."""
        alias = self.settings["role"]
        aliases = await asyncio.to_thread(Registry(self.settings["registry"]).aliases, self.settings["model"])
        if alias not in aliases:
            return
        try:
            await self.get_model(str(aliases[alias]["version"]))
        except Exception:  # e.g. a version failing its checksums: the router keeps serving the one it has
            logger.exception("could not load the %s version; this replica serves the others", alias)

    async def _load(self, model_id: str):
        version = int(model_id)
        loaded = await asyncio.to_thread(self._build, version)
        self.loaded[version] = loaded
        return loaded

    async def current(self):
        return await self.get_model(serve.get_multiplexed_model_id())

    async def warm(self) -> int:
        """Load the version this call is tagged with and check that it computes finite outputs. The router calls
        it before routing traffic to a version, and every serve.refresh_s on the canary while there is one."""
        loaded = await self.current()
        await asyncio.to_thread(self._check, loaded)
        return loaded.version

    def check_health(self) -> None:
        """Serve restarts a replica whose loaded versions stop producing finite outputs."""
        for loaded in list(self.loaded.values()):
            self._check(loaded)


# --------------------------------------------------------------------------------------------------- LLM

@dataclass
class LoadedLLM:
    export: LoadedModel
    tokenizer: object
    version: int


class LLMReplica(_VersionedReplica):
    ROUTES = ("/v1/completions",)

    def __init__(self, settings: dict):
        super().__init__(settings)
        # Tokens actually computed: with requests' completion_tokens it shows whether generation stops when the
        # client that asked for it has gone away.
        self.generated_tokens = metrics.Counter(
            "slipway_generated_tokens", description="Completion tokens generated, including those of requests "
            "whose client went away", tag_keys=("model", "version"))

    @staticmethod
    def sample_request(serve_cfg, *, model: str, fetch_export) -> tuple[str, dict]:
        """A request to show the endpoint working (the serve stage prints it and its answer)."""
        return "/v1/completions", {"model": model, "prompt": serve_cfg.sample_prompt, "max_tokens": 32,
                                   "temperature": 0}

    @staticmethod
    def describe_sample(body: dict, answer: dict, *, url: str, model: str) -> str:
        return (f"{body['prompt']!r} -> {answer['choices'][0]['text']!r}\n  any OpenAI-compatible client works too: "
                f"base_url={url}/v1, model={model!r}")

    def _build(self, version: int) -> LoadedLLM:
        from datasets.tokenizer import load_tokenizer

        export = _fetch_and_load(self.settings["registry"], self.settings["model"], version)
        return LoadedLLM(export=export, tokenizer=load_tokenizer(export.asset("tokenizer")), version=version)

    @serve.multiplexed(max_num_models_per_replica=VERSIONS_PER_REPLICA)
    async def get_model(self, model_id: str) -> LoadedLLM:
        return await self._load(model_id)

    def _prepare(self, llm: LoadedLLM, request: dict):
        """Token ids and sampling parameters, or an error answer for a prompt the model cannot take."""
        from serve.generation import SamplingParams

        prompt_ids = llm.tokenizer.encode(request["prompt"]).ids
        context = llm.export.model.cfg.max_seq_len
        if len(prompt_ids) >= context:
            return _error(f"the prompt is {len(prompt_ids)} tokens; this model's context is {context} tokens, "
                          f"so the prompt must be shorter", "prompt")
        if len(prompt_ids) + request["max_tokens"] > context:
            return _error(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({request['max_tokens']}) exceeds the "
                          f"model's context of {context} tokens; lower max_tokens to at most "
                          f"{context - len(prompt_ids)}", "max_tokens")
        params = SamplingParams(max_tokens=request["max_tokens"], temperature=request["temperature"],
                                top_p=request["top_p"], stop=request["stop"], seed=request["seed"])
        return prompt_ids, params

    async def complete(self, request: dict) -> dict:
        llm = await self.current()
        prepared = self._prepare(llm, request)
        if isinstance(prepared, dict):
            return prepared
        pieces = [chunk async for chunk in self._chunks(llm, *prepared)]
        last = pieces[-1]
        return {"text": "".join(chunk.text for chunk in pieces), "finish_reason": last.finish_reason,
                "prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                "version": llm.version}

    async def complete_stream(self, request: dict):
        """First an answer saying whether the request was accepted (so the router can still send a 400), then
        one dict per chunk of text."""
        llm = await self.current()
        prepared = self._prepare(llm, request)
        if isinstance(prepared, dict):
            yield prepared
            return
        yield {"accepted": True, "version": llm.version}
        async for chunk in self._chunks(llm, *prepared):
            yield {"text": chunk.text, "finish_reason": chunk.finish_reason, "prompt_tokens": chunk.prompt_tokens,
                   "completion_tokens": chunk.completion_tokens}

    async def _chunks(self, llm: LoadedLLM, prompt_ids: list[int], params):
        """generate_stream's chunks, each computed in a thread (the event loop stays free for other requests).

        Ray Serve cancels a request whose client disconnects: the CancelledError arrives at an await here, so
        generation stops after the token in flight instead of running on to max_tokens for nobody."""
        from serve.generation import generate_stream

        chunks = generate_stream(llm.export.model, llm.tokenizer, prompt_ids, params)
        loop, step, counted = asyncio.get_running_loop(), None, 0
        tags = {"model": self.settings["model"], "version": str(llm.version)}
        try:
            while True:
                step = loop.run_in_executor(None, next, chunks, None)
                # shield: on cancellation the step still finishes in its thread, and closes the generator below
                chunk = await asyncio.shield(step)
                if chunk is None:
                    return
                if chunk.completion_tokens > counted:  # a chunk may only release text held back earlier
                    self.generated_tokens.inc(chunk.completion_tokens - counted, tags=tags)
                    counted = chunk.completion_tokens
                yield chunk
        finally:
            if step is not None and not step.done():  # a generator cannot be closed while it runs
                step.add_done_callback(lambda _: chunks.close())
            else:
                chunks.close()

    @staticmethod
    def _check(llm: LoadedLLM) -> None:
        with torch.no_grad():
            logits = llm.export.model(torch.zeros(1, 1, dtype=torch.long, device=replica_device()))
        if not torch.isfinite(logits).all():
            raise RuntimeError(f"version {llm.version} produced non-finite logits")


# ------------------------------------------------------------------------------------------------ ranker

@dataclass
class LoadedRanker:
    export: LoadedModel
    encoder: object
    version: int


@dataclass
class _ScoreItem:
    ranker: LoadedRanker
    dense: np.ndarray
    sparse: np.ndarray


class RankerReplica(_VersionedReplica):
    ROUTES = ("/v1/rank",)

    @staticmethod
    def sample_request(serve_cfg, *, model: str, fetch_export) -> tuple[str, dict]:
        """Two candidates with categories the feature spec accepts; `fetch_export()` gives the production
        version's export directory (fetched only here: an LLM's sample does not need it)."""
        from serve.features import FeatureEncoder

        encoder = FeatureEncoder.from_file(fetch_export() / "feature_spec.json")
        first, second = encoder.categorical_names[:2]
        context = {encoder.dense_names[0]: 3, first: encoder.sample_category(0)}
        candidates = [{second: encoder.sample_category(1, rank)} for rank in range(2)]
        return "/v1/rank", {"model": model, "context": context, "candidates": candidates}

    @staticmethod
    def describe_sample(body: dict, answer: dict, *, url: str, model: str) -> str:
        return f"scores {answer['scores']}"

    def __init__(self, settings: dict):
        super().__init__(settings)
        self.score.set_max_batch_size(settings["max_batch_size"])
        self.score.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
        self.batch_rows = metrics.Histogram(
            "slipway_ranker_batch_rows", description="Candidates scored by one forward pass (dynamic batching)",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], tag_keys=("model", "version"))
        self.batch_requests = metrics.Histogram(
            "slipway_ranker_batch_requests", description="Requests combined into one batch by @serve.batch",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("model",))

    def _build(self, version: int) -> LoadedRanker:
        from serve.features import FeatureEncoder

        export = _fetch_and_load(self.settings["registry"], self.settings["model"], version)
        return LoadedRanker(export=export, encoder=FeatureEncoder.from_file(export.asset("feature_spec")),
                            version=version)

    @serve.multiplexed(max_num_models_per_replica=VERSIONS_PER_REPLICA)
    async def get_model(self, model_id: str) -> LoadedRanker:
        return await self._load(model_id)

    async def rank(self, context: dict, candidates: list[dict]) -> dict:
        from serve.features import FeatureError

        ranker = await self.current()
        try:
            dense, sparse = ranker.encoder.encode([{**context, **c} for c in candidates], field_prefix="candidates")
        except FeatureError as err:
            return _error(str(err), err.field)
        scores = await self.score(_ScoreItem(ranker=ranker, dense=dense, sparse=sparse))
        return {"scores": scores.tolist(), "version": ranker.version}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def score(self, items: list[_ScoreItem]) -> list[np.ndarray]:
        """Click probabilities for the candidates of many requests, one forward pass per version."""
        self.batch_requests.observe(len(items), tags={"model": self.settings["model"]})
        results: list[np.ndarray | None] = [None] * len(items)
        for version in {item.ranker.version for item in items}:
            members = [i for i, item in enumerate(items) if item.ranker.version == version]
            probs = await asyncio.to_thread(self._forward, [items[i] for i in members])
            self.batch_rows.observe(len(probs), tags={"model": self.settings["model"], "version": str(version)})
            bounds = np.cumsum([0] + [len(items[i].dense) for i in members])
            for slot, (start, stop) in zip(members, zip(bounds[:-1], bounds[1:], strict=True), strict=True):
                results[slot] = probs[start:stop]
        return results

    @staticmethod
    def _forward(items: list[_ScoreItem]) -> np.ndarray:
        model = items[0].ranker.export.model
        device = next(model.parameters()).device
        dense = torch.from_numpy(np.concatenate([item.dense for item in items])).to(device)
        sparse = torch.from_numpy(np.concatenate([item.sparse for item in items])).to(device)
        with torch.no_grad():
            return torch.sigmoid(model(dense, sparse).float()).cpu().numpy()

    @staticmethod
    def _check(ranker: LoadedRanker) -> None:
        tables = len(ranker.encoder.categorical_names)
        device = replica_device()
        dense = torch.zeros(1, len(ranker.encoder.dense_names), device=device)
        with torch.no_grad():
            logits = ranker.export.model(dense, torch.zeros(1, tables, dtype=torch.long, device=device))
        if not torch.isfinite(logits).all():
            raise RuntimeError(f"version {ranker.version} produced non-finite scores")
