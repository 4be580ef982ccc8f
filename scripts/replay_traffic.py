"""Replay a run's held-out data against its served model, as its clients would send it, to watch it work.

    python scripts/replay_traffic.py --url http://127.0.0.1:8000 --model ranker_dlrm \
        --source outputs/runs/ranker_dlrm-1a2b3c4d --requests 500 --rate 20
    python scripts/replay_traffic.py ... --shift I1=1.5 --skew C3=0.6      # the same, drifted
    python scripts/replay_traffic.py ... --feedback-delay 30               # clicks sent back 30 s later
    python scripts/replay_traffic.py ... --fault 5:latency_ms=40,error_rate=0.05   # v5 slow and failing
    python scripts/replay_traffic.py --url http://127.0.0.1:8000 --model llm_sft \
        --source outputs/runs/llm_sft-5e6f7a8b --requests 100 --feedback-delay 5      # an LLM's prompts

Rows come from the run's prepared split (--split, the held-out one by default; `train` gives rows the
reference profile never saw), sent by `--concurrency` clients at `--rate` requests per second in all (0: as fast
as answers come).
  - A ranker's rows go as raw features, `--candidates` rows per POST /v1/rank. The feature spec is the served
    version's own (the registry's production version unless --version), so the raw values encode back to
    exactly the rows' model inputs (serve/features.py: raw_rows). Their labels are the clicks.
  - A fine-tuned LLM's conversations go as their prompts (the tokens before the first trained one, as token ids)
    to POST /v1/completions, greedy, up to --max-tokens. The label a client would give an answer is taken as its
    word-level F1 against the answer the conversation holds: a score in [0, 1].

Drift, injected into a ranker's rows before they are sent:
  --shift NAME=DELTA   adds DELTA to a dense feature's log1p value (its counts times e**DELTA);
  --skew NAME=SHARE    gives SHARE of the rows a categorical feature's most frequent category.

Delayed labels: with --feedback-delay S, each answer's label (a ranker's clicks: the indices of the candidates
that were clicked; an LLM answer's score) goes to POST /v1/feedback S seconds after the answer came, with the
answer's id, as a client would send it, by as many threads as there are clients; the progress lines say how far
behind its due time the oldest unsent label is, and the summary the worst delay. The script waits for the last of
them before it ends.

Faults (test-only; the endpoint must run with serve.monitor.fault_injection=true): --fault VERSION:latency_ms=MS,
error_rate=SHARE makes that version's requests wait MS longer and fail with a 500 at that rate, from the start of
the replay to its end (POST /v1/faults); it shows that the rollout judge and the alerts catch a bad canary.

SIGTERM or Ctrl-C stops sending; the answers in flight and their feedback are awaited. It prints progress every
5 s, then the requests, errors, candidates scored (or completion tokens), latency percentiles, feedback sent
and the versions that answered; --out FILE writes the same as JSON. The API key, if the endpoint needs one, is read
from the environment variable --api-key-env names, never from the command line.
"""

import argparse
import heapq
import itertools
import json
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

