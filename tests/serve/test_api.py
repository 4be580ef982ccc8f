"""serve/api.py on its own: request bodies in, checked values or OpenAI-shaped refusals out. No Ray, no HTTP.

Every refusal must name the field it refuses (`param`, and the message), because that is all an OpenAI client
shows its user; every accepted body must come out with the values generation and ranking will use.
"""

import json
import re
import time

import pytest

from serve import api, chat
from serve.generation import MAX_STOP_STRINGS

SERVED = "slipway_llm"
LIMIT = 64  # serve.max_tokens_limit in these tests
MAX_CANDIDATES = 3


def _completion(**fields) -> dict:
    return api.parse_completion({"prompt": "def f(", **fields}, served=SERVED, max_tokens_limit=LIMIT)


def _refusal(call) -> api.RequestError:
    with pytest.raises(api.RequestError) as caught:
        call()
    return caught.value


# ------------------------------------------------------------------------------------------ the body

def test_a_json_object_body_parses():
    assert api.parse_json_object(b'{"prompt": "x", "max_tokens": 3}') == {"prompt": "x", "max_tokens": 3}


@pytest.mark.parametrize("body, says", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),  # not UTF-8 at all
    (b"", "not valid JSON"),
    (b'["prompt"]', "must be a JSON object, got list"),
    (b'"prompt"', "must be a JSON object, got str"),
    (b"null", "must be a JSON object, got NoneType"),
])
def test_a_body_that_is_not_a_json_object_is_refused_as_body(body, says):
    error = _refusal(lambda: api.parse_json_object(body))
    assert (error.status, error.param, error.type) == (400, "body", "invalid_request_error")
    assert says in error.message


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,  # Python's parser gives up with RecursionError
    b'{"prompt": "x", "stop": ' + b"[" * 500 + b'"s"' + b"]" * 500 + b"}",  # parses, but any later step could not
    b'{"a": ' * (api.MAX_JSON_DEPTH + 1) + b"1" + b"}" * (api.MAX_JSON_DEPTH + 1),
], ids=["beyond-the-parser", "within-the-parser", "one-over-the-limit"])
def test_a_deeply_nested_body_is_refused_as_body(body):
    error = _refusal(lambda: api.parse_json_object(body))
    assert (error.status, error.param) == (400, "body") and "nests JSON more than" in error.message


def test_a_body_at_the_depth_limit_parses():
    depth = api.MAX_JSON_DEPTH
    assert api.parse_json_object(b'{"a": ' * depth + b"1" + b"}" * depth)


def test_a_body_over_the_size_limit_is_refused_by_its_declared_length():
    api.check_content_length("1024", limit=1024)
    api.check_content_length(None, limit=1024)  # chunked: counted as it arrives instead
    error = _refusal(lambda: api.check_content_length("52428800", limit=1024))
    assert (error.status, error.param) == (413, "body")
    assert "52428800 bytes" in error.message and "serve.max_body_bytes" in error.message


def test_refusal_body_has_openai_error_shape():
    error = api.RequestError(404, "model \"x\" is not served here", "model", type="not_found_error")
    assert error.body() == {"error": {"message": "model \"x\" is not served here", "type": "not_found_error",
                                      "param": "model", "code": 404}}
    json.dumps(error.body())  # what the router sends must serialize


def test_replica_error_becomes_the_routers_refusal():
    error = api.error_from_dict({"message": "prompt is too long", "param": "prompt"})
    assert (error.status, error.message, error.param) == (400, "prompt is too long", "prompt")
    full = api.error_from_dict(api.overloaded_dict("7 requests wait", retry_after_s=2)["error"])
    assert (full.status, full.param, full.headers, full.type) == (503, None, {"retry-after": "2"}, "server_error")
    assert full.message.startswith("7 requests wait") and "retry after 2 s" in full.message


# ----------------------------------------------------------------------------------- /v1/completions

def test_completion_defaults():
    assert _completion() == {"kind": "completion", "prompts": ["def f("], "max_tokens": 16,
                             "max_tokens_param": "max_tokens", "max_tokens_limit": LIMIT, "temperature": 1.0,
                             "top_p": 1.0, "stop": [], "seed": None, "logprobs": None, "echo": False,
                             "stream": False, "include_usage": False}


