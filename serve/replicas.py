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
`sample_request` that the production version accepts, how to show its answer (`describe_sample`), and what
of its traffic is watched for drift: `reference_profile` builds a version's reference from the held-out split
at registration, and the replica counts live requests on the same bins (serve/monitoring.py).
"""

import asyncio
import importlib
import logging
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ray import serve
from ray.serve import metrics

from serve import api
from serve.export import LoadedModel, load_export
from serve.monitoring import LiveProfile, ProfileMetrics, read_reference
from serve.profiles import Profile, ProfileError
from serve.registry import Registry
from trainers.families import get_family

logger = logging.getLogger(__name__)

VERSIONS_PER_REPLICA = 3  # production, canary, and the version a swap is moving away from


def replica_class(family: str) -> type:
    """The serving replica a model family's spec names ("module:Class" under serve/, see trainers/families/)."""
    path = get_family(family).serving_replica
    module, _, name = path.partition(":")
    if not module.startswith("serve.") or not name.isidentifier():
        raise ValueError(f"model family {family}: serving_replica={path!r} must name a class in serve/ as module:Class")
    return getattr(importlib.import_module(module), name)


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
        self._publishing: asyncio.Task | None = None  # the live profiles' publisher, from the first load on

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
        if self._publishing is None:
            self._publishing = asyncio.get_running_loop().create_task(self._publish_profiles())
        return loaded

    def _live_profile(self, export: LoadedModel) -> LiveProfile | None:
        """What the version's traffic is counted into, on its reference profile's bins (None: it has none)."""
        try:
            reference = read_reference(export.directory)
        except ProfileError:  # watching must never keep a version from serving
            logger.exception("%s's reference profile cannot be read: its traffic is served but not watched",
                             export.directory)
            return None
        if reference is None:
            logger.warning("%s has no reference profile (registered before profiles were written): its traffic is "
                           "served but not watched for drift", export.directory)
            return None
        return LiveProfile(reference, window_s=self.settings["monitor"]["drift_window_s"])

    async def _publish_profiles(self) -> None:
        """Every serve.monitor.publish_interval_s, each loaded version's live profile as Prometheus metrics
        (serve/monitoring.py), tagged with the arm this deployment serves."""
        metrics = ProfileMetrics()
        while True:
            await asyncio.sleep(self.settings["monitor"]["publish_interval_s"])
            for version, loaded in list(self.loaded.items()):
                if loaded.live is None:
                    continue
                tags = {"model": self.settings["model"], "version": str(version), "arm": self.settings["role"]}
                try:
                    await asyncio.to_thread(metrics.publish, loaded.live, tags=tags,
                                            bin_counters=self.settings["monitor"]["bin_counters"])
                except Exception:  # watching must never take serving down
                    logger.exception("publishing %s v%d's live profile failed", self.settings["model"], version)

    async def current(self, version: int | None = None):
        """The loaded `version` (the ingress calls in-process with it), or else the version Serve's handle tagged
        this call with (multiplexed_model_id: calls to the canary's deployment)."""
        return await self.get_model(serve.get_multiplexed_model_id() if version is None else str(version))

    async def warm(self, version: int | None = None) -> int:
        """Load the version and check that it computes finite outputs. The ingress calls it before production
        switches to a version, and every serve.refresh_s on the canary while there is one."""
        loaded = await self.current(version)
        await asyncio.to_thread(self._check, loaded)
        return loaded.version

    @staticmethod
    def ongoing_limit(serve_cfg) -> int:
        """Model requests one replica takes at once: those it works on (serve.max_ongoing_requests) and as many
        waiting (serve.max_queued_requests); the ingress refuses more with a 503 (serve/ingress.py)."""
        return serve_cfg.max_ongoing_requests + serve_cfg.max_queued_requests

    def check_health(self) -> None:
        """Serve restarts a replica whose loaded versions stop producing finite outputs."""
        for loaded in list(self.loaded.values()):
            self._check(loaded)


# --------------------------------------------------------------------------------------------------- LLM

