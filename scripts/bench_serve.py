"""What serving costs: Ray Serve's HTTP path against the same models called in-process, on a local Ray.

    python scripts/bench_serve.py                                  # random llm_tiny + dlrm_small, 5-6 min
    python scripts/bench_serve.py --seconds 2 --concurrency 1 4    # a smoke run
    python scripts/bench_serve.py --registry /path/to/registry --llm-model llm_tiny --ranker-model ranker_dlrm

By default nothing needs training: the models are built with random weights in the shapes of
conf/model/llm_tiny.yaml (vocab 4096 from a BPE tokenizer trained on ~400 KB of the Python standard library,
seq_len 128) and conf/model/dlrm_small.yaml (26 tables sized by conf/data/synthetic_clicks.yaml, id_plus_one
encoding), exported, registered in a temporary registry and promoted to production. With --registry the
production versions of the named models are benchmarked instead (either or both).

Each app is deployed by serve/deploy.py (the production deployment is the HTTP ingress) on an embedded Ray, one
at a time at route "/". The load tests pin one replica (min = max = 1, --num-cpus CPUs) so the levels compare like
with like:
  0. the floor (--parts floor): a bare Serve deployment that reads the body and answers a constant, p50 at
     concurrency 1: what any Serve application costs on this machine.
  1. closed-loop load at each level: N client threads, each with its own keep-alive HTTP connection, sending
     the next request when the last is answered; after --warmup-s, requests/s, p50 and p99 latency and errors
     over --seconds. LLM (--concurrency, default 1 4 16 64): POST /v1/completions (fixed prompt, --max-tokens,
     temperature 0), with generated tokens/s from the answers' usage; then the same requests streamed for as
     long, for the time to the first token and the mean gap between a request's tokens (p50 and p99 over
     requests); with --parts baseline the same levels again with serve.max_running_requests=1, one sequence
     at a time as before continuous batching; with --parts vllm (CUDA GPUs and the vllm group installed) the
     same levels again with serve.engine=vllm, on the same export. Ranker
     (--ranker-concurrency, default 1 16 64): POST /v1/rank with --candidates candidates.
  2. the same work in this process, without Ray (generate(); encode + forward), with as many torch threads
     as Ray gives a replica, measured right before the load levels: p50, and the serve overhead = p50 at
     concurrency 1 minus in-process p50, against the floor; GET /healthz (proxy and ingress, no model) shows how
     much of that the HTTP front end takes. The ranker's overhead includes @serve.batch's wait.
  3. dynamic batching: the ranker at --batch-concurrency (64) with serve.max_batch_size=1 against the default
     (64); requests/s of each and their ratio.
  4. autoscaling: the ranker with min 1, max 2 replicas, target_ongoing_requests 1, upscale_delay_s 1,
     0.5 CPU each; a load step to --autoscale-concurrency; seconds from the step to a second replica asked
     for (STARTING), RUNNING, the first request answered after that and the first one the new replica
     answered (from its Serve log file), and how many of the requests in --autoscale-hold-s it answered.

On a 2-core machine the client threads, the proxy and the replicas all share the same two cores,
so absolute figures are low and move between runs: quote them as ratios taken from one run (serve vs
in-process, batched vs unbatched, one concurrency vs another), not as capacity.
"""

import argparse
import http.client
import json
import logging
import math
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LLM_NAME, RANKER_NAME = "bench_llm", "bench_ranker"
PROMPT = "import os\n\n\ndef read_config(path):\n    "
SEED = 0
PARTS = ("floor", "llm", "baseline", "vllm", "ranker", "batching", "autoscaling")
DEFAULT_PARTS = tuple(part for part in PARTS if part != "vllm")  # vLLM needs CUDA GPUs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="client threads per LLM load level")
    parser.add_argument("--ranker-concurrency", type=int, nargs="+", default=[1, 16, 64],
                        help="client threads per ranker load level")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per load level")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds before each level")
    parser.add_argument("--max-tokens", type=int, default=16, help="LLM completion length")
    parser.add_argument("--candidates", type=int, default=64, help="candidates per /v1/rank request")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica in the load tests")
    parser.add_argument("--batch-concurrency", type=int, default=64, help="client threads of the batching test")
    parser.add_argument("--autoscale-concurrency", type=int, default=8, help="client threads of the load step")
    parser.add_argument("--autoscale-hold-s", type=float, default=5.0,
                        help="seconds the load step goes on once the second replica is RUNNING")
    parser.add_argument("--autoscale-timeout", type=float, default=60.0,
                        help="seconds to wait for the second replica before giving up")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS),
                        help="what to measure (default: all but vllm)")
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="GPUs per LLM replica (the native engine's; vLLM's engines take what their "
                             "tensor_parallel_size needs)")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="--parts vllm: the dtype vLLM computes in")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPUs the embedded Ray gets")
    parser.add_argument("--registry", help="benchmark models already promoted in this registry URI")
    parser.add_argument("--llm-model", help="with --registry: the LLM's registry name")
    parser.add_argument("--ranker-model", help="with --registry: the ranker's registry name")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "slipway-bench-serve",
                        help="output folder; each invocation writes a new bench-<time>/ inside it")
    args = parser.parse_args(argv)
    if min(args.concurrency + args.ranker_concurrency) < 1 or args.batch_concurrency < 1 or \
            args.autoscale_concurrency < 1:
        parser.error("--concurrency, --ranker-concurrency, --batch-concurrency and --autoscale-concurrency must "
                     "be at least 1")
    if "vllm" in args.parts:
        from serve.vllm_app import require_ray_serve_llm

        try:
            require_ray_serve_llm()
        except ValueError as err:
            parser.error(f"--parts vllm: {err}")
    if args.seconds <= 0 or args.warmup_s < 0:
        parser.error("--seconds must be positive and --warmup-s not negative")
    if args.registry and not (args.llm_model or args.ranker_model):
        parser.error("--registry needs --llm-model, --ranker-model or both")
    if not args.registry and (args.llm_model or args.ranker_model):
        parser.error("--llm-model and --ranker-model name models of --registry; give --registry too")
    return args