def test_completion_values_as_given():
    params = _completion(model=SERVED, max_tokens=LIMIT, temperature=0, top_p=0.5, stop=["\n\n", "def "],
                         seed=2**63 - 1, stream=True, stream_options={"include_usage": True}, n=1, best_of=1,
                         logprobs=5, echo=True, user="someone", presence_penalty=0, frequency_penalty=0.0,
                         logit_bias={}, suffix=None)
    assert params == {"kind": "completion", "prompts": ["def f("], "max_tokens": LIMIT,
                      "max_tokens_param": "max_tokens", "max_tokens_limit": LIMIT, "temperature": 0.0, "top_p": 0.5,
                      "stop": ["\n\n", "def "], "seed": 2**63 - 1, "logprobs": 5, "echo": True, "stream": True,
                      "include_usage": True}
    assert isinstance(params["temperature"], float)  # an integer 0 in JSON still samples as a float


@pytest.mark.parametrize("prompt, prompts", [
    ("x", ["x"]),
    (["only one"], ["only one"]),  # a batch of one prompt
    ([5, 0, 7], [[5, 0, 7]]),  # token ids
    ([[5, 0], [7]], [[5, 0], [7]]),  # a batch of token-id lists, as lm-eval sends them
    (["a", "b"], ["a", "b"]),
    ([[1, 2], "b"], [[1, 2], "b"]),
])
def test_a_prompt_is_a_string_token_ids_or_a_batch_of_either(prompt, prompts):
    assert _completion(prompt=prompt)["prompts"] == prompts


def test_what_lm_eval_sends_for_loglikelihood_is_accepted():
    params = _completion(model=SERVED, prompt=[[101, 7, 9], [101, 7, 10]], temperature=0, max_tokens=1, logprobs=1,
                         seed=1234, echo=True)
    assert (params["prompts"], params["max_tokens"], params["logprobs"], params["echo"]) == \
        ([[101, 7, 9], [101, 7, 10]], 1, 1, True)
    assert _completion(prompt=[1, 2], max_tokens=0, echo=True, logprobs=0)["max_tokens"] == 0  # score, no generation


def test_completion_normalizes_what_openai_clients_send():
    assert _completion(stop="\n")["stop"] == ["\n"]  # a single stop string
    assert _completion(stop=None, seed=None, temperature=None, max_tokens=None)["max_tokens"] == 16  # null = default
    assert _completion(temperature=2, top_p=1)["temperature"] == 2.0  # both bounds are closed here