class LLMReplica(_VersionedReplica):
    """Completions and chat: serve/completion.py reads a request into jobs, and each loaded version's batching
    engine (serve/engine.py) generates them together with every other request that version is running. This
    class adds versions, the engine's bounded queue as a 503, cancellation and metrics."""

    ROUTES = ("/v1/completions", "/v1/chat/completions")
    QUALITY_METRIC = "feedback_score"  # what the rollout judge compares (serve/rollout.py): clients' scores

    def __init__(self, settings: dict):
        super().__init__(settings)
        # On a GPU one thread steps the engines of every version this replica holds (during a swap the two
        # versions' steps take turns); on the CPU they step on the event loop (serve/engine.py: AsyncEngine).
        cuda = replica_device().type == "cuda"
        self.engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine") if cuda else None
        self.engine_metrics = EngineMetrics()

    @staticmethod
    def ongoing_limit(serve_cfg) -> int:
        """Model requests one replica takes at once: all its engine can run plus the engine's queue, where they
        wait in order (a request of several prompts is refused there when they do not fit)."""
        return serve_cfg.max_running_requests + serve_cfg.max_queued_requests

    @staticmethod
    def sample_request(serve_cfg, *, model: str, fetch_export) -> tuple[str, dict]:
        """A request to show the endpoint working (the serve stage prints it and its answer)."""
        return "/v1/completions", {"model": model, "prompt": serve_cfg.sample_prompt, "max_tokens": 32,
                                   "temperature": 0}

    @staticmethod
    def describe_sample(body: dict, answer: dict, *, url: str, model: str) -> str:
        return (f"{body['prompt']!r} -> {answer['choices'][0]['text']!r}\n  any OpenAI-compatible client works too: "
                f"base_url={url}/v1, model={model!r}")

    # Token ids profiled by bucket: the most frequent of the held-out split's, each its own bin, then all others.
    TOKEN_BUCKETS = 50
    # stage=optimize times decode steps of this many sequences at once (one, and a batch the engine runs)
    PROBE_BATCH_SIZES = (1, 8)
    PROBE_PROMPT = 16  # prompt tokens each probed sequence starts from

    @staticmethod
    def forward_probe(model, rows: dict, *, batch_size: int):
        """One decode step of `batch_size` sequences per call through the KV cache (model.forward, the layers the
        engine's slotted step also runs; serve/optimize.py times it); returns the tokens it generated. The
        sequences start from held-out rows' first tokens, and go back to their prompts when the cache is full,
        so every call is a decode step at a realistic length."""
        from trainers.llm import build_kv_cache

        tokens = rows["tokens"][:, :LLMReplica.PROBE_PROMPT].repeat(batch_size, 1)[:batch_size].to(
            model.tok_embeddings.weight.device)
        cache = build_kv_cache(model, batch_size=batch_size, max_len=min(model.cfg.max_seq_len, 128))
        state = {"next": model(tokens, cache=cache)[:, -1:].argmax(-1)}

        def step() -> int:
            if cache.length >= cache.max_len:
                cache.length = tokens.shape[1]
            state["next"] = model(state["next"], cache=cache)[:, -1:].argmax(-1)
            return batch_size
        return step

    @staticmethod
    def reference_profile(export_dir: Path, batches) -> Profile:
        """A version's reference (serve/evaluate.py: profile_on_run_data): what its clients' prompts should look
        like, from the held-out rows. Fine-tuning rows hold prompts (each conversation's tokens before its first
        trained one): their lengths and token ids. Text rows are windows of a corpus: their token ids, and no
        prompt length to compare live prompts with."""
        from datasets.chat import prompts_of

        token_ids, prompt_lengths = [], []
        for batch in batches:
            tokens = batch["tokens"].numpy()
            if "loss_mask" in batch:
                prompts = prompts_of(tokens, batch["loss_mask"].numpy(), batch["document_ids"].numpy())
                token_ids.extend(prompts)
                prompt_lengths.extend(len(prompt) for prompt in prompts)
            else:
                token_ids.append(tokens.ravel())
        if not token_ids:
            raise ValueError("the held-out split has no rows to profile")
        numeric = {"prompt_tokens": np.asarray(prompt_lengths)} if prompt_lengths else {}
        return Profile.reference(numeric=numeric, categorical={"token_id": np.concatenate(token_ids)},
                                 top_k=LLMReplica.TOKEN_BUCKETS)

    def _build(self, version: int):
        from serve.completion import load_llm
        from serve.engine import AsyncEngine, Engine, EngineConfig

        export = _fetch_and_load(self.settings["registry"], self.settings["model"], version)
        llm = load_llm(export, version=version)
        llm.live = self._live_profile(export)
        config = EngineConfig(max_running=self.settings["max_running_requests"],
                              max_batched_tokens=self.settings["max_batched_tokens"],
                              max_waiting=self.settings["max_queued_requests"])
        engine = Engine(llm.model, llm.tokenizer, stop_token_ids=llm.stop_token_ids, config=config)
        tags = {"model": self.settings["model"], "version": str(version)}
        llm.engine = AsyncEngine(engine, executor=self.engine_thread,
                                 on_step=lambda report, stats: self.engine_metrics.record(report, stats, tags=tags))
        return llm

    @serve.multiplexed(max_num_models_per_replica=VERSIONS_PER_REPLICA)
    async def get_model(self, model_id: str):
        return await self._load(model_id)

    async def complete(self, request: dict, version: int | None = None) -> dict:
        """A whole answer: {"choices", "usage", "version"}, or an error answer (a prompt the model cannot take: 400;
        a full queue: 503)."""
        from serve.completion import join_choices, prepare

        llm = await self.current(version)
        jobs = prepare(llm, request)
        if isinstance(jobs, dict):
            return jobs
        _count_prompts(llm, jobs)
        chunks = await self._generate(llm, jobs)
        if isinstance(chunks, dict):
            return chunks
        return {**join_choices([chunk async for chunk in chunks]), "version": llm.version}

    async def complete_stream(self, request: dict, version: int | None = None):
        """First an answer saying whether the request was accepted (so the router can still send a 400 or 503),
        then one dict per chunk of text (serve/completion.py: ChoiceChunks)."""
        from serve.completion import prepare

        llm = await self.current(version)
        jobs = prepare(llm, request)
        if not isinstance(jobs, dict):
            _count_prompts(llm, jobs)
        chunks = jobs if isinstance(jobs, dict) else await self._generate(llm, jobs)
        if isinstance(chunks, dict):
            yield chunks
            return
        yield {"accepted": True, "version": llm.version}
        async for chunk in chunks:
            yield chunk

    async def _generate(self, llm, jobs):
        """The jobs queued on the version's engine, and their chunks as dicts as they come; or the 503 answer of a
        full queue. Ray Serve cancels a request whose client disconnects: the CancelledError reaches the engine's
        stream, which cancels its sequences, so their slots free up at the next step."""
        from serve.completion import ChoiceChunks
        from serve.engine import EngineFull

        try:
            stream = await llm.engine.generate([(job.index, job.prompt_ids, job.params) for job in jobs])
        except EngineFull as err:
            return api.overloaded_dict(f"{err} (serve.max_queued_requests)", retry_after_s=api.RETRY_AFTER_S)
        choices = {job.index: ChoiceChunks(llm, job) for job in jobs}

        async def dicts():
            async for index, chunk in stream:
                yield choices[index].to_dict(chunk)

        return dicts()

    @staticmethod
    def _check(llm) -> None:
        with torch.no_grad():
            logits = llm.model(torch.zeros(1, 1, dtype=torch.long, device=replica_device()))
        if not torch.isfinite(logits).all():
            raise RuntimeError(f"version {llm.version} produced non-finite logits")