# ------------------------------------------------------------------------------ random exports to serve

def _preset(name: str, schema):
    """A conf/model/ preset merged onto its schema, as Hydra composes it."""
    from omegaconf import OmegaConf

    preset = OmegaConf.load(REPO_ROOT / "conf" / "model" / f"{name}.yaml")
    preset.pop("defaults", None)
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), preset))


def _write_export(out_dir: Path, model_config: dict) -> None:
    """The random weights build_model_from_config gives, in the family's export layout, and model_config.json."""
    import torch

    from serve.export import DEFAULT_SHARD_BYTES, MODEL_CONFIG_FILE, build_model_from_config, family_of

    torch.manual_seed(SEED)
    state = build_model_from_config(model_config).state_dict()
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_config, indent=2) + "\n")
    # Copies: safetensors refuses tensors that share memory, and export.py writes each parameter on its own too.
    family_of(model_config).export_layout.write({name: t.detach().clone() for name, t in state.items()}, out_dir,
                                                model_config=model_config, dtype=torch.float32,
                                                shard_bytes=DEFAULT_SHARD_BYTES)


def build_llm_export(out_dir: Path) -> Path:
    """llm_tiny with random weights and a tokenizer trained on ~400 KB of the standard library's source."""
    from omegaconf import OmegaConf

    from conf.schema import LLMConfig, TextDataConfig
    from datasets.sources import iter_documents
    from datasets.tokenizer import train_tokenizer

    experiment = OmegaConf.load(REPO_ROOT / "conf" / "exp" / "llm_tiny.yaml")
    vocab_size, seq_len = int(experiment.data.vocab_size), int(experiment.data.seq_len)
    out_dir.mkdir(parents=True)
    texts = (doc.text for doc in iter_documents(TextDataConfig(source="stdlib", max_chars=400_000)))
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_export(out_dir, {"family": "llm", "model": _preset("llm_tiny", LLMConfig),
                            "vocab_size": tokenizer.get_vocab_size(), "seq_len": seq_len,
                            "tokenizer": "tokenizer.json"})
    return out_dir


def build_ranker_export(out_dir: Path) -> Path:
    """dlrm_small with random weights; feature_spec.json as synthetic click logs without hashing write it."""
    from omegaconf import OmegaConf

    from conf.schema import RankerConfig
    from datasets.click_encoding import CATEGORY_ID_PLUS_ONE, NUM_DENSE
    from datasets.clicklog import _shared_spec

    cardinalities = list(OmegaConf.load(REPO_ROOT / "conf" / "data" / "synthetic_clicks.yaml").cardinalities)
    table_sizes = [card + 1 for card in cardinalities]  # one row per category plus the missing bucket
    out_dir.mkdir(parents=True)
    spec = {**_shared_spec(), "categories": "bucket = category id + 1 (no hashing)", "table_sizes": table_sizes,
            "category_encoding": {"kind": CATEGORY_ID_PLUS_ONE}}
    (out_dir / "feature_spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    _write_export(out_dir, {"family": "ranker", "model": _preset("dlrm_small", RankerConfig),
                            "num_dense": NUM_DENSE, "table_sizes": table_sizes,
                            "feature_spec": "feature_spec.json"})
    return out_dir


def register_random_models(registry_uri: str, *, scratch: Path, families: set[str]) -> dict[str, str]:
    """Family -> registry name of freshly built, registered and promoted random models."""
    from serve.registry import Registry

    registry = Registry(registry_uri)
    names = {}
    for family, name, build in (("llm", LLM_NAME, build_llm_export), ("ranker", RANKER_NAME, build_ranker_export)):
        if family not in families:
            continue
        started = time.perf_counter()
        record = registry.register(name, build(scratch / name), metadata={"family": family, "bench": "random"})
        registry.move_alias(name, "production", record["version"], reason="bench_serve.py: random weights")
        print(f"built and promoted {name} v{record['version']} ({family}) in {time.perf_counter() - started:.1f} s",
              flush=True)
        names[family] = name
    return names


