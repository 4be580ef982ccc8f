"""The OpenAI-compatible API as its clients use it: chat completions, completions with logprobs and echo, batched
prompts, usage in streams, and refusals in OpenAI's error shape.

Three layers: in-process (serve/completion.py on a LoadedLLM built here, no Ray), over HTTP with the official
`openai` client and lm-evaluation-harness's own response parsers against a model trained from scratch, and chat
against a Hugging Face checkpoint served from the registry (`served_chat_llm`), compared with transformers.
"""

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conf.schema import LLMConfig
from datasets.chat_template import ChatTemplate
from serve import api, chat
from serve.completion import LoadedLLM, join_choices, load_llm, prepare, stream_choices
from serve.export import LoadedModel
from serve.monitoring import bin_rows_from_exposition, read_reference
from tests.hf_models import BOS, CHAT_TEMPLATE, END_OF_TURN, build_tokenizer
from tests.serve.conftest import export_best, scrape, settled
from tests.serve.http_client import request
from trainers.llm import build_llm

LIMIT = 64
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello! How are you?"}]


# ------------------------------------------------------------------------------------------ in-process

@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def llm(tokenizer) -> LoadedLLM:
    """A random decoder with the tiny Llama's tokenizer and chat template; its vocabulary padded past the
    tokenizer's, as Hub checkpoints often are."""
    torch.manual_seed(0)
    model = build_llm(LLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=96),
                      vocab_size=tokenizer.get_vocab_size() + 8)
    template = ChatTemplate(source=CHAT_TEMPLATE, origin="test", special_tokens={"bos_token": BOS,
                                                                                  "eos_token": END_OF_TURN})
    return LoadedLLM(model=model, tokenizer=tokenizer, version=1, chat_template=template,
                     stop_token_ids=(tokenizer.token_to_id(END_OF_TURN),))


def answer(llm: LoadedLLM, request: dict) -> dict:
    jobs = prepare(llm, request)
    return jobs if isinstance(jobs, dict) else join_choices(list(stream_choices(llm, jobs)))


def completion_request(**fields) -> dict:
    return api.parse_completion({"prompt": "Hello", **fields}, served="m", max_tokens_limit=LIMIT)


def chat_request(**fields) -> dict:
    return chat.parse_chat({"messages": MESSAGES, **fields}, served="m", max_tokens_limit=LIMIT)


def hf_tokenizer(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=END_OF_TURN,
                                   chat_template=CHAT_TEMPLATE)


def test_a_chat_prompt_is_the_token_ids_transformers_gives(llm, tokenizer):
    """Rendered as transformers renders it and encoded without special tokens: the template writes BOS itself."""
    (job,) = prepare(llm, chat_request(max_tokens=4))
    expected = hf_tokenizer(tokenizer).apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert job.prompt_ids == expected and expected.count(tokenizer.token_to_id(BOS)) == 1


def test_a_string_prompt_gets_the_tokenizers_bos_and_token_ids_are_used_as_given(llm, tokenizer):
    (job,) = prepare(llm, completion_request(prompt="Hello there"))
    assert job.prompt_ids == hf_tokenizer(tokenizer)("Hello there")["input_ids"]
    assert job.prompt_ids[0] == tokenizer.token_to_id(BOS)
    (job,) = prepare(llm, completion_request(prompt=[7, 8, 9]))
    assert job.prompt_ids == [7, 8, 9]


def test_a_chat_answer_is_the_completion_of_the_rendered_prompt(llm, tokenizer):
    """Same tokens, same sampling: the chat route adds only the template; the end-of-turn id ends it."""
    result = answer(llm, chat_request(max_tokens=12, temperature=0.9, seed=5))
    (job,) = prepare(llm, chat_request(max_tokens=12, temperature=0.9, seed=5))
    plain = answer(llm, completion_request(prompt=job.prompt_ids, max_tokens=12, temperature=0.9, seed=5))
    assert result["choices"][0]["text"] == plain["choices"][0]["text"]
    assert result["usage"] == plain["usage"] and result["usage"]["prompt_tokens"] == len(job.prompt_ids)
    with torch.no_grad():
        first_token = int(llm.model(torch.tensor([job.prompt_ids]))[0, -1].argmax())
    stopped = LoadedLLM(model=llm.model, tokenizer=tokenizer, version=1, chat_template=llm.chat_template,
                        stop_token_ids=(first_token,))
    ended = answer(stopped, chat_request(max_tokens=12, temperature=0))
    assert ended["choices"][0] == {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}
    assert ended["usage"]["completion_tokens"] == 1


