"""Continuous batching for Slipway's decoder: many requests share every forward pass, joining and leaving the
running batch at each step (Orca's iteration-level scheduling, as vLLM does it).

Each `step` runs one forward over:
1. one token of every sequence that is decoding (decoding first, so a long prompt never stalls the others'
   tokens: inter-token latency stays one step);
2. prefill chunks of sequences whose prompt is not yet in the cache, oldest first, and then of waiting
   requests admitted into free slots, until `max_batched_tokens` tokens are in the step. A prompt longer
   than what is left is cut into chunks over several steps (chunked prefill), so a step's cost is bounded.

The KV cache is preallocated as fixed slots: `max_running` rows of the model's whole context, one per running
sequence (trainers/llm.py: SlotBatch). Why slots, not paged blocks: paging saves memory when contexts are long
and uneven, but it needs an attention kernel that reads keys through a block table; with torch's SDPA a paged
cache would be gathered into contiguous keys every step, a full copy per layer. A slot is already contiguous
(a decode step gathers only the decoding rows' spans, a prefill chunk reads its slot in place), and Slipway's
own models have contexts of hundreds to a few thousand tokens, where a slot wastes little; for long contexts on
GPUs, vLLM's paged attention is the better tool. Memory: max_running x max_seq_len positions per layer.

Sampling stays per request: each sequence has its own seeded generator and `Decoding` (serve/generation.py),
the same code the per-request path runs, so a seeded request gives the same text alone or in a full batch
(up to float rounding in the batched matmuls; tests/serve/test_engine.py holds it to equal text).

`Engine` is synchronous and free of Ray and asyncio so it can be tested in-process; `AsyncEngine` steps it for an
asyncio replica (on the event loop, or on a thread for a GPU model), streams each request's chunks as they
come, and cancels a request's sequences when its consumer goes away.
"""

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from serve.generation import Decoding, SamplingParams, StreamChunk, check_request, stop_ids_of
from trainers.llm import SlotBatch, Transformer, build_kv_cache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 16  # KV-cache slots: sequences decoding (or prefilling) at once
    max_batched_tokens: int = 256  # tokens per forward: every decoding sequence's one, then prefill chunks
    max_waiting: int = 64  # sequences waiting for a slot; beyond slots and queue: EngineFull (the API's 503)

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0:
            raise ValueError(f"engine max_running={self.max_running} must be at least 1 and max_waiting="
                             f"{self.max_waiting} not negative")
        if self.max_batched_tokens < self.max_running:
            raise ValueError(f"engine max_batched_tokens={self.max_batched_tokens} must be at least max_running="
                             f"{self.max_running}: every running sequence decodes one token per step")


class EngineFull(Exception):
    """The slots and the queue are full: the request is refused rather than queued without end."""


@dataclass
class _Sequence:
    id: int
    prompt_ids: list[int]
    decoding: Decoding
    arrived: float
    slot: int | None = None
    cached: int = 0  # positions in the KV cache (prompt tokens prefilled, then fed completion tokens)
    next_token: int | None = None  # the sampled token to feed at the next decode step
    last_token_at: float | None = None

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt_ids)


@dataclass
class StepReport:
    """What one step did, for metrics: chunks per sequence id, and the timings of the tokens it sampled."""

    outputs: list[tuple[int, StreamChunk]] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)  # sequence ids that ended (their last chunk is in outputs)
    time_to_first_token_s: list[float] = field(default_factory=list)
    inter_token_s: list[float] = field(default_factory=list)
    tokens: int = 0  # tokens in the forward pass (decode tokens + prefill chunks)
    sampled: int = 0  # completion tokens sampled