def promoted_models(registry_uri: str, *, llm: str | None, ranker: str | None) -> dict[str, str]:
    """Family -> registry name of the given models, each checked to have a production version of that family."""
    from serve.registry import Registry

    registry = Registry(registry_uri)
    names = {}
    for family, name in (("llm", llm), ("ranker", ranker)):
        if name is None:
            continue
        version = registry.resolve(name, "production")
        if version is None:
            raise ValueError(f"--{family}-model={name} has no production version in {registry.uri}")
        found = registry.version(name, version).get("family")
        if found != family:
            raise ValueError(f"--{family}-model={name}: production v{version} is a {found!r} model, not {family!r}")
        names[family] = name
    return names


# --------------------------------------------------------------------------------------- request bodies

def llm_request(model: str, *, max_tokens: int) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}


def streamed(body: dict) -> dict:
    """The same request streamed, so the client sees when each token arrives, with the usage at the end."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


def ranker_request(model: str, *, spec_path: Path, candidates: int) -> dict:
    """A shared context (the first half of the features) and `candidates` rows of the rest, from a fixed seed."""
    import numpy as np

    spec = json.loads(spec_path.read_text())
    rng = np.random.default_rng(SEED)
    dense, categorical = spec["dense_features"], spec["categorical_features"]
    encoding = spec["category_encoding"]
    # id_plus_one takes ids below table_size - 1; a hashed spec takes any id (as hex strings for Criteo's data).
    limits = ([size - 1 for size in spec["table_sizes"]] if encoding["kind"] == "id_plus_one"
              else [1000] * len(categorical))
    limit = dict(zip(categorical, limits, strict=True))
    as_value = (lambda n: f"{n:08x}") if encoding.get("input") == "hex" else int

    def row(dense_names, categorical_names):
        return {**{name: round(float(rng.exponential(5.0)), 2) for name in dense_names},
                **{name: as_value(int(rng.integers(0, limit[name]))) for name in categorical_names}}

    half_dense, half_cat = len(dense) // 2, len(categorical) // 2
    context = row(dense[:half_dense], categorical[:half_cat])
    rows = [row(dense[half_dense:], categorical[half_cat:]) for _ in range(candidates)]
    return {"model": model, "context": context, "candidates": rows}


# ------------------------------------------------------------------------------------------ in-process

def _p50_ms(call, *, seconds: float, warmup: int = 3) -> tuple[float, int]:
    for _ in range(warmup):
        call()
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3, len(times)


def in_process_p50(registry_uri: str, *, model: str, family: str, body: dict, seconds: float) -> dict:
    """The replica's work for `body` done here: the same fetch, load, tokenizer or encoder, and model call."""
    import numpy as np
    import torch

    from serve.export import load_export
    from serve.registry import Registry
    from serve.replicas import replica_cache_dir

    registry = Registry(registry_uri)
    version = registry.resolve(model, "production")
    loaded = load_export(registry.fetch(model, version, cache_dir=replica_cache_dir()))
    if family == "llm":
        from datasets.tokenizer import load_tokenizer
        from serve.generation import SamplingParams, generate

        tokenizer = load_tokenizer(loaded.asset("tokenizer"))
        prompt_ids = tokenizer.encode(body["prompt"]).ids
        params = SamplingParams(max_tokens=body["max_tokens"], temperature=body["temperature"])
        tokens = generate(loaded.model, tokenizer, prompt_ids, params).completion_tokens
        p50, runs = _p50_ms(lambda: generate(loaded.model, tokenizer, prompt_ids, params), seconds=seconds)
        return {"p50_ms": p50, "runs": runs, "prompt_tokens": len(prompt_ids), "completion_tokens": tokens}
    from serve.features import FeatureEncoder

    encoder = FeatureEncoder.from_file(loaded.asset("feature_spec"))
    rows = [{**body["context"], **candidate} for candidate in body["candidates"]]

    def encode():
        return encoder.encode(rows, field_prefix="candidates")

    def forward(dense, sparse):
        with torch.no_grad():
            return torch.sigmoid(loaded.model(torch.from_numpy(dense), torch.from_numpy(sparse)).float()).numpy()

    assert np.isfinite(forward(*encode())).all(), "the ranker's weights gave non-finite scores"
    p50, runs = _p50_ms(lambda: forward(*encode()), seconds=seconds)
    # The replica encodes each request on its own and batches only the forward pass: the split says how much
    # of a request dynamic batching can amortize.
    encode_p50, _ = _p50_ms(encode, seconds=seconds / 2)
    inputs = encode()
    forward_p50, _ = _p50_ms(lambda: forward(*inputs), seconds=seconds / 2)
    return {"p50_ms": p50, "runs": runs, "candidates": len(rows), "encode_p50_ms": encode_p50,
            "forward_p50_ms": forward_p50}


# ----------------------------------------------------------------------------------------- HTTP load

@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    first_error: str | None = None
    # Streamed LLM requests only: completion tokens per second over all clients, time to the first token and the
    # mean gap between a request's tokens (p50 and p99 over requests)
    tokens_per_s: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None