PROGRESS_EVERY_S = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the endpoint, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the registry's model name (serve.model)")
    parser.add_argument("--source", required=True, type=Path, help="the run directory whose prepared rows to send")
    parser.add_argument("--registry", help="the registry (serve.registry); default: <source>/../../registry")
    parser.add_argument("--version", type=int, help="whose feature spec encodes the rows; default: production")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=8, help="rankers: rows per request")
    parser.add_argument("--max-tokens", type=int, default=16, help="LLMs: the longest answer asked for")
    parser.add_argument("--rate", type=float, default=0.0, help="requests per second in all; 0: no pacing")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--shift", action="append", default=[], metavar="NAME=DELTA")
    parser.add_argument("--skew", action="append", default=[], metavar="NAME=SHARE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--feedback-delay", type=float, metavar="SECONDS",
                        help="send each answer's label to /v1/feedback this long after it; default: no feedback")
    parser.add_argument("--fault", metavar="VERSION:latency_ms=MS,error_rate=SHARE",
                        help="test-only: make one version slow and failing while the replay runs")
    parser.add_argument("--api-key-env", help="the environment variable holding the API key")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    for name in ("requests", "candidates", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate < 0:
        parser.error("--rate must be 0 (no pacing) or more")
    if args.feedback_delay is not None and args.feedback_delay < 0:
        parser.error("--feedback-delay must be 0 or more seconds")
    return args


def parse_assignments(items: list[str], *, flag: str) -> dict[str, float]:
    parsed = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            parsed[name] = float(value)
        except ValueError:
            raise SystemExit(f"{flag} {item!r}: expected NAME=NUMBER") from None
    return parsed


# ------------------------------------------------------------------------------------------------ rows

def parse_fault(text: str) -> dict:
    """--fault VERSION:latency_ms=MS,error_rate=SHARE as the body of POST /v1/faults."""
    version, _, settings = text.partition(":")
    if not version.isdigit():
        raise SystemExit(f"--fault {text!r}: expected VERSION:latency_ms=MS,error_rate=SHARE, e.g. 5:error_rate=0.1")
    return {"version": int(version), **parse_assignments([part for part in settings.split(",") if part],
                                                         flag="--fault")}


@dataclass
class Traffic:
    """What to send and what its answers mean, for one model family."""

    path: str  # the route: /v1/rank, /v1/completions
    bodies: list[bytes]
    label: Callable[[int, dict], dict]  # (request index, its answer) -> the label fields of its feedback
    counted: Callable[[dict], int]  # what an answer adds up to: candidates scored, completion tokens
    unit: str
    description: str


def load_run_config(source: Path):
    import yaml

    from trainers.config import config_from_dict

    config_file = source / "config.yaml"
    if not config_file.is_file():
        raise SystemExit(f"--source {source}: no config.yaml; expected a run directory that launch.py printed")
    return config_from_dict(yaml.safe_load(config_file.read_text()))


def load_rows(run_cfg, *, split: str, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense, sparse, label) of the first `rows` rows of the run's prepared split (prepared again if the data
    cache lost it)."""
    from serve.evaluate import run_held_out_batches

    batches = list(run_held_out_batches(run_cfg, rows=rows, trained_on=None, split=split))
    dense = np.concatenate([batch["dense"].numpy() for batch in batches])
    sparse = np.concatenate([batch["sparse"].numpy() for batch in batches])
    label = np.concatenate([batch["label"].numpy() for batch in batches])
    if len(dense) < rows:
        print(f"the {split} split has {len(dense)} rows; they are sent again in turn", flush=True)
        repeats = -(-rows // len(dense))
        dense, sparse = np.tile(dense, (repeats, 1))[:rows], np.tile(sparse, (repeats, 1))[:rows]
        label = np.tile(label, repeats)[:rows]
    return dense, sparse, label


def inject_drift(dense: np.ndarray, sparse: np.ndarray, encoder, *, shifts: dict, skews: dict,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The rows with their drift: shifted dense features, skewed categorical ones (see the module docstring)."""
    dense, sparse = dense.copy(), sparse.copy()
    for name, delta in shifts.items():
        if name not in encoder.dense_names:
            raise SystemExit(f"--shift {name}: not a dense feature of the served version ({encoder.dense_names})")
        column = encoder.dense_names.index(name)
        dense[:, column] = np.maximum(dense[:, column] + delta, 0.0)
    for name, share in skews.items():
        if name not in encoder.categorical_names or not 0 <= share <= 1:
            raise SystemExit(f"--skew {name}={share}: expected a categorical feature of the served version and a "
                             "share in [0, 1]")
        column = encoder.categorical_names.index(name)
        present = sparse[:, column][sparse[:, column] != 0]
        common = np.bincount(present).argmax() if present.size else 1
        sparse[rng.random(len(sparse)) < share, column] = common
    return dense, sparse


def ranker_traffic(args, run_cfg, export_dir: Path, *, shifts: dict, skews: dict) -> Traffic:
    from serve.features import FeatureEncoder

    encoder = FeatureEncoder.from_file(export_dir / "feature_spec.json")
    dense, sparse, label = load_rows(run_cfg, split=args.split, rows=args.requests * args.candidates)
    dense, sparse = inject_drift(dense, sparse, encoder, shifts=shifts, skews=skews,
                                 rng=np.random.default_rng(args.seed))
    rows = encoder.raw_rows(dense, sparse)
    starts = range(0, len(rows), args.candidates)
    bodies = [json.dumps({"model": args.model, "context": {}, "candidates": rows[start : start + args.candidates]})
              .encode() for start in starts]
    clicks = [np.flatnonzero(label[start : start + args.candidates] > 0.5).tolist() for start in starts]
    drift = ", ".join([*(f"{n} +{d:g} (log1p)" for n, d in shifts.items()),
                       *(f"{n} {s:.0%} one category" for n, s in skews.items())]) or "none"
    return Traffic("/v1/rank", bodies, label=lambda index, _: {"clicked": clicks[index]},
                   counted=lambda answer: len(answer["scores"]), unit="candidates scored",
                   description=f"{len(bodies)} requests of {args.candidates} {args.split} rows (drift: {drift})")