def test_a_model_without_a_chat_template_refuses_chat(llm, tokenizer):
    bare = LoadedLLM(model=llm.model, tokenizer=tokenizer, version=3)
    error = prepare(bare, chat_request())["error"]
    assert error["param"] == "model" and "no chat template" in error["message"] and "version 3" in error["message"]


def test_a_template_that_refuses_the_conversation_is_a_400_on_messages(llm, tokenizer):
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user message') }}{% endif %}"
    picky = LoadedLLM(model=llm.model, tokenizer=tokenizer, version=1,
                      chat_template=ChatTemplate(source=strict, origin="tokenizer_config.json"))
    error = prepare(picky, chat_request())["error"]
    assert error["param"] == "messages" and "start with a user message" in error["message"]


def test_a_batch_gives_one_choice_per_prompt_each_as_if_alone(llm):
    prompts = ["Hello there", [5, 6, 7, 8], "The quick"]
    batch = answer(llm, completion_request(prompt=prompts, max_tokens=5, temperature=0, logprobs=1, echo=True))
    alone = [answer(llm, completion_request(prompt=p, max_tokens=5, temperature=0, logprobs=1, echo=True))
             for p in prompts]
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    assert [c | {"index": 0} for c in batch["choices"]] == [a["choices"][0] for a in alone]
    assert batch["usage"]["total_tokens"] == sum(a["usage"]["total_tokens"] for a in alone)


def test_echo_logprobs_are_openais_legacy_shape(llm, tokenizer):
    result = answer(llm, completion_request(prompt="Hello there", max_tokens=4, temperature=0, logprobs=2,
                                            echo=True))
    (choice,) = result["choices"]
    logprobs, prompt_tokens = choice["logprobs"], result["usage"]["prompt_tokens"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == prompt_tokens + result["usage"]["completion_tokens"]
    assert logprobs["tokens"][:3] == [BOS, "He", "ll"] and choice["text"].startswith("Hello there")
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"][1:])
    for token, logprob, top in zip(logprobs["tokens"][prompt_tokens:], logprobs["token_logprobs"][prompt_tokens:],
                                   logprobs["top_logprobs"][prompt_tokens:], strict=True):
        assert top[token] == logprob == max(top.values())  # greedy: lm-eval's is_greedy test holds exactly
    # Offsets index the choice's text: BOS (special, not in the text) adds no characters.
    assert logprobs["text_offset"][:4] == [0, 0, 2, 4]
    text = choice["text"]
    for token, start, end in zip(logprobs["tokens"][1:prompt_tokens], logprobs["text_offset"][1:prompt_tokens],
                                 logprobs["text_offset"][2:], strict=False):
        assert text[start:end] == token


def test_max_tokens_zero_with_echo_scores_the_prompt_only(llm):
    result = answer(llm, completion_request(prompt=[5, 6, 7], max_tokens=0, echo=True, logprobs=1))
    (choice,) = result["choices"]
    assert choice["finish_reason"] == "length" and result["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == 3 and choice["logprobs"]["token_logprobs"][0] is None


def test_streamed_chunks_join_to_the_plain_answer(llm):
    request = completion_request(prompt=["Hello", [9, 10]], max_tokens=16, temperature=1.0, seed=2, logprobs=1,
                                 echo=True)
    chunks = list(stream_choices(llm, prepare(llm, request)))
    assert len(chunks) > 4 and join_choices(chunks) == answer(llm, request)
    offsets = [o for c in chunks if c["index"] == 0 for o in c["logprobs"]["text_offset"]]
    assert offsets == sorted(offsets)  # offsets run on across chunks


@pytest.mark.parametrize("fields, param", [
    ({"prompt": "Hello " * 60, "max_tokens": 16}, "prompt"),
    ({"prompt": [1] * 40, "max_tokens": 64}, "max_tokens"),
    ({"prompt": [[1, 2], [3, 400]]}, "prompt"),  # beyond the model's (padded) vocabulary
])
def test_what_the_model_cannot_take_is_an_error_naming_the_field(llm, fields, param):
    error = prepare(llm, completion_request(**fields))["error"]
    assert error["param"] == param and param in error["message"], error


def test_chat_over_the_context_names_messages_or_max_completion_tokens(llm):
    long = [{"role": "user", "content": "Hello " * 60}]
    assert prepare(llm, chat.parse_chat({"messages": long}, served="m", max_tokens_limit=LIMIT))["error"][
        "param"] == "messages"
    error = prepare(llm, chat_request(max_completion_tokens=LIMIT))["error"]
    assert error["param"] == "max_completion_tokens" and "lower max_completion_tokens" in error["message"]
    (job,) = prepare(llm, chat_request())  # no max_tokens: what the context leaves, up to the limit
    assert job.params.max_tokens == min(LIMIT, llm.model.cfg.max_seq_len - len(job.prompt_ids))


@pytest.mark.parametrize("generation_config, tokenizer_config, expected", [
    ({"eos_token_id": [1, 4]}, {"eos_token": END_OF_TURN}, [1, 4]),  # the end-of-turn id (4) once
    ({"eos_token_id": 1}, None, [1]),
    (None, {"eos_token": {"content": END_OF_TURN}}, [4]),
    (None, None, []),  # our own BPE names <|endoftext|>; this tokenizer has none
])
def test_stop_tokens_and_the_template_come_from_the_exports_files(tmp_path, tokenizer, llm, generation_config,
                                                                  tokenizer_config, expected):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    if tokenizer_config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config,
                                                                    "chat_template": CHAT_TEMPLATE}))
    export = LoadedModel(model=llm.model, model_config={"family": "llm", "tokenizer": "tokenizer.json"},
                         directory=tmp_path)
    loaded = load_llm(export, version=2)
    assert sorted(loaded.stop_token_ids) == expected
    assert (loaded.chat_template is not None) == (tokenizer_config is not None)