class _NoDelayConnection(http.client.HTTPConnection):
    """http.client writes the headers and the body separately; with Nagle's algorithm on, the body may wait for
    the server's delayed ACK of the headers (up to ~40 ms on some stacks), which is the client's cost, not Serve's."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class ClosedLoop:
    """`concurrency` threads, each sending `body` to `path` over its own keep-alive connection, back to back.

    Every answer is kept as (sent, answered, ok, first token, last token, completion tokens) in perf_counter
    seconds, so any window can be cut out later; the token fields are set for streamed (SSE) answers only.
    """

    port: int
    path: str
    body: bytes | None  # None: GET
    concurrency: int
    count_tokens: bool = False  # read completion_tokens from each (non-streamed) answer's usage
    samples: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.concurrency)]

    def start(self) -> "ClosedLoop":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _run(self) -> None:
        headers = {"content-type": "application/json"}
        connection = None
        while not self._stop.is_set():
            sent, ok = time.perf_counter(), False
            try:
                if connection is None:
                    connection = _NoDelayConnection("127.0.0.1", self.port, timeout=120)
                connection.request("GET" if self.body is None else "POST", self.path, body=self.body,
                                   headers=headers)
                response = connection.getresponse()
                ok = response.status == 200
                events = ok and response.getheader("content-type", "").startswith("text/event-stream")
                first, last, tokens = _read_events(response) if events else (None, None, 0)
                answer = b"" if events else response.read()
                if ok and not events and self.count_tokens:
                    tokens = json.loads(answer)["usage"]["completion_tokens"]
                if not ok:
                    self.errors.append(f"HTTP {response.status}: {answer[:300]!r}")
            except (OSError, http.client.HTTPException, ValueError) as error:
                self.errors.append(repr(error))
                connection.close() if connection else None
                connection, ok, first, last, tokens = None, False, None, None, 0
            # list.append is atomic under the GIL
            self.samples.append((sent, time.perf_counter(), ok, first, last, tokens))
            if not ok:
                time.sleep(0.05)  # a refusing server must not turn the client into a busy loop

    def window(self, start: float, end: float) -> LoadResult:
        """Figures for the requests answered between `start` and `end`."""
        answered = [s for s in list(self.samples) if start <= s[1] <= end]
        good = [s for s in answered if s[2]]
        latencies = sorted((s[1] - s[0]) * 1e3 for s in good)
        seconds = end - start
        result = LoadResult(concurrency=self.concurrency, seconds=seconds, requests=len(latencies),
                            errors=len(answered) - len(good), rps=len(latencies) / seconds,
                            p50_ms=_percentile(latencies, 50), p99_ms=_percentile(latencies, 99),
                            first_error=self.errors[0] if self.errors else None)
        if self.count_tokens:
            result.tokens_per_s = sum(s[5] for s in good) / seconds
        events = [s for s in good if s[3] is not None]
        if events:
            ttft = sorted((first - sent) * 1e3 for sent, _, _, first, _, _ in events)
            gaps = sorted((last - first) * 1e3 / (tokens - 1) for _, _, _, first, last, tokens in events if tokens > 1)
            result.ttft_p50_ms, result.ttft_p99_ms = _percentile(ttft, 50), _percentile(ttft, 99)
            result.itl_p50_ms, result.itl_p99_ms = _percentile(gaps, 50), _percentile(gaps, 99)
        return result


def _read_events(response) -> tuple[float | None, float | None, int]:
    """Read an SSE completion to its end: when the first and the last text arrived, and the completion tokens
    its usage chunk counts (include_usage)."""
    first = last = None
    tokens = 0
    for line in iter(response.readline, b""):
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[len(b"data: "):])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        if any(choice.get("text") for choice in event.get("choices", [])):
            last = time.perf_counter()
            first = first or last
    return first, last, tokens


def _percentile(sorted_values: list[float], percent: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, math.ceil(percent / 100 * len(sorted_values)) - 1)
    return sorted_values[max(index, 0)]


def closed_loop(port: int, path: str, body: dict | None, *, concurrency: int, seconds: float,
                warmup_s: float, count_tokens: bool = False) -> LoadResult:
    loop = ClosedLoop(port, path, None if body is None else json.dumps(body).encode(), concurrency,
                      count_tokens=count_tokens).start()
    started = time.perf_counter()
    time.sleep(warmup_s + seconds)
    result = loop.window(started + warmup_s, started + warmup_s + seconds)
    loop.stop()
    return result


# ---------------------------------------------------------------------------------------- Ray Serve

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_serve(*, cores: int) -> int:
    """An embedded Ray with `cores` CPUs and Serve's proxy on a free local port; returns the port."""
    import ray
    from ray import serve

    from cluster.connection import RAY_ENV_DEFAULTS

    port = _free_port()
    # Serve's components log to files as usual, but not to stderr: Ray would forward every replica's access
    # log line to this terminal, a few hundred a second under load. Workers inherit the variable.
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    for name, value in RAY_ENV_DEFAULTS.items():  # as launch.py's connect() sets them
        os.environ.setdefault(name, value)
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def deploy_app(serve_cfg, *, model: str) -> str:
    """Deploy `model` alone at "/" (deleting any other app first) and wait for /healthz; returns the URL."""
    from ray import serve

    from serve.deploy import deploy, wait_until_serving

    for app in serve.status().applications:
        serve.delete(app)
    started = time.perf_counter()
    url = deploy(serve_cfg, model=model)
    wait_until_serving(url, timeout_s=120)
    print(f"  deployed {model} in {time.perf_counter() - started:.1f} s", flush=True)
    return url