@pytest.mark.parametrize("fields, param, says", [
    ({"prompt": None}, "prompt", "prompt is required"),
    ({"prompt": 5}, "prompt", "prompt must be a string, a list of token ids, or a list of strings or of token-id "
                              "lists (a batch); got int"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": []}, "prompt", "must not be empty"),
    ({"prompt": ["a", ""]}, "prompt", "prompt[1] must not be empty"),
    ({"prompt": [[1], []]}, "prompt", "prompt[1] must not be empty"),
    ({"prompt": [1, "a"]}, "prompt", "got list"),
    ({"prompt": [["a"]]}, "prompt", "prompt[0] must be a string or a list of token ids; got list"),
    ({"prompt": [1, -2]}, "prompt", "token ids must hold integers in 0.."),
    ({"prompt": [[1, 2**40]]}, "prompt", "prompt[0] as token ids must hold integers"),
    ({"prompt": [True, 1]}, "prompt", "got list"),
    ({"prompt": ["x"] * (api.MAX_PROMPTS + 1)}, "prompt", f"at most {api.MAX_PROMPTS} are allowed"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens=0 generates nothing: it is only allowed with echo=true"),
    ({"max_tokens": -1, "echo": True}, "max_tokens", f"under the minimum: it must be between 0 and {LIMIT}"),
    ({"max_tokens": LIMIT + 1}, "max_tokens", f"max_tokens={LIMIT + 1} is over the limit"),
    ({"max_tokens": "16"}, "max_tokens", 'must be an integer, got "16"'),
    ({"max_tokens": 1.5}, "max_tokens", "must be an integer, got 1.5"),
    ({"max_tokens": True}, "max_tokens", "must be an integer, got true"),
    ({"temperature": -0.1}, "temperature", "temperature=-0.1 must be in [0, 2]"),
    ({"temperature": 2.5}, "temperature", "must be in [0, 2]"),
    ({"temperature": "hot"}, "temperature", 'must be a number, got "hot"'),
    ({"temperature": False}, "temperature", "must be a number, got false"),
    ({"temperature": float("nan")}, "temperature", "must be a number, got NaN"),
    ({"temperature": float("inf")}, "temperature", "must be a number, got Infinity"),
    ({"top_p": 0}, "top_p", "top_p=0 must be in (0, 1]"),  # top_p 0 would keep no token at all
    ({"top_p": 1.01}, "top_p", "must be in (0, 1]"),
    ({"stop": ""}, "stop", "non-empty string"),
    ({"stop": ["\n", ""]}, "stop", "non-empty string"),
    ({"stop": [1]}, "stop", "got [1]"),
    ({"stop": {"a": 1}}, "stop", "non-empty string"),
    ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop", f"at most {MAX_STOP_STRINGS} are allowed"),
    ({"seed": -1}, "seed", "between 0 and"),
    ({"seed": 2**63}, "seed", "is over the limit"),
    ({"seed": "7"}, "seed", "must be an integer"),
    ({"stream": "yes"}, "stream", 'stream must be true or false, got "yes"'),
    ({"stream": 1}, "stream", "got 1"),
    ({"n": 2}, "n", "n=2 is not supported by this server's /v1/completions: leave n out or set it to 1"),
    ({"n": True}, "n", "n=true is not supported"),
    ({"best_of": 3}, "best_of", "leave best_of out or set it to 1"),
    ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty=0.5 is not supported"),
    ({"frequency_penalty": -1}, "frequency_penalty", "set it to 0"),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "leave logit_bias out or set it to {}"),
    ({"suffix": "}"}, "suffix", "suffix=\"}\" is not supported"),
    ({"top_k": 40}, "top_k", "top_k is not supported by this server's /v1/completions; leave it out"),
    ({"max_token": 8}, "max_token", "max_token is not supported"),  # a typo is not silently ignored
    ({"logprobs": 6}, "logprobs", "logprobs=6 is over the limit: it must be between 0 and 5"),
    ({"logprobs": True}, "logprobs", "logprobs must be an integer, got true"),
    ({"echo": "yes"}, "echo", 'echo must be true or false, got "yes"'),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream=true"),
    ({"stream": True, "stream_options": [1]}, "stream_options", "stream_options must be an object"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "must be true or false"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats",
     "stream_options.continuous_usage_stats is not supported"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation",
     "not supported"),
    ({"prompt": "def \ud800f("}, "prompt", "lone UTF-16 surrogate (\\ud800 at character 4)"),
    ({"stop": ["\n", "\udfff"]}, "stop", "lone UTF-16 surrogate"),
])
def test_completion_refusal_names_the_field(fields, param, says):
    error = _refusal(lambda: _completion(**fields))
    assert (error.status, error.param, error.type) == (400, param, "invalid_request_error")
    assert says in error.message
    assert param in error.message  # the message alone also says which field to fix


def test_a_surrogate_pair_is_text():
    assert _completion(prompt="x = '\ud83d\ude00'".encode("utf-16", "surrogatepass").decode("utf-16"))["prompts"]
    payload = api.parse_json_object(b'{"prompt": "\\ud83d\\ude00"}')  # JSON's escapes of one emoji
    assert api.parse_completion(payload, served=SERVED, max_tokens_limit=LIMIT)["prompts"] == ["\U0001f600"]


def test_fields_at_their_neutral_values_or_null_are_accepted():
    assert _completion(n=1, best_of=1, presence_penalty=0.0, frequency_penalty=0, logit_bias={}, suffix="",
                       logprobs=None, echo=None, stream_options=None, user="u")["prompts"] == ["def f("]
    assert _completion(stream=True, stream_options={"include_usage": False, "include_obfuscation": False})[
        "include_usage"] is False


def test_completion_stop_at_the_limit_is_accepted():
    stops = [f"s{i}" for i in range(MAX_STOP_STRINGS)]
    assert _completion(stop=stops)["stop"] == stops


def test_another_model_is_not_found_here():
    error = _refusal(lambda: _completion(model="gpt-4"))
    assert (error.status, error.param, error.type) == (404, "model", "not_found_error")
    assert '"gpt-4"' in error.message and f'"{SERVED}"' in error.message
    assert error.body()["error"]["code"] == 404


def test_refusals_from_raw_bytes():
    """What the router does with a request: bytes -> object -> checked fields. JSON's NaN must not slip through."""
    payload = api.parse_json_object(b'{"prompt": "x", "temperature": NaN}')
    assert _refusal(lambda: api.parse_completion(payload, served=SERVED, max_tokens_limit=LIMIT)).param == "temperature"
    payload = api.parse_json_object(b'{"prompt": ["a"], "stop": "\\n", "max_tokens": 8, "temperature": 0.0}')
    params = api.parse_completion(payload, served=SERVED, max_tokens_limit=LIMIT)
    assert (params["prompts"], params["stop"], params["max_tokens"], params["temperature"]) == (["a"], ["\n"], 8, 0.0)


# ------------------------------------------------------------------------------------ /v1/chat/completions

USER = {"role": "user", "content": "Hi!"}


def _chat(**fields) -> dict:
    return chat.parse_chat({"messages": [USER], **fields}, served=SERVED, max_tokens_limit=LIMIT)


def test_chat_defaults():
    assert _chat() == {"kind": "chat", "messages": [USER], "max_tokens": None, "max_tokens_param": "max_tokens",
                       "max_tokens_limit": LIMIT, "temperature": 1.0, "top_p": 1.0, "stop": [], "seed": None,
                       "logprobs": None, "echo": False, "stream": False, "include_usage": False}


def test_chat_values_as_given():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ann"},
                {"role": "assistant", "content": "Hello.", "refusal": None, "tool_calls": None},
                {"role": "user", "content": [{"type": "text", "text": "Two"}, {"type": "text", "text": "parts"}]}]
    params = chat.parse_chat({"model": SERVED, "messages": messages, "max_completion_tokens": 8, "temperature": 0,
                              "top_p": 0.9, "stop": "\n", "seed": 3, "stream": True,
                              "stream_options": {"include_usage": True}, "n": 1, "logprobs": False, "user": "u",
                              "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "store": False},
                             served=SERVED, max_tokens_limit=LIMIT)
    assert params["messages"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hi", "name": "ann"},
                                  {"role": "assistant", "content": "Hello."},
                                  {"role": "user", "content": "Two\nparts"}]  # text parts joined, as vLLM does
    assert (params["max_tokens"], params["max_tokens_param"], params["stop"], params["seed"]) == \
        (8, "max_completion_tokens", ["\n"], 3)
    assert (params["stream"], params["include_usage"], params["temperature"]) == (True, True, 0.0)


def test_chat_max_tokens_is_the_older_name_of_max_completion_tokens():
    assert (_chat(max_tokens=5)["max_tokens"], _chat(max_tokens=5)["max_tokens_param"]) == (5, "max_tokens")
    assert _chat(max_tokens=5, max_completion_tokens=5)["max_tokens"] == 5


@pytest.mark.parametrize("fields, param, says", [
    ({"messages": None}, "messages", "messages is required"),
    ({"messages": []}, "messages", "messages is required"),
    ({"messages": "Hi"}, "messages", "messages is required"),
    ({"messages": ["Hi"]}, "messages[0]", "messages[0] must be an object"),
    ({"messages": [{"content": "Hi"}]}, "messages[0].role", "messages[0].role=null: role must be one of"),
    ({"messages": [USER, {"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[1].role",
     "tool messages (tool calling) are not supported"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "messages[0].content is required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string or a list of text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", '"image_url" parts are not supported'),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}]},
     "messages[0].tool_calls", "messages[0].tool_calls is not supported"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", "lone UTF-16 surrogate"),
    ({"messages": [{"role": "user", "content": "x", "name": 3}]}, "messages[0].name", "must be a string"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools is not supported by this "
                                                                            "server's /v1/chat/completions"),
    ({"tool_choice": "auto"}, "tool_choice", "tool_choice is not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "response_format is not supported"),
    ({"logprobs": True}, "logprobs", "logprobs=true is not supported"),
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs is not supported"),
    ({"n": 3}, "n", "n=3 is not supported"),
    ({"frequency_penalty": 1.0}, "frequency_penalty", "frequency_penalty=1.0 is not supported"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "logit_bias"),
    ({"prompt": "x"}, "prompt", "prompt is not supported by this server's /v1/chat/completions"),
    ({"max_completion_tokens": LIMIT + 1}, "max_completion_tokens", "is over the limit"),
    ({"max_tokens": 0}, "max_tokens", "under the minimum"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "disagree"),
    ({"temperature": 3}, "temperature", "must be in [0, 2]"),
    ({"stop": ["a"] * (MAX_STOP_STRINGS + 1)}, "stop", "at most"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream=true"),
])
def test_chat_refusal_names_the_field(fields, param, says):
    error = _refusal(lambda: _chat(**fields))
    assert (error.status, error.param, error.type) == (400, param, "invalid_request_error"), error
    assert says in error.message and param in error.message, error.message


def test_chat_for_another_model_is_not_found_here():
    error = _refusal(lambda: _chat(model="gpt-4o"))
    assert (error.status, error.param) == (404, "model")


# ---------------------------------------------------------------------------------------- /v1/rank

def _rank(payload: dict):
    return api.parse_rank(payload, served="slipway_ranker", max_candidates=MAX_CANDIDATES)


def test_rank_returns_context_and_candidates():
    context, candidates = _rank({"model": "slipway_ranker", "context": {"I1": 3.0, "C1": 7},
                                 "candidates": [{"C2": 1}, {"C2": 2, "I2": 0.5}]})
    assert context == {"I1": 3.0, "C1": 7}
    assert candidates == [{"C2": 1}, {"C2": 2, "I2": 0.5}]


def test_rank_context_is_optional():
    assert _rank({"candidates": [{"C1": 1}]}) == ({}, [{"C1": 1}])
    assert _rank({"context": None, "candidates": [{"C1": 1}]})[0] == {}


@pytest.mark.parametrize("payload, param, says", [
    ({"context": ["I1"], "candidates": [{}]}, "context", "context must be an object of features, got list"),
    ({}, "candidates", "candidates must be a non-empty list"),
    ({"candidates": []}, "candidates", "non-empty list"),
    ({"candidates": {"C1": 1}}, "candidates", "non-empty list"),
    ({"candidates": [{}] * (MAX_CANDIDATES + 1)}, "candidates",
     f"candidates has {MAX_CANDIDATES + 1} entries; at most {MAX_CANDIDATES}"),
    ({"candidates": [{"C1": 1}, 7]}, "candidates[1]", "candidates[1] must be an object of features"),
    ({"context": {"I1": 1, "C3": 2}, "candidates": [{"C2": 1}, {"C3": 9, "I1": 2}]}, "candidates[1].C3",
     "feature C3 is given in both context and candidates[1]"),  # the first clash in name order
    ({"model": "other", "candidates": [{}]}, "model", '"other" is not served here'),
])
def test_rank_refusal_names_the_field(payload, param, says):
    error = _refusal(lambda: _rank(payload))
    assert error.param == param and says in error.message
    assert error.status == (404 if param == "model" else 400)


def test_rank_accepts_exactly_max_candidates():
    assert len(_rank({"candidates": [{"C1": i} for i in range(MAX_CANDIDATES)]})[1]) == MAX_CANDIDATES


# ----------------------------------------------------------------------------------------- responses

RESULT = {"choices": [{"index": 0, "text": " x):\n", "finish_reason": "stop", "logprobs": None}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def test_completion_body_is_openai_shaped():
    before = int(time.time())
    body = api.completion_body(RESULT, request_id="cmpl-abc", served=SERVED, version=7)
    assert before <= body.pop("created") <= time.time()
    assert body == {"id": "cmpl-abc", "object": "text_completion", "model": SERVED, "model_version": 7,
                    "choices": [{"index": 0, "text": " x):\n", "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def _events(stream, chunks: list[dict]) -> list:
    """The stream's events as parsed JSON ("[DONE]" as is), each checked to be one server-sent event."""
    events = [event for chunk in chunks for event in stream.events(chunk)] + stream.end()
    assert all(e.startswith("data: ") and e.endswith("\n\n") and e.count("\n") == 2 for e in events)
    return [e[6:-2] if e == api.STREAM_DONE else json.loads(e[6:]) for e in events]


def _chunk(index: int, text: str, finish_reason=None, *, prompt_tokens=3, completion_tokens=1, logprobs=None):
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


def test_a_streamed_completion_is_text_completion_chunks_then_done():
    stream = api.CompletionStream(request_id="cmpl-1", served=SERVED, version=2, include_usage=False)
    events = _events(stream, [_chunk(0, "ab"), _chunk(0, "c", "length", completion_tokens=2)])
    assert events[-1] == "[DONE]"
    assert [e["choices"] for e in events[:-1]] == [
        [{"index": 0, "text": "ab", "finish_reason": None, "logprobs": None}],
        [{"index": 0, "text": "c", "finish_reason": "length", "logprobs": None}]]
    assert all(e["id"] == "cmpl-1" and e["object"] == "text_completion" and e["model_version"] == 2 and
               "usage" not in e for e in events[:-1])


def test_include_usage_adds_a_last_chunk_with_the_usage_of_every_choice():
    stream = api.CompletionStream(request_id="cmpl-1", served=SERVED, version=2, include_usage=True)
    events = _events(stream, [_chunk(0, "a"), _chunk(0, "b", "stop", completion_tokens=2),
                              _chunk(1, "c", "length", prompt_tokens=4, completion_tokens=5)])
    assert [e["usage"] for e in events[:3]] == [None] * 3
    assert events[3]["choices"] == [] and events[3]["usage"] == {"prompt_tokens": 7, "completion_tokens": 7,
                                                                  "total_tokens": 14}
    assert events[4] == "[DONE]"


def test_a_streamed_chat_sends_the_role_then_content_then_the_finish_reason():
    stream = chat.ChatStream(request_id="chatcmpl-1", served=SERVED, version=3, include_usage=True)
    events = _events(stream, [_chunk(0, "Hel"), _chunk(0, "lo"), _chunk(0, "", "stop", completion_tokens=3)])
    deltas = [(c["delta"], c["finish_reason"]) for e in events[:-2] for c in e["choices"]]
    assert deltas == [({"role": "assistant", "content": ""}, None), ({"content": "Hel"}, None),
                      ({"content": "lo"}, None), ({}, "stop")]
    assert all(e["object"] == "chat.completion.chunk" and e["usage"] is None for e in events[:-2])
    assert events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] == 6
    assert events[-1] == "[DONE]"


def test_chat_body_is_openai_shaped():
    body = chat.chat_body(RESULT, request_id="chatcmpl-abc", served=SERVED, version=7)
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-abc" and body["model_version"] == 7
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": " x):\n", "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == RESULT["usage"]


def test_a_stream_error_is_one_event_in_openai_error_shape():
    error = api.RequestError(500, "generation failed", type="server_error")
    event = api.stream_error_event(error)
    assert event.startswith("data: ") and event.endswith("\n\n") and event.count("\n") == 2
    assert json.loads(event.removeprefix("data: ")) == {"error": {"message": "generation failed",
                                                                  "type": "server_error", "param": None,
                                                                  "code": 500}}


def test_completion_ids_are_unique_and_openai_shaped():
    ids = {api.completion_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"cmpl-[0-9a-f]{24}", request_id) for request_id in ids)