# --------------------------------------------------------------- over HTTP: a model trained from scratch

SCRATCH = "scratch-llm"
PROMPT = "def main("


@dataclass
class Served:
    url: str
    model: str
    export_dir: Path


@pytest.fixture(scope="module")
def scratch_llm(trained_runs, serve_port, tmp_path_factory):
    """The DDP run of the serving tests (trained once per session) served under its own name and prefix."""
    from ray import serve

    from conf.schema import ServeConfig
    from serve.deploy import deploy
    from serve.registry import Registry
    from tests.helpers import LLM_STRATEGY_RUNS

    root = tmp_path_factory.mktemp("openai_api")
    run_dir = trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"])
    export_dir = export_best(run_dir, root / "export")
    registry = Registry(root / "registry")
    registry.register(SCRATCH, export_dir, metadata={"family": "llm"})
    registry.move_alias(SCRATCH, "production", 1, reason="test setup")
    serve_cfg = ServeConfig(registry=str(root / "registry"), port=serve_port, num_cpus=0.25, min_replicas=1,
                            max_replicas=1, refresh_s=1.0, max_tokens_limit=LIMIT, route_prefix="/scratch")
    yield Served(deploy(serve_cfg, model=SCRATCH), SCRATCH, export_dir)
    serve.delete(SCRATCH)


def client(served: Served):
    import openai

    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference_logprobs(export_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """log-softmax of the exported model's full forward (no cache) over `token_ids`: row i scores token i + 1."""
    from serve.export import load_export

    model = load_export(export_dir).model
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([token_ids]))[0].float(), dim=-1)


def scratch_tokenizer(export_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(export_dir / "tokenizer.json"))


def test_echoed_logprobs_through_the_openai_client_are_the_models_log_softmax(scratch_llm):
    completion = client(scratch_llm).completions.create(model=SCRATCH, prompt=PROMPT, max_tokens=4, temperature=0,
                                                        logprobs=2, echo=True)
    (choice,) = completion.choices
    logprobs, usage = choice.logprobs, completion.usage
    assert choice.text.startswith(PROMPT) and completion.object == "text_completion"
    assert len(logprobs.tokens) == usage.prompt_tokens + usage.completion_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    prompt_ids = scratch_tokenizer(scratch_llm.export_dir).encode(PROMPT).ids
    assert "".join(logprobs.tokens[: len(prompt_ids)]) == PROMPT and usage.prompt_tokens == len(prompt_ids)
    reference = reference_logprobs(scratch_llm.export_dir, prompt_ids)
    expected = [float(reference[i, token]) for i, token in enumerate(prompt_ids[1:])]
    assert logprobs.token_logprobs[1 : len(prompt_ids)] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 2 for top in logprobs.top_logprobs[1:])