def replica_states(app: str, deployment: str) -> dict[str, int]:
    """Replicas of one deployment by state name (STARTING, RUNNING, ...), from the controller."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    states = status.deployments[deployment].replica_states
    return {str(getattr(state, "value", state)): count for state, count in states.items()}


def pinned_config(registry_uri: str, *, port: int, num_cpus: float, **overrides):
    """One replica, always: autoscaling would change the replica count in the middle of a load level."""
    from conf.schema import ServeConfig

    return ServeConfig(registry=registry_uri, port=port, num_cpus=num_cpus, min_replicas=1, max_replicas=1,
                       **overrides)


def load_levels(port: int, path: str, body: dict, *, levels: list[int], args, label: str,
                llm: bool = False) -> list[LoadResult]:
    """Each level's closed loop. For an LLM, requests/s, latency and tokens/s are of plain requests (as clients
    that want the whole answer send them); a second loop of the same requests streamed measures the time to the
    first token and between tokens, since only a stream shows when each token leaves the server."""
    results = []
    for concurrency in levels:
        result = closed_loop(port, path, body, concurrency=concurrency, seconds=args.seconds, warmup_s=args.warmup_s,
                             count_tokens=llm)
        if llm:
            timing = closed_loop(port, path, streamed(body), concurrency=concurrency, seconds=args.seconds,
                                 warmup_s=args.warmup_s)
            result.ttft_p50_ms, result.ttft_p99_ms = timing.ttft_p50_ms, timing.ttft_p99_ms
            result.itl_p50_ms, result.itl_p99_ms = timing.itl_p50_ms, timing.itl_p99_ms
            result.errors += timing.errors
            result.first_error = result.first_error or timing.first_error
        tokens = "" if result.tokens_per_s is None else (
            f"  {result.tokens_per_s:7.1f} tok/s  TTFT p50 {_number(result.ttft_p50_ms)} ms  inter-token p50 "
            f"{_number(result.itl_p50_ms)} ms")
        print(f"  {label} concurrency {concurrency:>3}: {result.rps:8.1f} req/s  p50 {result.p50_ms:8.1f} ms  "
              f"p99 {result.p99_ms:8.1f} ms{tokens}  errors {result.errors}", flush=True)
        if result.first_error:
            print(f"    first error: {result.first_error}", flush=True)
        results.append(result)
    return results


def _replica_logs(app: str, deployment: str) -> dict[str, Path]:
    """Replica id -> its Serve log file. Serve keeps no per-replica request counts that a driver can read, but
    every replica writes one access-log line per request it answers ("POST /v1/rank 200 ...": the production
    replicas are the HTTP ingress) to a file of its own."""
    from ray.serve._private.logging_utils import get_serve_logs_dir

    prefix = f"replica_{app}_{deployment}_"
    return {path.stem.removeprefix(prefix): path for path in Path(get_serve_logs_dir()).glob(f"{prefix}*.log")}


def _answers_logged(path: Path, *, route: str) -> list[float]:
    """Wall-clock times of the requests to `route` that a replica's log file shows it answered with 200."""
    from datetime import datetime

    times = []
    for line in path.read_text(errors="replace").splitlines():
        if f"POST {route} 200" in line:
            stamp = " ".join(line.split()[1:3])  # "INFO 2026-11-28 05:54:04,076 ..."
            times.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def _wait_for_second_replica(app: str, deployment: str, *, timeout_s: float) -> tuple[float | None, float | None]:
    """perf_counter times at which a second replica was first asked for (any state) and first RUNNING."""
    started, asked = time.perf_counter(), None
    while time.perf_counter() - started < timeout_s:
        states = replica_states(app, deployment)
        if asked is None and sum(states.values()) >= 2:
            asked = time.perf_counter()
        if states.get("RUNNING", 0) >= 2:
            return asked, time.perf_counter()
        time.sleep(0.1)
    return asked, None