def _count_prompts(llm, jobs) -> None:
    """A request's prompts into the version's live profile (its lengths and token ids)."""
    if llm.live is not None:
        prompts = [job.prompt_ids for job in jobs]
        llm.live.add({"prompt_tokens": np.asarray([len(ids) for ids in prompts]),
                      "token_id": np.concatenate([np.asarray(ids, dtype=np.int64) for ids in prompts])})


TOKEN_LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


class EngineMetrics:
    """What an operator watches on an LLM server, per model and version (cluster/grafana/ charts them): time to
    first token, inter-token latency, tokens generated, the engine's queue, running batch and KV-cache use."""

    def __init__(self):
        tags = ("model", "version")
        # Tokens actually computed: with requests' completion_tokens it shows whether generation stops when the
        # client that asked for it has gone away.
        self.generated_tokens = metrics.Counter(
            "slipway_generated_tokens", description="Completion tokens generated, including those of requests "
            "whose client went away", tag_keys=tags)
        self.time_to_first_token = metrics.Histogram(
            "slipway_time_to_first_token_ms", description="From a sequence's arrival at the engine to its first "
            "token", boundaries=TOKEN_LATENCY_BOUNDARIES_MS, tag_keys=tags)
        self.inter_token = metrics.Histogram(
            "slipway_inter_token_latency_ms", description="Between two tokens of one sequence",
            boundaries=TOKEN_LATENCY_BOUNDARIES_MS, tag_keys=tags)
        self.step_tokens = metrics.Histogram(
            "slipway_engine_step_tokens", description="Tokens in one engine step (decode tokens + prefill chunks)",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], tag_keys=tags)
        self.waiting = metrics.Gauge("slipway_engine_waiting_requests", description="Sequences queued for a KV-cache "
                                     "slot", tag_keys=tags)
        self.running = metrics.Gauge("slipway_engine_running_requests", description="Sequences in the running batch",
                                     tag_keys=tags)
        self.kv_cache_usage = metrics.Gauge("slipway_engine_kv_cache_usage", description="Fraction of the KV "
                                            "cache's preallocated positions holding a running sequence's tokens",
                                            tag_keys=tags)

    def record(self, report, stats: dict, *, tags: dict) -> None:
        if report.sampled:
            self.generated_tokens.inc(report.sampled, tags=tags)
        for seconds in report.time_to_first_token_s:
            self.time_to_first_token.observe(seconds * 1000, tags=tags)
        for seconds in report.inter_token_s:
            self.inter_token.observe(seconds * 1000, tags=tags)
        if report.tokens:
            self.step_tokens.observe(report.tokens, tags=tags)
        self.waiting.set(stats["waiting"], tags=tags)
        self.running.set(stats["running"], tags=tags)
        self.kv_cache_usage.set(stats["kv_cache_usage"], tags=tags)


