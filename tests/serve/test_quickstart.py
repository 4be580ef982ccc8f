"""The Quickstart's main job, `python launch.py +exp=quickstart`, at test size: it trains, promotes into the
registry, serves on localhost, and prints a sample answer and a curl command that works."""

import json
import re
import shlex

import launch
from tests.helpers import TINY_OVERRIDES, compose_config
from tests.serve.http_client import request


def test_quickstart_trains_promotes_and_serves(serve_port, ray_session, data_cache, tmp_path, capsys):
    from ray import serve

    overrides = [*TINY_OVERRIDES[1:], f"paths.root={tmp_path}", f"paths.data_cache={data_cache}",
                 "serve.block=false", f"serve.port={serve_port}", "serve.num_cpus=0.25", "serve.max_replicas=1",
                 "serve.api_key=qs-secret"]
    assert TINY_OVERRIDES[0] == "+exp=llm_tiny"
    try:
        results = launch.run(compose_config(["+exp=quickstart", *overrides]), experiment="quickstart")
        assert [kind for kind, _ in results] == ["run_dir", "promotion", "endpoint"]
        assert results[1][1] == "quickstart v1 promoted"
        url = results[2][1]
        assert url == f"http://127.0.0.1:{serve_port}"
        printed = capsys.readouterr().out
        assert "sample /v1/completions answered by quickstart v1" in printed
        curl = re.search(r"^\s*(curl .*)$", printed, re.M).group(1)
        assert "Authorization: Bearer $SLIPWAY_API_KEY" in curl  # the key itself is never printed
        words = shlex.split(curl)
        body = json.loads(words[words.index("-d") + 1])
        assert request(words[2], body)[0] == 401
        status, answer, _ = request(words[2], body, headers={"authorization": "Bearer qs-secret"})
        assert status == 200 and answer["model_version"] == 1 and answer["choices"][0]["text"]
        assert "qs-secret" not in (results[0][1] / "config.yaml").read_text()
    finally:
        serve.delete("quickstart")
