"""serve/api.py on its own: request bodies in, checked values or OpenAI-shaped refusals out. No Ray, no HTTP.

Every refusal must name the field it refuses (`param`, and the message), because that is all an OpenAI client
shows its user; every accepted body must come out with the values generation and ranking will use.
"""

import json
import re
import time

import pytest

from serve import api
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
    assert api.error_from_dict({"message": "boom"}, status=503).param is None
    assert api.error_from_dict({"message": "boom"}, status=503).status == 503


# ----------------------------------------------------------------------------------- /v1/completions

def test_completion_defaults():
    assert _completion() == {"prompt": "def f(", "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "stop": [],
                             "seed": None, "stream": False}


def test_completion_values_as_given():
    params = _completion(model=SERVED, max_tokens=LIMIT, temperature=0, top_p=0.5, stop=["\n\n", "def "],
                         seed=2**63 - 1, stream=True, n=1, best_of=1)
    assert params == {"prompt": "def f(", "max_tokens": LIMIT, "temperature": 0.0, "top_p": 0.5,
                      "stop": ["\n\n", "def "], "seed": 2**63 - 1, "stream": True}
    assert isinstance(params["temperature"], float)  # an integer 0 in JSON still samples as a float


def test_completion_normalizes_what_openai_clients_send():
    assert _completion(prompt=["only one"])["prompt"] == "only one"  # a batch of one prompt
    assert _completion(stop="\n")["stop"] == ["\n"]  # a single stop string
    assert _completion(stop=None, seed=None, temperature=None, max_tokens=None)["max_tokens"] == 16  # null = default
    assert _completion(temperature=2, top_p=1)["temperature"] == 2.0  # both bounds are closed here


@pytest.mark.parametrize("fields, param, says", [
    ({"prompt": None}, "prompt", "prompt is required"),
    ({"prompt": 5}, "prompt", "must be a string, got int"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": ["a", "b"]}, "prompt", "must be a string, got list"),  # a real batch is not supported
    ({"prompt": []}, "prompt", "must be a string, got list"),
    ({"max_tokens": 0}, "max_tokens", f"between 1 and {LIMIT}"),
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
    ({"n": 2}, "n", "only n=1 and best_of=1"),
    ({"prompt": "def \ud800f("}, "prompt", "lone UTF-16 surrogate (\\ud800 at character 4)"),
    ({"stop": ["\n", "\udfff"]}, "stop", "lone UTF-16 surrogate"),
])
def test_completion_refusal_names_the_field(fields, param, says):
    error = _refusal(lambda: _completion(**fields))
    assert (error.status, error.param, error.type) == (400, param, "invalid_request_error")
    assert says in error.message
    assert param in error.message  # the message alone also says which field to fix


def test_a_surrogate_pair_is_text():
    assert _completion(prompt="x = '\ud83d\ude00'".encode("utf-16", "surrogatepass").decode("utf-16"))["prompt"]
    payload = api.parse_json_object(b'{"prompt": "\\ud83d\\ude00"}')  # JSON's escapes of one emoji
    assert api.parse_completion(payload, served=SERVED, max_tokens_limit=LIMIT)["prompt"] == "\U0001f600"


def test_completion_refuses_best_of_above_one():
    # Refused with param "n" (the pair is checked together); the message names best_of.
    error = _refusal(lambda: _completion(best_of=3))
    assert error.status == 400 and "best_of=1" in error.message


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
    assert (params["prompt"], params["stop"], params["max_tokens"], params["temperature"]) == ("a", ["\n"], 8, 0.0)


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

RESULT = {"text": " x):\n", "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 3}


def test_completion_body_is_openai_shaped():
    before = int(time.time())
    body = api.completion_body(RESULT, request_id="cmpl-abc", served=SERVED, version=7)
    assert before <= body.pop("created") <= time.time()
    assert body == {"id": "cmpl-abc", "object": "text_completion", "model": SERVED, "model_version": 7,
                    "choices": [{"index": 0, "text": " x):\n", "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def test_stream_event_is_one_server_sent_event():
    event = api.stream_event({"text": "ab", "finish_reason": None}, request_id="cmpl-1", served=SERVED, version=2)
    assert event.startswith("data: ") and event.endswith("\n\n") and event.count("\n") == 2
    chunk = json.loads(event.removeprefix("data: "))
    assert chunk["id"] == "cmpl-1" and chunk["model_version"] == 2 and chunk["object"] == "text_completion"
    assert chunk["choices"] == [{"index": 0, "text": "ab", "finish_reason": None, "logprobs": None}]
    assert api.STREAM_DONE == "data: [DONE]\n\n"


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