def test_lm_eval_loglikelihood_requests_parse_to_the_models_own_scores(scratch_llm):
    """The body lm-eval's local-completions sends for loglikelihood (batched token ids, echo, logprobs 1,
    max_tokens 1), parsed by lm-eval's own parse_logprobs."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tokenizer = scratch_tokenizer(scratch_llm.export_dir)
    context = tokenizer.encode("def add(a, b):\n    return").ids
    continuations = [tokenizer.encode(" a + b").ids, tokenizer.encode(" None").ids]
    body = {"model": SCRATCH, "prompt": [context + c for c in continuations], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    status, outputs, _ = request(scratch_llm.url + "/v1/completions", body)
    assert status == 200, outputs
    assert [c["index"] for c in outputs["choices"]] == [0, 1]
    parsed = LocalCompletionsAPI.parse_logprobs(outputs=outputs, tokens=body["prompt"], ctxlens=[len(context)] * 2)
    for (loglikelihood, is_greedy), continuation in zip(parsed, continuations, strict=True):
        reference = reference_logprobs(scratch_llm.export_dir, context + continuation)
        rows = reference[len(context) - 1 : -1]
        assert loglikelihood == pytest.approx(float(rows.gather(1, torch.tensor(continuation)[:, None]).sum()),
                                              abs=1e-3)
        assert is_greedy == bool((rows.argmax(-1) == torch.tensor(continuation)).all())


def test_lm_eval_generate_until_batches_parse_in_prompt_order(scratch_llm):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tokenizer = scratch_tokenizer(scratch_llm.export_dir)
    prompts = [tokenizer.encode(text).ids for text in ("def main(", "import os\n", "class A:")]
    body = {"model": SCRATCH, "prompt": prompts, "max_tokens": 12, "temperature": 0, "stop": ["\n\n", "<|endoftext|>"],
            "seed": 1234}
    status, outputs, _ = request(scratch_llm.url + "/v1/completions", body)
    assert status == 200, outputs
    texts = LocalCompletionsAPI.parse_generations(outputs=outputs)
    alone = [request(scratch_llm.url + "/v1/completions", {**body, "prompt": p})[1]["choices"][0]["text"]
             for p in prompts]
    assert texts == alone


def test_a_streamed_completion_with_include_usage_through_the_openai_client(scratch_llm):
    openai_client = client(scratch_llm)
    fields = {"model": SCRATCH, "prompt": PROMPT, "max_tokens": 10, "temperature": 0.8, "seed": 3, "logprobs": 1,
              "echo": True}
    plain = openai_client.completions.create(**fields)
    chunks = list(openai_client.completions.create(**fields, stream=True, stream_options={"include_usage": True}))
    *texts, last = chunks
    assert "".join(c.choices[0].text for c in texts) == plain.choices[0].text
    assert [t for c in texts for t in c.choices[0].logprobs.token_logprobs] == plain.choices[0].logprobs.token_logprobs
    assert last.choices == [] and last.usage == plain.usage
    assert texts[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_refusals_reach_the_openai_client_in_its_error_shape(scratch_llm):
    import openai

    openai_client = client(scratch_llm)
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.completions.create(model=SCRATCH, prompt=PROMPT, presence_penalty=0.5)
    assert caught.value.param == "presence_penalty" and "presence_penalty" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.completions.create(model=SCRATCH, prompt=PROMPT, extra_body={"top_k": 5})
    assert caught.value.param == "top_k"
    with pytest.raises(openai.BadRequestError) as caught:  # our BPE model has no chat template
        openai_client.chat.completions.create(model=SCRATCH, messages=MESSAGES)
    assert caught.value.param == "model" and "no chat template" in caught.value.message


@pytest.mark.parametrize("path, method, status, says", [
    ("/v1/embeddings", "POST", 404, "POST /scratch/v1/embeddings is not a route of this server"),
    ("/tokenizer_info", "GET", 404, "is not a route"),  # lm-eval probes it, and must see a failure
    ("/v1/completions", "GET", 405, "/scratch/v1/completions does not take GET (allowed: POST)"),
    ("/v1/models", "DELETE", 405, "does not take DELETE"),
])
def test_unknown_routes_and_methods_answer_in_openais_error_shape(scratch_llm, path, method, status, says):
    req = urllib.request.Request(scratch_llm.url + path, method=method, data=b"{}" if method != "GET" else None)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=30)
    body = json.loads(caught.value.read())
    assert caught.value.code == status and set(body) == {"error"}, body
    assert body["error"]["code"] == status and says in body["error"]["message"], body


def test_models_through_the_openai_client_has_created(scratch_llm):
    (model,) = client(scratch_llm).models.list().data
    assert model.id == SCRATCH and model.object == "model" and model.owned_by == "slipway"
    assert 1_700_000_000 < model.created <= __import__("time").time()


# ------------------------------------------------------- over HTTP: a Hugging Face chat model, vs transformers

def test_chat_through_the_openai_client_plain_and_streamed(served_chat_llm):
    from transformers import AutoTokenizer

    openai_client = client(served_chat_llm)
    fields = {"model": served_chat_llm.model, "messages": MESSAGES, "max_completion_tokens": 12, "temperature": 0.7,
              "seed": 11}
    plain = openai_client.chat.completions.create(**fields)
    (choice,) = plain.choices
    assert plain.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    expected_prompt = AutoTokenizer.from_pretrained(served_chat_llm.export_dir).apply_chat_template(
        MESSAGES, add_generation_prompt=True)["input_ids"]
    assert plain.usage.prompt_tokens == len(expected_prompt)
    chunks = list(openai_client.chat.completions.create(**fields, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_echoed_prompt_logprobs_equal_transformers_log_softmax(served_chat_llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "The quick brown fox jumps over the lazy dog."
    completion = client(served_chat_llm).completions.create(model=served_chat_llm.model, prompt=text, max_tokens=1,
                                                            temperature=0, logprobs=1, echo=True)
    logprobs = completion.choices[0].logprobs
    ids = AutoTokenizer.from_pretrained(served_chat_llm.export_dir)(text)["input_ids"]  # BOS first, as served
    assert completion.usage.prompt_tokens == len(ids)
    model = AutoModelForCausalLM.from_pretrained(served_chat_llm.export_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [float(reference[i, token]) for i, token in enumerate(ids[1:])]
    assert logprobs.token_logprobs[0] is None
    assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-3)
    greedy = int(reference[-1].argmax())
    assert logprobs.token_logprobs[-1] == pytest.approx(float(reference[-1, greedy]), abs=1e-3)


def test_transformers_greedy_generation_from_the_export_equals_the_endpoint(served_chat_llm):
    """After 20 real fine-tuning steps (tests/conftest.py: fine_tuned_llm) the registered directory speaks for the
    served model: transformers' greedy tokens from it are the endpoint's temperature-0 answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served_chat_llm.export_dir)
    model = AutoModelForCausalLM.from_pretrained(served_chat_llm.export_dir, dtype=torch.float32).eval()
    for messages in (MESSAGES, [{"role": "user", "content": "Say hello."}]):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = model.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1]:]
        answer = client(served_chat_llm).chat.completions.create(
            model=served_chat_llm.model, messages=messages, max_completion_tokens=16, temperature=0)
        expected = tokenizer.decode(generated, skip_special_tokens=True)
        assert len(generated) >= 4 and expected.strip()  # an answer to compare, not two empty strings
        assert answer.choices[0].message.content == expected