# ------------------------------------------------------------------------------------------------ ranker

@dataclass
class LoadedRanker:
    export: LoadedModel
    encoder: object
    version: int
    live: LiveProfile | None = None


@dataclass
class _ScoreItem:
    """One request as it waits for its batch: raw features, encoded there with the rest of the batch."""

    ranker: LoadedRanker
    context: dict
    candidates: list[dict]


class RankerReplica(_VersionedReplica):
    ROUTES = ("/v1/rank",)
    QUALITY_METRIC = "auc"  # what the rollout judge compares (serve/rollout.py): the AUC of clicks fed back

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

    @staticmethod
    def reference_profile(export_dir: Path, batches) -> Profile:
        """A version's reference (serve/evaluate.py: profile_on_run_data): the held-out rows' model inputs, as
        `_encode_and_forward` counts live ones, the version's scores of them, and their calibration."""
        from serve.features import FeatureEncoder

        export = load_export(export_dir)
        encoder = FeatureEncoder.from_file(export.asset("feature_spec"))
        predict = get_family(export.family).predict
        dense, sparse, scores, labels = [], [], [], []
        for batch in batches:
            outputs = predict(export.model, batch)
            dense.append(batch["dense"].numpy())
            sparse.append(batch["sparse"].numpy())
            scores.append(outputs["prob"].numpy())
            labels.append(outputs["label"].numpy())
        if not scores:
            raise ValueError("the held-out split has no rows to profile")
        numeric, categorical = encoder.input_columns(np.concatenate(dense), np.concatenate(sparse))
        return Profile.reference(numeric=numeric, categorical=categorical, scores=np.concatenate(scores),
                                 labels=np.concatenate(labels))

    def __init__(self, settings: dict):
        super().__init__(settings)
        self.score.set_max_batch_size(settings["max_batch_size"])
        self.score.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
        self.ranking = 0  # requests between rank() and their scores
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
                            version=version, live=self._live_profile(export))

    @serve.multiplexed(max_num_models_per_replica=VERSIONS_PER_REPLICA)
    async def get_model(self, model_id: str) -> LoadedRanker:
        return await self._load(model_id)

    async def rank(self, context: dict, candidates: list[dict], version: int | None = None) -> dict:
        from serve.features import FeatureError

        ranker = await self.current(version)
        # A request alone is not held for company: the batch waits serve.batch_wait_timeout_s for more requests
        # only while others are being ranked here (at concurrency 1 the wait was a third of the overhead).
        self.ranking += 1
        self.score.set_batch_wait_timeout_s(self.settings["batch_wait_timeout_s"] if self.ranking > 1 else 0.0)
        try:
            # The features are encoded in the batch, not here: a batch encodes all its requests' rows in a few
            # numpy passes, where each request on its own would pay Python's work per value again.
            scores = await self.score(_ScoreItem(ranker=ranker, context=context, candidates=candidates))
        finally:
            self.ranking -= 1
        if isinstance(scores, FeatureError):
            return _error(str(scores), scores.field)
        return {"scores": scores.tolist(), "version": ranker.version}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def score(self, items: list[_ScoreItem]) -> list:
        """Per request, the click probabilities of its candidates, or the FeatureError that refuses it (the other
        requests of the batch are scored all the same). One encoding and one forward pass per version."""
        self.batch_requests.observe(len(items), tags={"model": self.settings["model"]})
        results: list = [None] * len(items)
        for version in {item.ranker.version for item in items}:
            members = [i for i, item in enumerate(items) if item.ranker.version == version]
            # One thread hop for both steps: the event loop stays free to take the next batch's requests.
            scored, rows = await asyncio.to_thread(self._encode_and_forward, [items[i] for i in members])
            if rows:
                self.batch_rows.observe(rows, tags={"model": self.settings["model"], "version": str(version)})
            for slot, outcome in zip(members, scored, strict=True):
                results[slot] = outcome
        return results

    @staticmethod
    def _encode_and_forward(items: list[_ScoreItem]) -> tuple[list, int]:
        """Each item's scores or FeatureError (items of one version), and the rows the forward pass took."""
        from serve.features import FeatureError

        ranker = items[0].ranker
        encoded = ranker.encoder.encode_requests([(item.context, item.candidates) for item in items],
                                                 field_prefix="candidates")
        valid = [inputs for inputs in encoded if not isinstance(inputs, FeatureError)]
        if not valid:
            return encoded, 0
        inputs = np.concatenate([dense for dense, _ in valid]), np.concatenate([sparse for _, sparse in valid])
        probs = RankerReplica._forward(ranker, dense=inputs[0], sparse=inputs[1])
        if ranker.live is not None:
            numeric, categorical = ranker.encoder.input_columns(*inputs)
            ranker.live.add({**numeric, **categorical}, scores=probs)
        scores = iter(np.split(probs, np.cumsum([len(dense) for dense, _ in valid])[:-1]))
        return [inputs if isinstance(inputs, FeatureError) else next(scores) for inputs in encoded], len(probs)

    PROBE_BATCH_SIZES = (64, 512)  # stage=optimize times forward passes of this many candidates

    @staticmethod
    def forward_probe(model, rows: dict, *, batch_size: int):
        """One forward pass over `batch_size` held-out rows per call, as `_forward` scores candidates
        (serve/optimize.py times it); returns the rows scored."""
        device = replica_device()
        dense = rows["dense"].float().repeat(-(-batch_size // len(rows["dense"])), 1)[:batch_size].to(device)
        sparse = rows["sparse"].repeat(-(-batch_size // len(rows["sparse"])), 1)[:batch_size].to(device)

        def forward() -> int:
            torch.sigmoid(model(dense, sparse).float())
            return batch_size
        return forward

    @staticmethod
    def _forward(ranker: LoadedRanker, *, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        model = ranker.export.model
        device = replica_device()  # a quantized child may hold only buffers, so not read off its parameters
        with torch.no_grad():
            scores = model(torch.from_numpy(dense).to(device), torch.from_numpy(sparse).to(device))
            return torch.sigmoid(scores.float()).cpu().numpy()

    @staticmethod
    def _check(ranker: LoadedRanker) -> None:
        tables = len(ranker.encoder.categorical_names)
        device = replica_device()
        dense = torch.zeros(1, len(ranker.encoder.dense_names), device=device)
        with torch.no_grad():
            logits = ranker.export.model(dense, torch.zeros(1, tables, dtype=torch.long, device=device))
        if not torch.isfinite(logits).all():
            raise RuntimeError(f"version {ranker.version} produced non-finite scores")