def measure_autoscaling(registry_uri: str, *, port: int, model: str, body: dict, args) -> dict:
    """Seconds from a load step to a second replica (asked for, RUNNING, answering), and its share of the load."""
    from conf.schema import ServeConfig

    cfg = ServeConfig(registry=registry_uri, port=port, num_cpus=0.5, min_replicas=1, max_replicas=2,
                      target_ongoing_requests=1, upscale_delay_s=1.0, downscale_delay_s=60.0)
    deploy_app(cfg, model=model)
    closed_loop(port, "/v1/rank", body, concurrency=1, seconds=0.5, warmup_s=0.5)  # the version loaded
    app, deployment = model, "ranker_replica"
    first_replicas = set(_replica_logs(app, deployment))
    loop = ClosedLoop(port, "/v1/rank", json.dumps(body).encode(), args.autoscale_concurrency).start()
    step, step_wall = time.perf_counter(), time.time()
    asked, scaled = _wait_for_second_replica(app, deployment, timeout_s=args.autoscale_timeout)
    first_answer = None
    while scaled is not None and first_answer is None and time.perf_counter() - scaled < 30:
        first_answer = min((sample[1] for sample in list(loop.samples) if sample[2] and sample[1] >= scaled),
                           default=None)
        time.sleep(0.05)
    if scaled is not None:
        time.sleep(max(0.0, scaled + args.autoscale_hold_s - time.perf_counter()))
    held_end = time.perf_counter()
    one_replica = loop.window(step, asked or held_end)
    after = loop.window(scaled, held_end) if scaled is not None else None
    loop.stop()
    new_logs = [path for rid, path in _replica_logs(app, deployment).items() if rid not in first_replicas]
    new_answers = sorted(t for path in new_logs for t in _answers_logged(path, route="/v1/rank"))

    def since_step(moment):
        return None if moment is None else moment - step

    return {"concurrency": args.autoscale_concurrency, "hold_s": args.autoscale_hold_s,
            "to_second_replica_starting_s": since_step(asked), "to_second_replica_s": since_step(scaled),
            "to_first_answer_after_s": since_step(first_answer),
            "to_first_answer_by_new_replica_s": new_answers[0] - step_wall if new_answers else None,
            "answered_by_new_replica": len(new_answers), "answered_after_scale_up": after.requests if after else 0,
            "rps_one_replica": one_replica.rps, "rps_two_replicas": after.rps if after else None,
            "errors": one_replica.errors + (after.errors if after else 0)}


# -------------------------------------------------------------------------------------------- report

def _print_table(results: dict) -> None:
    print("\n" + "=" * 118)
    print(f"{'model':<11} {'concurrency':>11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'tok/s':>8} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'errors':>7}")
    for family, rows in results["load"].items():
        for row in rows:
            print(f"{family:<11} {row['concurrency']:>11} {row['rps']:>8.1f} {row['p50_ms']:>8.1f} "
                  f"{row['p99_ms']:>8.1f} {_number(row['tokens_per_s']):>8} {_number(row['ttft_p50_ms']):>9} "
                  f"{_number(row['ttft_p99_ms']):>9} {_number(row['itl_p50_ms']):>8} "
                  f"{_number(row['itl_p99_ms']):>8} {row['errors']:>7}")
    _print_ratios(results)
    floor = results.get("floor")
    for family, figures in results["in_process"].items():
        print(f"{family} in-process p50: {_describe_in_process(figures)}")
        if "overhead_ms" in figures:
            versus = f"; x{figures['overhead_ms'] / floor['p50_ms']:.2f} the bare Serve floor" if floor else ""
            print(f"{family} serve overhead (p50 at concurrency {figures['served_concurrency']} minus in-process "
                  f"p50): {figures['overhead_ms']:.2f} ms{versus}; GET /healthz p50 {figures['healthz_p50_ms']:.2f} ms")
    if floor:
        print(f"bare Serve floor (a deployment answering a constant, concurrency 1): p50 {floor['p50_ms']:.2f} ms")
    if batching := results.get("batching"):
        print(f"ranker dynamic batching at concurrency {batching['concurrency']}: max_batch_size="
              f"{batching['default_max_batch_size']} {batching['batched_rps']:.1f} req/s vs max_batch_size=1 "
              f"{batching['unbatched_rps']:.1f} req/s: x{batching['ratio']:.2f}")
    if scaling := results.get("autoscaling"):
        print(f"autoscaling 1 -> 2 replicas on a step to concurrency {scaling['concurrency']}: second replica "
              f"asked for after {_seconds(scaling['to_second_replica_starting_s'])}, RUNNING after "
              f"{_seconds(scaling['to_second_replica_s'])}, first answer after that at "
              f"{_seconds(scaling['to_first_answer_after_s'])}, first answer by the new replica at "
              f"{_seconds(scaling['to_first_answer_by_new_replica_s'])} ({scaling['answered_by_new_replica']} of "
              f"{scaling['answered_after_scale_up']} answers in the {scaling['hold_s']:g} s after RUNNING)")
    print("=" * 118)


def _print_ratios(results: dict) -> None:
    """Generated tokens/s at each concurrency against concurrency 1, with batching and with one slot."""
    for label in ("llm", "llm 1 slot", "llm vllm"):
        rows = {row["concurrency"]: row for row in results["load"].get(label, [])}
        if 1 in rows and rows[1]["tokens_per_s"]:
            gains = ", ".join(f"{c}: x{row['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}"
                              for c, row in sorted(rows.items()) if c != 1 and row["tokens_per_s"])
            print(f"{label} tokens/s against concurrency 1: {gains}")


def _describe_in_process(figures: dict) -> str:
    if "completion_tokens" in figures:  # greedy decoding of random weights may stop early at EOS: say how long
        detail = f"{figures['prompt_tokens']} prompt + {figures['completion_tokens']} completion tokens"
    else:
        detail = (f"{figures['candidates']} candidates: encode {figures['encode_p50_ms']:.2f} ms + forward "
                  f"{figures['forward_p50_ms']:.2f} ms")
    return f"{figures['p50_ms']:.2f} ms ({detail}; {figures['runs']} runs)"