def test_a_chat_models_prompts_are_profiled_against_its_fine_tuning_prompts(served_chat_llm, ray_session):
    """Registration profiled the fine-tuning data's prompts (each held-out conversation's tokens before its first
    answer) and token ids; the replica counts every request's prompt on the same bins, per version and arm."""
    reference = read_reference(served_chat_llm.export_dir)
    assert list(reference.features) == ["prompt_tokens", "token_id"]
    conversations = reference.features["prompt_tokens"].total
    assert conversations > 0 and reference.features["token_id"].total > conversations
    token_ids = reference.features["token_id"]  # the held-out prompts' most frequent token ids, up to 50 bins
    assert 0 < len(token_ids.categories) <= 50
    assert len(token_ids.categories) == 50 or token_ids.counts[-1] == 0  # fewer: every token has its own bin

    def counted() -> dict:
        rows = bin_rows_from_exposition(scrape(ray_session), model=served_chat_llm.model, version=1,
                                        arm="production")
        return {feature: sum(n for (name, _), n in rows.items() if name == feature)
                for feature in ("prompt_tokens", "token_id")}

    before = settled(counted)  # what earlier tests sent, published
    prompt_tokens = 0
    for turn in range(3):
        messages = [{"role": "user", "content": f"question {turn}: what is {turn} + {turn}?"}]
        status, answer, _ = request(served_chat_llm.url + "/v1/chat/completions",
                                    {"model": served_chat_llm.model, "messages": messages, "max_tokens": 2})
        assert status == 200, answer
        prompt_tokens += answer["usage"]["prompt_tokens"]
    after = settled(counted)
    assert after["prompt_tokens"] - before["prompt_tokens"] == 3
    assert after["token_id"] - before["token_id"] == prompt_tokens