def llm_traffic(args, run_cfg, export_dir: Path) -> Traffic:
    from tokenizers import Tokenizer

    from datasets.chat import conversations_of
    from serve.evaluate import run_held_out_batches
    from serve.export import read_model_config

    pairs = []
    for batch in run_held_out_batches(run_cfg, rows=args.requests, trained_on=None, split=args.split):
        if "loss_mask" not in batch:
            raise SystemExit(f"--source {args.source} trained on text windows, which hold no prompts; LLM replay "
                             "needs a fine-tuning run on conversations (data=chat_jsonl)")
        pairs.extend(conversations_of(batch["tokens"].numpy(), batch["loss_mask"].numpy(),
                                      batch["document_ids"].numpy()))
    if not pairs:
        raise SystemExit(f"the {args.split} split of {args.source} holds no conversation with a trained answer")
    pairs = [pairs[index % len(pairs)] for index in range(args.requests)]
    tokenizer = Tokenizer.from_file(str(export_dir / read_model_config(export_dir)["tokenizer"]))
    references = [tokenizer.decode(answer.tolist()) for _, answer in pairs]
    bodies = [json.dumps({"model": args.model, "prompt": prompt.tolist(), "max_tokens": args.max_tokens,
                          "temperature": 0}).encode() for prompt, _ in pairs]
    return Traffic("/v1/completions", bodies,
                   label=lambda index, answer: {"score": word_f1(answer["choices"][0]["text"], references[index])},
                   counted=lambda answer: answer["usage"]["completion_tokens"], unit="completion tokens",
                   description=f"{len(bodies)} prompts of {args.split} conversations")


def word_f1(answer: str, reference: str) -> float:
    """How much of the reference answer an answer says: the F1 of their words (as SQuAD scores answers)."""
    said, expected = answer.split(), reference.split()
    if not said or not expected:
        return float(said == expected)
    common = sum((Counter(said) & Counter(expected)).values())
    if not common:
        return 0.0
    precision, recall = common / len(said), common / len(expected)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------- sending

class Replay:
    """Clients sending the requests in turn, paced to a total rate; what came back, under a lock."""

    def __init__(self, base_url: str, traffic: Traffic, *, headers: dict, rate: float,
                 feedback_delay: float | None = None, feedback_senders: int = 1):
        self.url, self.traffic, self.bodies = base_url + traffic.path, traffic, traffic.bodies
        self.headers, self.rate, self.feedback_delay = headers, rate, feedback_delay
        self.feedback = (Feedback(base_url + "/v1/feedback", headers=headers, senders=feedback_senders)
                         if feedback_delay is not None else None)
        self.lock = threading.Lock()
        self.stopped = False  # SIGTERM or Ctrl-C: no new requests; those in flight finish and the summary prints
        self.next_index = 0
        self.latencies_ms: list[float] = []
        self.statuses: Counter = Counter()
        self.versions: Counter = Counter()
        self.counted = 0
        self.started = time.perf_counter()

    def _claim(self) -> int | None:
        with self.lock:
            if self.next_index >= len(self.bodies) or self.stopped:
                return None
            index, self.next_index = self.next_index, self.next_index + 1
        if self.rate:
            time.sleep(max(0.0, self.started + index / self.rate - time.perf_counter()))
        return index

    def client(self) -> None:
        while (index := self._claim()) is not None:
            request = urllib.request.Request(self.url, data=self.bodies[index], headers=self.headers, method="POST")
            sent = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, answer = response.status, json.loads(response.read())
            except urllib.error.HTTPError as err:
                status, answer = err.code, None
            except OSError:
                status, answer = "connection error", None
            with self.lock:
                self.latencies_ms.append((time.perf_counter() - sent) * 1000)
                self.statuses[status] += 1
                if status == 200:
                    self.versions[answer.get("model_version")] += 1
                    self.counted += self.traffic.counted(answer)
            if status == 200 and self.feedback is not None:
                self.feedback.later(time.monotonic() + self.feedback_delay,
                                    {"request_id": answer["id"], **self.traffic.label(index, answer)})

    def summary(self) -> dict:
        with self.lock:
            latencies = np.asarray(self.latencies_ms)
            elapsed = time.perf_counter() - self.started
            return {"requests": int(sum(self.statuses.values())), "errors": sum(n for s, n in self.statuses.items()
                                                                               if s != 200),
                    "statuses": {str(s): n for s, n in self.statuses.items()}, "counted": self.counted,
                    "unit": self.traffic.unit,
                    "versions": {str(v): n for v, n in self.versions.items()}, "seconds": round(elapsed, 2),
                    "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
                    "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
                    "feedback": dict(self.feedback.statuses) if self.feedback else {},
                    "feedback_worst_lag_s": round(self.feedback.worst_lag_s, 2) if self.feedback else None}