class Engine:
    """Iteration-level batching of one loaded model (see the module's docstring). `add` and `cancel` may be called
    from any thread while `step` runs on another: they only post to a queue that the next step applies."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, stop_token_ids: Sequence[int] | None,
                 config: EngineConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.stop_ids = stop_ids_of(tokenizer, stop_token_ids)
        self.device = model.tok_embeddings.weight.device
        self.cache = _new_slot_cache(model, slots=config.max_running)
        self.free_slots = list(range(config.max_running - 1, -1, -1))
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", seq) and ("cancel", id), in order
        self._ids = itertools.count()
        self._lock = threading.Lock()
        # Sequences added and not yet ended (guarded by _lock): counted from `add` on, so requests arriving
        # between two steps see each other, whether or not a step has given them a slot yet.
        self._held = 0

    # ------------------------------------------------------------------------------ from any thread

    def add(self, sequences: Sequence[tuple[list[int], SamplingParams]]) -> list[int]:
        """Queue one request's sequences (prompt ids, sampling) together; returns their ids. Raises ValueError for
        a prompt the model cannot take, and EngineFull when the slots and the queue are full: a request with more
        sequences than both hold is taken only by an idle engine, so it waits its turn but never forever."""
        for prompt_ids, params in sequences:
            check_request(self.model, prompt_ids, params)
        capacity = self.config.max_running + self.config.max_waiting
        with self._lock:
            if self._held and self._held + len(sequences) > capacity:
                raise EngineFull(f"{self._held} sequences are running or waiting, as many as the engine's "
                                 f"{self.config.max_running} slots and queue of {self.config.max_waiting} hold")
            self._held += len(sequences)
        ids = []
        for prompt_ids, params in sequences:
            decoding = Decoding(self.tokenizer, prompt_ids, params, stop_ids=self.stop_ids, device=self.device)
            sequence = _Sequence(next(self._ids), list(prompt_ids), decoding, arrived=time.perf_counter())
            self._inbox.put(("add", sequence))
            ids.append(sequence.id)
        return ids

    def cancel(self, sequence_id: int) -> None:
        """Stop a sequence at the next step and free its slot (a client that went away); unknown ids are ignored."""
        self._inbox.put(("cancel", sequence_id))

    # ------------------------------------------------------------------------- the stepping thread

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or not self._inbox.empty())

    def stats(self) -> dict:
        """Queue length, running batch size and KV-cache use (positions held / positions preallocated)."""
        capacity = self.config.max_running * self.cache.max_len
        return {"waiting": len(self.waiting), "running": len(self.running),
                "kv_cache_usage": sum(s.cached for s in self.running) / capacity}

    def step(self) -> StepReport:
        report = StepReport()
        self._apply_inbox(report)
        decoding = [s for s in self.running if s.prefilled]
        chunks = self._plan_prefill(budget=self.config.max_batched_tokens - len(decoding))
        if decoding or chunks:
            logits, rows_of = self._forward(decoding, chunks)
            report.tokens = len(decoding) + sum(length for _, length in chunks)
            self._sample(decoding, chunks, logits, rows_of, report)
        return report

    def abort(self) -> list[int]:
        """Drop every sequence (after a failed step, whose cache state is unknown); returns their ids."""
        report = StepReport()
        self._apply_inbox(report)
        dropped = [*report.finished, *(s.id for s in itertools.chain(self.running, self.waiting))]
        for sequence in list(self.running):
            self._release(sequence)
        self._forget_held(len(self.waiting))
        self.waiting.clear()
        return dropped

    def _apply_inbox(self, report: StepReport) -> None:
        while not self._inbox.empty():
            kind, item = self._inbox.get()
            if kind == "add" and not item.decoding.needs_model:  # nothing to compute: answered at once
                self._forget_held(1)
                report.outputs.append((item.id, item.decoding.without_model()))
                report.finished.append(item.id)
            elif kind == "add":
                self.waiting.append(item)
            else:
                self._cancel_now(item)

    def _cancel_now(self, sequence_id: int) -> None:
        for sequence in self.running:
            if sequence.id == sequence_id:
                self._release(sequence)
                return
        for sequence in self.waiting:
            if sequence.id == sequence_id:
                self.waiting.remove(sequence)
                self._forget_held(1)
                return

    def _forget_held(self, count: int) -> None:
        with self._lock:
            self._held -= count

    def _release(self, sequence: _Sequence) -> None:
        self.running.remove(sequence)
        self.free_slots.append(sequence.slot)
        self._forget_held(1)

    def _plan_prefill(self, *, budget: int) -> list[tuple[_Sequence, int]]:
        """Prefill chunks within `budget` tokens: sequences already prefilling first, then newly admitted ones."""
        chunks = []
        for sequence in self.running:
            if budget <= 0:
                return chunks
            if not sequence.prefilled:
                take = min(budget, len(sequence.prompt_ids) - sequence.cached)
                chunks.append((sequence, take))
                budget -= take
        while budget > 0 and self.waiting and self.free_slots:
            sequence = self.waiting.popleft()
            sequence.slot = self.free_slots.pop()
            self.running.append(sequence)
            take = min(budget, len(sequence.prompt_ids))
            chunks.append((sequence, take))
            budget -= take
        return chunks

    @torch.inference_mode()
    def _forward(self, decoding: list[_Sequence],
                 chunks: list[tuple[_Sequence, int]]) -> tuple[torch.Tensor, dict]:
        """Logits of the rows that are sampled or scored, and id(sequence) -> (its first logits row, row count)."""
        tokens = [s.next_token for s in decoding]
        rows, rows_of = [], {}
        for index, sequence in enumerate(decoding):
            rows_of[id(sequence)] = (len(rows), 1)
            rows.append(index)
        offset = len(decoding)
        for sequence, length in chunks:
            tokens.extend(sequence.prompt_ids[sequence.cached : sequence.cached + length])
            last_chunk = sequence.cached + length == len(sequence.prompt_ids)
            # Echo with logprobs scores every prompt position; otherwise only the prompt's last one is sampled.
            first = offset if sequence.decoding.scores_prompt else offset + length - 1
            if sequence.decoding.scores_prompt or last_chunk:
                rows_of[id(sequence)] = (len(rows), offset + length - first)
                rows.extend(range(first, offset + length))
            offset += length
        batch = SlotBatch.build(decode=[(s.slot, s.cached) for s in decoding],
                                chunks=[(s.slot, s.cached, length) for s, length in chunks], device=self.device)
        logits = self.model.forward_slots(torch.tensor(tokens, dtype=torch.long, device=self.device),
                                          cache=self.cache, slots=batch,
                                          rows=torch.tensor(rows, dtype=torch.long, device=self.device))
        return logits, rows_of

    def _sample(self, decoding: list[_Sequence], chunks: list[tuple[_Sequence, int]], logits: torch.Tensor,
                rows_of: dict, report: StepReport) -> None:
        """Advance every sequence of the step: count the positions it added to the cache, score the prompt rows
        of an echo, and sample the next token of each sequence whose prompt is now whole."""
        now = time.perf_counter()
        for sequence, added in [*((s, 1) for s in decoding), *chunks]:
            start, sequence.cached = sequence.cached, sequence.cached + added
            if id(sequence) not in rows_of:  # a prefill chunk that is neither scored nor the prompt's last
                continue
            first, count = rows_of[id(sequence)]
            if sequence.decoding.scores_prompt and start < len(sequence.prompt_ids):
                sequence.decoding.score_prompt(logits[first : first + count], start=start)
            if sequence.prefilled:
                self._advance(sequence, logits[first + count - 1], now=now, report=report)

    def _advance(self, sequence: _Sequence, logits: torch.Tensor, *, now: float, report: StepReport) -> None:
        chunks, token = sequence.decoding.advance(logits)
        if sequence.decoding.completion_tokens:
            report.sampled += 1
            if sequence.last_token_at is None:
                report.time_to_first_token_s.append(now - sequence.arrived)
            else:
                report.inter_token_s.append(now - sequence.last_token_at)
            sequence.last_token_at = now
        report.outputs.extend((sequence.id, chunk) for chunk in chunks)
        sequence.next_token = token
        if token is None:
            report.finished.append(sequence.id)
            self._release(sequence)


@torch.inference_mode()
def _new_slot_cache(model: Transformer, *, slots: int):
    return build_kv_cache(model, batch_size=slots)


# ------------------------------------------------------------------------------------------------ asyncio

class AsyncEngine:
    """An Engine driven from an asyncio event loop, each request reading its own chunks; steps run back to back
    while any sequence is queued or running. `on_step(report, stats)` sees every step (metrics).

    Where steps run is the `executor`'s choice. With one (a model on a GPU), on its thread: the forward's
    kernels run while the event loop parses requests and writes answers, and chunks are handed to the loop
    without the step waiting for it. Without (a model on the CPU), on the event loop itself, yielding to it
    between steps: there the loop and the forward share the same cores anyway, and handing every step to a
    thread and its results back cost a third more time per request at concurrency 1 (15 ms against 12 ms for 16
    tokens of llm_tiny on this 2-core machine)."""

    def __init__(self, engine: Engine, *, executor: ThreadPoolExecutor | None = None,
                 on_step: Callable[[StepReport, dict], None] | None = None):
        self.engine, self.executor, self.on_step = engine, executor, on_step
        self._streams: dict[int, tuple[asyncio.Queue, int]] = {}  # sequence id -> (its request's queue, index)
        self._lock = threading.Lock()
        self._stepping = False  # a _step_while_busy job is queued or running (guarded by _lock)
        self._loop: asyncio.AbstractEventLoop | None = None  # guarded by _lock

    async def generate(self, jobs: Sequence[tuple[int, list[int], SamplingParams]]) -> AsyncIterator:
        """(index, StreamChunk) for the jobs (index, prompt_ids, params) of one request, as they come. All are
        queued before the first chunk is awaited, so a full engine raises EngineFull before anything is sent;
        leaving early (a client that went away) cancels what is still running."""
        chunks: asyncio.Queue = asyncio.Queue()
        ids = self.engine.add([(prompt_ids, params) for _, prompt_ids, params in jobs])
        for sequence_id, (index, _, _) in zip(ids, jobs, strict=True):
            self._streams[sequence_id] = (chunks, index)
        self._start(asyncio.get_running_loop())
        return self._read(chunks, ids)

    async def _read(self, chunks: asyncio.Queue, ids: list[int]) -> AsyncIterator:
        open_ids = set(ids)
        try:
            while open_ids:
                sequence_id, index, chunk = await chunks.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                if chunk.finish_reason is not None:
                    open_ids.discard(sequence_id)
                    self._streams.pop(sequence_id, None)
                yield index, chunk
        finally:
            self._forget(open_ids)

    def _forget(self, ids) -> None:
        for sequence_id in ids:
            self._streams.pop(sequence_id, None)
            self.engine.cancel(sequence_id)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loop = loop  # where a stepping thread hands its results: the loop of the latest request
            if self._stepping:
                return
            self._stepping = True
        if self.executor is None:
            self._inline = loop.create_task(self._step_inline())  # held: the loop keeps only weak references
        else:
            self.executor.submit(self._step_while_busy)

    async def _step_inline(self) -> None:
        """On the event loop: a step, then a turn for everything else waiting on the loop, until idle."""
        while self.engine.has_work:
            try:
                report = self.engine.step()
            except Exception as err:  # a failed forward: its sequences' cache state is unknown, so all end
                logger.exception("an engine step failed; failing the requests it was running")
                self._fail(self.engine.abort(), err)
            else:
                self._dispatch(report, self.engine.stats())
            await asyncio.sleep(0)
        self._stepping = False

    def _step_while_busy(self) -> None:
        """On the executor's thread: step until there is nothing left, then stop (a later `generate` restarts)."""
        while True:
            with self._lock:  # checked under the lock that _start takes, so no sequence is added unseen
                if not self.engine.has_work:
                    self._stepping = False
                    return
            try:
                report = self.engine.step()
            except Exception as err:  # a failed forward: its sequences' cache state is unknown, so all end
                logger.exception("an engine step failed; failing the requests it was running")
                posted = self._post(self._fail, self.engine.abort(), err)
            else:
                posted = self._post(self._dispatch, report, self.engine.stats())
            if not posted:  # the loop is closed: nobody is left to read, so drop the rest and stop (a later
                # `generate` on a live loop starts stepping again)
                self.engine.abort()
                with self._lock:
                    self._stepping = False
                return

    def _post(self, callback: Callable, *args) -> bool:
        with self._lock:
            loop = self._loop
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # "Event loop is closed"
            return False
        return True

    def _dispatch(self, report: StepReport, stats: dict) -> None:
        for sequence_id, chunk in report.outputs:
            self._deliver(sequence_id, chunk)
        if self.on_step is not None:
            self.on_step(report, stats)

    def _fail(self, sequence_ids: list[int], err: Exception) -> None:
        for sequence_id in sequence_ids:
            self._deliver(sequence_id, err)

    def _deliver(self, sequence_id: int, item) -> None:
        stream = self._streams.get(sequence_id)
        if stream is not None:
            chunks, index = stream
            chunks.put_nowait((sequence_id, index, item))
