"""The continuous-batching engine (serve/engine.py) in-process: the same answers as one request at a time,
requests joining and leaving at every step, chunked prefill, cancellation, the bounded queue, and the asyncio
driver a replica uses."""

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conf.schema import LLMConfig
from datasets.tokenizer import train_tokenizer
from serve.engine import AsyncEngine, Engine, EngineConfig, EngineFull
from serve.generation import SamplingParams, generate
from trainers.llm import SlotBatch, build_kv_cache, build_llm

# n_kv_heads < n_heads: the slotted attention must handle grouped-query attention too.
CFG = LLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=128)
WORDS = "the of and to in is was for that with as on by at from his her which an be this are have not but".split()


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    return train_tokenizer([" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(40)], vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return build_llm(CFG, vocab_size=tokenizer.get_vocab_size()).eval()


def mixed_requests(vocab: int, *, count: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """Prompts of 1 to 60 tokens; greedy and seeded sampling, nucleus, logprobs and echo mixed."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 61))]
        params = SamplingParams(max_tokens=rng.randrange(1, 30), temperature=(0.0, 0.8, 1.5)[i % 3],
                                top_p=(1.0, 0.9)[i % 2], seed=1000 + i, logprobs=(None, 3)[i % 2], echo=i % 4 == 1)
        requests.append((prompt, params))
    return requests


def run_to_end(engine: Engine, ids: list[int]) -> dict[int, list]:
    chunks = {sequence_id: [] for sequence_id in ids}
    while engine.has_work:
        for sequence_id, chunk in engine.step().outputs:
            chunks[sequence_id].append(chunk)
    return chunks


def joined(chunks: list) -> tuple[str, str, int, list]:
    last = chunks[-1]
    return ("".join(c.text for c in chunks), last.finish_reason, last.completion_tokens,
            [score for c in chunks for score in c.logprobs])


def assert_same_completion(chunks: list, reference) -> None:
    text, finish_reason, completion_tokens, scores = joined(chunks)
    assert (text, finish_reason, completion_tokens) == (reference.text, reference.finish_reason,
                                                        reference.completion_tokens)
    assert [s.token_id for s in scores] == [s.token_id for s in reference.logprobs]
    for ours, theirs in zip(scores, reference.logprobs, strict=True):
        assert (ours.logprob is None) == (theirs.logprob is None)
        if ours.logprob is not None:
            assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]


def test_the_slotted_forward_gives_each_sequence_its_own_logits(model):
    """Decode rows and prefill chunks of different sequences in one forward, against each sequence alone."""
    torch.manual_seed(1)
    sequences = [torch.randint(0, model.vocab_size, (n,)) for n in (10, 5, 17)]
    with torch.no_grad():
        alone = [model(s[None])[0] for s in sequences]
        cache = build_kv_cache(model, batch_size=4)
        first = SlotBatch.build(decode=[], chunks=[(2, 0, 9), (0, 0, 3)], device=torch.device("cpu"))
        logits = model.forward_slots(torch.cat([sequences[0][:9], sequences[1][:3]]), cache=cache, slots=first,
                                     rows=torch.arange(12))
        torch.testing.assert_close(logits, torch.cat([alone[0][:9], alone[1][:3]]))
        # Two decoding (one prefilled whole, one that needs its chunk first), then a chunk and a new prompt.
        second = SlotBatch.build(decode=[(2, 9)], chunks=[(0, 3, 2), (1, 0, 17)], device=torch.device("cpu"))
        tokens = torch.cat([sequences[0][9:10], sequences[1][3:5], sequences[2]])
        logits = model.forward_slots(tokens, cache=cache, slots=second, rows=torch.tensor([0, 2, 19]))
        torch.testing.assert_close(logits, torch.stack([alone[0][9], alone[1][4], alone[2][16]]))
        third = SlotBatch.build(decode=[(2, 10), (0, 5)], chunks=[], device=torch.device("cpu"))
        more = torch.randint(0, model.vocab_size, (2,))
        logits = model.forward_slots(more, cache=cache, slots=third, rows=torch.arange(2))
        with_more = [model(torch.cat([sequences[0][:10], more[:1]])[None])[0, -1],
                     model(torch.cat([sequences[1], more[1:]])[None])[0, -1]]
        torch.testing.assert_close(logits, torch.stack(with_more))


def test_batched_requests_get_what_each_gets_alone(model, tokenizer):
    """Twelve mixed requests on 5 slots with a 24-token step budget (long prompts prefill in chunks, requests
    wait for slots and join as others leave): each answer equals the per-request path's, text and scores."""
    requests = mixed_requests(model.vocab_size, count=12)
    engine = Engine(model, tokenizer, stop_token_ids=None,
                    config=EngineConfig(max_running=5, max_batched_tokens=24, max_waiting=64))
    chunks = run_to_end(engine, engine.add(requests))
    for (prompt, params), answer in zip(requests, chunks.values(), strict=True):
        assert_same_completion(answer, generate(model, tokenizer, prompt, params))
    assert engine.free_slots and len(engine.free_slots) == 5 and not engine.running


def test_a_seeded_request_gives_the_same_text_alone_or_in_a_full_batch(model, tokenizer):
    params = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.95, seed=7, logprobs=1)
    prompt = tokenizer.encode("the of and to in is").ids
    config = EngineConfig(max_running=16, max_batched_tokens=256, max_waiting=64)
    alone = Engine(model, tokenizer, stop_token_ids=[], config=config)
    alone_chunks = run_to_end(alone, alone.add([(prompt, params)]))
    full = Engine(model, tokenizer, stop_token_ids=[], config=config)
    others = [(p, SamplingParams(max_tokens=40, temperature=1.0, seed=s.seed)) for p, s in
              mixed_requests(model.vocab_size, count=15, seed=3)]
    ids = full.add(others[:7] + [(prompt, params)] + others[7:])
    batched_chunks = run_to_end(full, ids)
    text, _, tokens, scores = joined(next(iter(alone_chunks.values())))
    assert tokens == 40 and text
    assert joined(batched_chunks[ids[7]])[:3] == (text, "length", 40)
    assert [s.token_id for s in joined(batched_chunks[ids[7]])[3]] == [s.token_id for s in scores]


def test_requests_join_and_leave_the_running_batch_at_every_step(model, tokenizer):
    """A request added while others decode starts in the very next step, next to their decode tokens; a
    finished request's slot goes to a waiting one in the step after it ends."""
    engine = Engine(model, tokenizer, stop_token_ids=[],
                    config=EngineConfig(max_running=2, max_batched_tokens=64, max_waiting=8))
    short, long = SamplingParams(max_tokens=2, temperature=0), SamplingParams(max_tokens=10, temperature=0)
    first = engine.add([([5, 6, 7], long)])
    assert engine.step().tokens == 3  # the prompt's prefill
    assert engine.step().tokens == 1  # one decode token
    second = engine.add([([8, 9], short)])
    assert engine.step().tokens == 1 + 2 and len(engine.running) == 2  # joined: decode + its prefill
    waiting = engine.add([([10, 11, 12, 13], short)])
    report = engine.step()  # the second one's last token: it leaves; no slot was free for the third yet
    assert second[0] in report.finished and len(engine.waiting) == 1
    report = engine.step()
    assert report.tokens == 1 + 4 and not engine.waiting  # the freed slot's new prompt, next to the decode
    chunks = run_to_end(engine, first + waiting)
    assert joined(chunks[waiting[0]])[2] == 2


def test_a_long_prompt_prefills_in_chunks_while_others_keep_decoding(model, tokenizer):
    engine = Engine(model, tokenizer, stop_token_ids=[],
                    config=EngineConfig(max_running=4, max_batched_tokens=8, max_waiting=8))
    decoding = engine.add([([1, 2], SamplingParams(max_tokens=20, temperature=0))])
    engine.step()
    prompt = list(range(3, 43))
    long = engine.add([(prompt, SamplingParams(max_tokens=3, temperature=0))])
    sampled, first_chunks = [], []
    while engine.running[-1].cached < len(prompt) or len(engine.running) == 1:
        report = engine.step()
        assert report.tokens <= 8
        sampled.append(report.sampled)
        first_chunks += [chunk for sequence_id, chunk in report.outputs if sequence_id == long[0]]
    # 40 prompt tokens at 7 per step (8 less the decode token): 6 steps, in each of which the other sequence
    # got its token; the last chunk also samples the long prompt's first token.
    assert len(sampled) == 6 and sampled[:-1] == [1] * 5 and sampled[-1] == 2
    chunks = run_to_end(engine, decoding + long)
    chunks[long[0]] = first_chunks + chunks[long[0]]
    reference = generate(model, tokenizer, prompt, SamplingParams(max_tokens=3, temperature=0), stop_token_ids=[])
    assert_same_completion(chunks[long[0]], reference)


def test_cancelling_frees_the_slot_at_the_next_step(model, tokenizer):
    engine = Engine(model, tokenizer, stop_token_ids=[],
                    config=EngineConfig(max_running=1, max_batched_tokens=16, max_waiting=8))
    running, waiting = engine.add([([1, 2, 3], SamplingParams(max_tokens=50, temperature=1.0, seed=1)),
                                   ([4, 5], SamplingParams(max_tokens=2, temperature=0))])
    engine.step()
    engine.step()
    engine.cancel(running)
    report = engine.step()
    assert running not in {sequence_id for sequence_id, _ in report.outputs}
    assert [s.id for s in engine.running] == [waiting] and report.tokens == 2  # the waiting one's prefill
    engine.cancel(12345)  # an unknown (or already finished) id is ignored
    assert joined(run_to_end(engine, [waiting])[waiting])[2] == 2


def test_a_full_engine_refuses_and_an_idle_one_takes_a_big_request(model, tokenizer):
    engine = Engine(model, tokenizer, stop_token_ids=[],
                    config=EngineConfig(max_running=1, max_batched_tokens=16, max_waiting=2))
    params = SamplingParams(max_tokens=4, temperature=0)
    big = engine.add([([1], params)] * 4)  # more than one slot and a queue of two hold, but the engine is idle
    with pytest.raises(EngineFull, match="4 sequences are running or waiting, as many as the engine's 1 slots and "
                                         "queue of 2 hold"):
        engine.add([([2], params)])
    chunks = run_to_end(engine, big)
    assert all(joined(c)[2] == 4 for c in chunks.values())
    # Requests that arrive together count against the capacity at once, before any step gives them a slot.
    assert engine.add([([2], params)]) and engine.add([([3], params)]) and engine.add([([3], params)])
    with pytest.raises(EngineFull):
        engine.add([([4], params)])
    engine.step()  # one of them runs now: the capacity stays taken until one ends
    with pytest.raises(EngineFull):
        engine.add([([4], params)])
    while not engine.step().finished:
        pass
    assert engine.add([([4], params)])
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        engine.add([([1] * 120, SamplingParams(max_tokens=10))])


def test_an_unscored_echo_of_zero_tokens_needs_no_slot(model, tokenizer):
    engine = Engine(model, tokenizer, stop_token_ids=[],
                    config=EngineConfig(max_running=1, max_batched_tokens=16, max_waiting=2))
    (sequence_id,) = engine.add([([1, 2, 3], SamplingParams(max_tokens=0, echo=True))])
    report = engine.step()
    assert report.outputs[0][0] == sequence_id and report.outputs[0][1].finish_reason == "length"
    assert report.tokens == 0 and not engine.has_work


@pytest.mark.parametrize("stepping", ["thread", "event loop"])
def test_the_async_driver_streams_cancels_and_survives_a_failed_step(model, tokenizer, monkeypatch, stepping):
    engine = Engine(model, tokenizer, stop_token_ids=[],
                    config=EngineConfig(max_running=4, max_batched_tokens=64, max_waiting=8))
    steps = []
    executor = ThreadPoolExecutor(1) if stepping == "thread" else None
    driver = AsyncEngine(engine, executor=executor, on_step=lambda report, stats: steps.append(stats))
    params = SamplingParams(max_tokens=12, temperature=0)

    async def completion(prompt: list[int]) -> str:
        return "".join([chunk.text async for _, chunk in await driver.generate([(0, prompt, params)])])

    async def leave_early() -> None:
        stream = await driver.generate([(0, [9, 9, 9], SamplingParams(max_tokens=80, temperature=1.0, seed=2))])
        await anext(stream)
        await stream.aclose()  # what a client disconnect does to the replica's generator

    # On a thread, steps could start before the last request is added, and a busy machine could let the first
    # request finish alone: the gate holds the executor's one thread until all four have arrived.
    gate = threading.Event()
    if executor is not None:
        executor.submit(gate.wait, 60)

    async def scenario():
        requests = [asyncio.create_task(coroutine)
                    for coroutine in (completion([1, 2]), completion([3, 4, 5]), leave_early(), completion([6]))]
        await asyncio.sleep(0)  # each task runs to its first wait: all four are in the engine
        gate.set()
        texts = await asyncio.gather(*requests)
        # The cancelled sequence leaves at the next step; the driver's last report reaches the loop after it.
        while engine.has_work or driver._stepping:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        return texts

    texts = asyncio.run(scenario())
    for prompt, text in zip(([1, 2], [3, 4, 5]), texts, strict=False):
        assert text == generate(model, tokenizer, prompt, params).text
    assert max(stats["running"] for stats in steps) >= 3 and steps[-1]["running"] == 0
    assert not engine.running and len(engine.free_slots) == 4

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(model, "forward_slots", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        asyncio.run(completion([1, 2]))
    monkeypatch.undo()
    assert not engine.running and len(engine.free_slots) == 4  # the failed step's sequences were dropped
    assert asyncio.run(completion([1, 2])) == texts[0]