class Feedback:
    """Clicks sent to POST /v1/feedback when they fall due, in the order they fall due, by `senders` threads.

    As many senders as request clients: one sender alone keeps up with one client's answers at best, and on a
    busy endpoint (feedback waits behind the requests) a single sender fell to ~10 labels/s against 60 answers/s,
    so the labels of a rollout's canary arrived after its judge had stopped looking."""

    def __init__(self, url: str, *, headers: dict, senders: int = 1):
        self.url, self.headers = url, headers
        self.due: list[tuple[float, int, dict]] = []  # (when, order, body): the order breaks ties
        self.condition = threading.Condition()
        self.statuses: Counter = Counter()
        self.order = itertools.count()
        self.closed = False
        self.worst_lag_s = 0.0  # the longest a label waited past its due time before it was sent
        self.threads = [threading.Thread(target=self._send_due, daemon=True) for _ in range(senders)]
        for thread in self.threads:
            thread.start()

    def later(self, when: float, body: dict) -> None:
        with self.condition:
            heapq.heappush(self.due, (when, next(self.order), body))
            self.condition.notify()

    def close(self) -> None:
        """Wait until every click has been sent."""
        with self.condition:
            self.closed = True
            self.condition.notify_all()
        for thread in self.threads:
            thread.join()

    def lag_s(self) -> float:
        """How long the oldest label due has been waiting (0 when none is overdue)."""
        with self.condition:
            return max(0.0, time.monotonic() - self.due[0][0]) if self.due else 0.0

    def _send_due(self) -> None:
        while True:
            with self.condition:
                while not self.due or self.due[0][0] > time.monotonic():
                    if self.closed and not self.due:
                        return
                    self.condition.wait(timeout=None if not self.due else self.due[0][0] - time.monotonic())
                when, _, body = heapq.heappop(self.due)
                self.worst_lag_s = max(self.worst_lag_s, time.monotonic() - when)
            request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=self.headers,
                                             method="POST")
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status = response.status
            except urllib.error.HTTPError as err:
                status = err.code
            except OSError:
                status = "connection error"
            with self.condition:
                self.statuses[status] += 1


def run(replay: Replay, *, concurrency: int) -> dict:
    def stop(*_):
        replay.stopped = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threads = [threading.Thread(target=replay.client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(timeout=PROGRESS_EVERY_S)
            if thread.is_alive():
                break
        progress = replay.summary()
        lag = f", feedback {replay.feedback.lag_s():.1f} s behind" if replay.feedback is not None else ""
        print(f"  {progress['requests']}/{len(replay.bodies)} requests, {progress['errors']} errors, "
              f"{progress['seconds']:.0f} s{lag}", flush=True)
    if replay.feedback is not None:
        replay.feedback.close()
    return replay.summary()


def post_json(url: str, body: dict, *, headers: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise SystemExit(f"{url}: {err.code} {err.read().decode(errors='replace')}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    from serve.registry import Registry

    shifts, skews = parse_assignments(args.shift, flag="--shift"), parse_assignments(args.skew, flag="--skew")
    source = args.source.expanduser().resolve()
    registry = Registry(args.registry or source.parent.parent / "registry")
    version = args.version or registry.resolve(args.model, "production")
    if version is None:
        raise SystemExit(f"{args.model} has no production version in {registry.uri}: name one with --version")
    export_dir = registry.fetch(args.model, version, cache_dir=Path(tempfile.gettempdir()) / "slipway-replay")
    run_cfg = load_run_config(source)
    if run_cfg.model.family == "ranker":
        traffic = ranker_traffic(args, run_cfg, export_dir, shifts=shifts, skews=skews)
    elif shifts or skews:
        raise SystemExit("--shift and --skew change a ranker's features; --source trained an LLM")
    else:
        traffic = llm_traffic(args, run_cfg, export_dir)
    headers = {"content-type": "application/json"}
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise SystemExit(f"--api-key-env {args.api_key_env}: that environment variable is not set")
        headers["authorization"] = f"Bearer {key}"
    print(f"replaying {traffic.description} to {args.url} (v{version}'s export)", flush=True)
    base = args.url.rstrip("/")
    fault = parse_fault(args.fault) if args.fault else None
    if fault:
        print(f"fault injected: {post_json(base + '/v1/faults', fault, headers=headers)['faults']}", flush=True)
    replay = Replay(base, traffic, headers=headers, rate=args.rate, feedback_delay=args.feedback_delay,
                    feedback_senders=args.concurrency)
    try:
        summary = {**run(replay, concurrency=args.concurrency), "shift": shifts, "skew": skews, "split": args.split}
    finally:
        if fault:
            post_json(base + "/v1/faults", {"version": fault["version"]}, headers=headers)
    print(f"{summary['requests']} requests ({summary['errors']} errors, statuses {summary['statuses']}), "
          f"{summary['counted']} {summary['unit']} in {summary['seconds']} s; "
          f"p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms; answered by versions "
          f"{summary['versions']}; feedback {summary['feedback'] or 'none'}"
          + (f" (at worst {summary['feedback_worst_lag_s']:g} s late)" if summary["feedback"] else ""), flush=True)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["errors"] == 0 or fault else 1


if __name__ == "__main__":
    sys.exit(main())
