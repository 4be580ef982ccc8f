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

class LLMReplica(_VersionedReplica):
    """Completions and chat (serve/completion.py does the work of a request, in a thread; this class adds
    versions, cancellation and metrics)."""

    ROUTES = ("/v1/completions", "/v1/chat/completions")

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

    def _build(self, version: int):
        from serve.completion import load_llm

        export = _fetch_and_load(self.settings["registry"], self.settings["model"], version)
        return load_llm(export, version=version)

    @serve.multiplexed(max_num_models_per_replica=VERSIONS_PER_REPLICA)
    async def get_model(self, model_id: str):
        return await self._load(model_id)

    async def complete(self, request: dict) -> dict:
        """A whole answer: {"choices", "usage", "version"}, or an error answer for a prompt the model cannot take."""
        from serve.completion import join_choices, prepare

        llm = await self.current()
        jobs = prepare(llm, request)
        if isinstance(jobs, dict):
            return jobs
        return {**join_choices([chunk async for chunk in self._chunks(llm, jobs)]), "version": llm.version}

    async def complete_stream(self, request: dict):
        """First an answer saying whether the request was accepted (so the router can still send a 400), then
        one dict per chunk of text (serve/completion.py: stream_choices)."""
        from serve.completion import prepare

        llm = await self.current()
        jobs = prepare(llm, request)
        if isinstance(jobs, dict):
            yield jobs
            return
        yield {"accepted": True, "version": llm.version}
        async for chunk in self._chunks(llm, jobs):
            yield chunk

    async def _chunks(self, llm, jobs):
        """stream_choices' chunks, each computed in a thread (the event loop stays free for other requests).

        Ray Serve cancels a request whose client disconnects: the CancelledError arrives at an await here, so
        generation stops after the token in flight instead of running on to max_tokens for nobody."""
        from serve.completion import stream_choices

        chunks = stream_choices(llm, jobs)
        loop, step, counted = asyncio.get_running_loop(), None, {}
        tags = {"model": self.settings["model"], "version": str(llm.version)}
        try:
            while True:
                step = loop.run_in_executor(None, next, chunks, None)
                # shield: on cancellation the step still finishes in its thread, and closes the generator below
                chunk = await asyncio.shield(step)
                if chunk is None:
                    return
                new = chunk["completion_tokens"] - counted.get(chunk["index"], 0)
                if new > 0:  # a chunk may only release text held back earlier
                    self.generated_tokens.inc(new, tags=tags)
                    counted[chunk["index"]] = chunk["completion_tokens"]
                yield chunk
        finally:
            if step is not None and not step.done():  # a generator cannot be closed while it runs
                step.add_done_callback(lambda _: chunks.close())
            else:
                chunks.close()

    @staticmethod
    def _check(llm) -> None:
        with torch.no_grad():
            logits = llm.model(torch.zeros(1, 1, dtype=torch.long, device=replica_device()))
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
