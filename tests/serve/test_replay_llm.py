"""scripts/replay_traffic.py against a served LLM: the held-out conversations' prompts go to /v1/completions as
their token ids, and each answer's score (word F1 against the conversation's own answer) comes back as delayed
feedback, joined to the arm that answered."""

import json
import subprocess
import sys

from tests.helpers import REPO_ROOT
from tests.serve.http_client import request


def test_replayed_prompts_are_answered_and_their_scores_join_as_feedback(served_chat_llm, fine_tuned_llm, tmp_path):
    out = tmp_path / "replay.json"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "replay_traffic.py"), "--url",
                           served_chat_llm.url, "--model", served_chat_llm.model, "--source",
                           str(fine_tuned_llm.run_dir), "--registry", str(fine_tuned_llm.registry), "--requests", "12",
                           "--max-tokens", "8", "--concurrency", "3", "--feedback-delay", "0.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(out.read_text())
    assert summary["errors"] == 0 and summary["requests"] == 12 and summary["unit"] == "completion tokens"
    assert 12 <= summary["counted"] <= 12 * 8, summary
    assert sum(summary["feedback"].values()) == 12 and set(summary["feedback"]) <= {"200", "202"}, summary
    status, monitor, _ = request(served_chat_llm.url + "/v1/monitor")
    [production] = [arm for arm in monitor["arms"] if arm["arm"] == "production"]
    assert status == 200 and production["feedback_rows"] == 12, monitor
    assert 0.0 <= production["feedback_score"] <= 1.0
    assert production["requests"] >= 12 and production["latency_p50_ms"] > 0


def test_word_f1_scores_how_much_of_the_reference_an_answer_says():
    from scripts.replay_traffic import word_f1

    assert word_f1("the cat sat", "the cat sat") == 1.0
    assert word_f1("a dog", "the cat sat") == 0.0
    assert word_f1("the cat", "the cat sat") == 0.8  # precision 1, recall 2/3
    assert word_f1("", "") == 1.0 and word_f1("", "x") == 0.0