def _number(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _seconds(value: float | None) -> str:
    return "never (timed out)" if value is None else f"{value:.1f} s"


def bench_family(family: str, *, model: str, body: dict, port: int, args, levels: list[int], label: str,
                 **overrides) -> dict:
    """In-process p50, then the load levels and GET /healthz against the deployed app, back to back so that
    the machine's other load is about the same for all of them."""
    path = "/v1/completions" if family == "llm" else "/v1/rank"
    gpus = args.num_gpus if family == "llm" else 0.0
    deploy_app(pinned_config(args.registry_uri, port=port, num_cpus=args.num_cpus, num_gpus=gpus, **overrides),
               model=model)
    local = in_process_p50(args.registry_uri, model=model, family=family, body=body, seconds=min(args.seconds, 5.0))
    print(f"  {label} in-process p50: {_describe_in_process(local)}", flush=True)
    print(f"  {label}: closed-loop load on {path} ({args.seconds:g} s per level after {args.warmup_s:g} s "
          f"warmup)", flush=True)
    rows = load_levels(port, path, body, levels=levels, args=args, label=label, llm=family == "llm")
    # GET /healthz goes through the proxy and the ingress but never reaches the model: the share of the overhead
    # that the HTTP front end costs.
    health = closed_loop(port, "/healthz", None, concurrency=1, seconds=min(args.seconds, 3.0), warmup_s=0.5)
    print(f"  {label} GET /healthz (proxy and ingress, no model) concurrency 1: p50 {health.p50_ms:.1f} ms",
          flush=True)
    lowest = min(rows, key=lambda row: row.concurrency)
    local.update(served_concurrency=lowest.concurrency, overhead_ms=lowest.p50_ms - local["p50_ms"],
                 healthz_p50_ms=health.p50_ms)
    print(f"Serve overhead for {label} (p50 at concurrency {lowest.concurrency} minus in-process p50): "
          f"{local['overhead_ms']:.2f} ms", flush=True)
    return {"levels": rows, "in_process": local}


class _Constant:
    """The least a Serve application can do: read the body and answer a constant."""

    async def __call__(self, request) -> dict:
        await request.body()
        return {"ok": True}


def bench_floor(*, port: int, args) -> dict:
    """p50 at concurrency 1 of a bare Serve deployment (proxy -> one replica -> constant) on the same machine:
    the floor under any Serve application's overhead."""
    from ray import serve

    for app in serve.status().applications:
        serve.delete(app)
    deployment = serve.deployment(_Constant).options(name="constant", num_replicas=1,
                                                     ray_actor_options={"num_cpus": args.num_cpus})
    serve.run(deployment.bind(), name="floor", route_prefix="/")
    result = closed_loop(port, "/", {"model": "constant"}, concurrency=1, seconds=min(args.seconds, 5.0),
                         warmup_s=args.warmup_s)
    serve.delete("floor")
    print(f"  bare Serve deployment returning a constant, concurrency 1: p50 {result.p50_ms:.2f} ms, "
          f"p99 {result.p99_ms:.2f} ms", flush=True)
    return asdict(result)


def bench_batching(*, model: str, body: dict, port: int, args, batched: LoadResult | None) -> dict:
    from conf.schema import ServeConfig

    default_size = ServeConfig.max_batch_size
    if batched is None:  # the batching level was not among --concurrency: measure it on the default config
        deploy_app(pinned_config(args.registry_uri, port=port, num_cpus=args.num_cpus), model=model)
        batched = load_levels(port, "/v1/rank", body, levels=[args.batch_concurrency], args=args, label="ranker")[0]
    print(f"ranker: dynamic batching off (max_batch_size=1) at concurrency {args.batch_concurrency}", flush=True)
    deploy_app(pinned_config(args.registry_uri, port=port, num_cpus=args.num_cpus, max_batch_size=1), model=model)
    unbatched = load_levels(port, "/v1/rank", body, levels=[args.batch_concurrency], args=args,
                            label="ranker max_batch_size=1")[0]
    ratio = batched.rps / unbatched.rps if unbatched.rps else math.nan
    print(f"Dynamic batching gain (req/s with max_batch_size={default_size} / with 1): {ratio:.2f}", flush=True)
    return {"concurrency": args.batch_concurrency, "default_max_batch_size": default_size,
            "batched_rps": batched.rps, "unbatched_rps": unbatched.rps, "ratio": ratio,
            "unbatched": asdict(unbatched)}


def bench_ranker_extras(*, model: str, body: dict, port: int, args, levels: list[LoadResult]) -> dict:
    results = {}
    if "batching" in args.parts:
        batched = next((row for row in levels if row.concurrency == args.batch_concurrency), None)
        results["batching"] = bench_batching(model=model, body=body, port=port, args=args, batched=batched)
    if "autoscaling" in args.parts:
        print(f"ranker: autoscaling, load step to concurrency {args.autoscale_concurrency}", flush=True)
        results["autoscaling"] = scaling = measure_autoscaling(args.registry_uri, port=port, model=model,
                                                               body=body, args=args)
        for label, key in (("second replica asked for (STARTING)", "to_second_replica_starting_s"),
                           ("second replica RUNNING", "to_second_replica_s"),
                           ("first request answered after that", "to_first_answer_after_s"),
                           ("first request answered by the new replica", "to_first_answer_by_new_replica_s")):
            print(f"Autoscaling: {label} {_seconds(scaling[key])} after the step", flush=True)
        print(f"Autoscaling: the new replica answered {scaling['answered_by_new_replica']} of the "
              f"{scaling['answered_after_scale_up']} requests answered in the {args.autoscale_hold_s:g} s after it "
              f"was RUNNING; req/s {scaling['rps_one_replica']:.1f} on one replica, "
              f"{_number(scaling['rps_two_replicas'])} on two", flush=True)
    return results


def bench_vllm(*, model: str, body: dict, port: int, args, levels: list[int]) -> list[LoadResult]:
    """The same version and load levels with serve.engine=vllm: vLLM through Ray Serve LLM behind our ingress."""
    print(f"llm with vLLM (serve.engine=vllm, dtype {args.vllm_dtype})", flush=True)
    deploy_app(pinned_config(args.registry_uri, port=port, num_cpus=args.num_cpus, engine="vllm",
                             vllm_engine_kwargs={"dtype": args.vllm_dtype}), model=model)
    return load_levels(port, "/v1/completions", body, levels=levels, args=args, label="llm vllm", llm=True)


def run_benchmarks(names: dict[str, str], bodies: dict[str, dict], *, args) -> dict:
    from ray import serve

    port = start_serve(cores=args.cores)
    results = {"load": {}, "in_process": {}}
    if "floor" in args.parts:
        print("floor: a bare Serve deployment", flush=True)
        results["floor"] = bench_floor(port=port, args=args)
    for family, model in names.items():
        rows = []
        levels = args.concurrency if family == "llm" else args.ranker_concurrency
        if family in args.parts:
            measured = bench_family(family, model=model, body=bodies[family], port=port, args=args, levels=levels,
                                    label=family)
            rows = measured["levels"]
            results["load"][family] = [asdict(row) for row in rows]
            results["in_process"][family] = measured["in_process"]
        if family == "llm" and "baseline" in args.parts:
            # One KV-cache slot: requests decode one at a time, as before continuous batching.
            print("llm without batching (serve.max_running_requests=1)", flush=True)
            measured = bench_family(family, model=model, body=bodies[family], port=port, args=args, levels=levels,
                                    label="llm 1 slot", max_running_requests=1)
            results["load"]["llm 1 slot"] = [asdict(row) for row in measured["levels"]]
        if family == "llm" and "vllm" in args.parts:
            results["load"]["llm vllm"] = [asdict(row) for row in bench_vllm(model=model, body=bodies[family],
                                                                             port=port, args=args, levels=levels)]
        if family == "ranker":
            results.update(bench_ranker_extras(model=model, body=bodies[family], port=port, args=args, levels=rows))
    serve.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # scripts/ is not a package: conf/ and serve/ live at the root
    import ray
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parse_args(argv)
    bench_dir = (args.out / time.strftime("bench-%Y%m%d-%H%M%S")).resolve()
    bench_dir.mkdir(parents=True)
    wall = time.perf_counter()
    args.registry_uri = args.registry or str(bench_dir / "registry")
    names = (promoted_models(args.registry, llm=args.llm_model, ranker=args.ranker_model) if args.registry
             else register_random_models(args.registry_uri, scratch=bench_dir / "exports",
                                         families=_families(args.parts)))
    names = {family: model for family, model in names.items() if family in _families(args.parts)}
    bodies = {family: llm_request(model, max_tokens=args.max_tokens) if family == "llm"
              else ranker_request(model, spec_path=_spec_path(args.registry_uri, model), candidates=args.candidates)
              for family, model in names.items()}
    # A replica's torch runs as many threads as Ray sets OMP_NUM_THREADS to: floor(num_cpus), at least 1.
    torch.set_num_threads(max(1, math.floor(args.num_cpus)))
    load_before = os.getloadavg()[0]  # other work on the machine moves every figure; say how much there was
    try:
        results = run_benchmarks(names, bodies, args=args)
    finally:
        ray.shutdown()
    results["load_average_1min"] = {"start": load_before, "end": os.getloadavg()[0]}
    results["wall_s"] = time.perf_counter() - wall
    results["args"] = {key: str(value) for key, value in vars(args).items()}
    _print_table(results)
    print(f"machine load average (1 min) at start {results['load_average_1min']['start']:.1f}, at end "
          f"{results['load_average_1min']['end']:.1f}, on {os.cpu_count()} cores")
    print(f"total {results['wall_s']:.0f} s; results: {bench_dir / 'results.json'}")
    (bench_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _families(parts: list[str]) -> set[str]:
    families = {"llm"} if {"llm", "baseline", "vllm"} & set(parts) else set()
    return families | ({"ranker"} if {"ranker", "batching", "autoscaling"} & set(parts) else set())


def _spec_path(registry_uri: str, model: str) -> Path:
    from serve.registry import Registry
    from serve.replicas import replica_cache_dir

    registry = Registry(registry_uri)
    directory = registry.fetch(model, registry.resolve(model, "production"), cache_dir=replica_cache_dir())
    return directory / json.loads((directory / "model_config.json").read_text())["feature_spec"]


if __name__ == "__main__":
    sys.exit(main())
