"""The ledger of answers and delayed feedback (serve/feedback.py): joins within the TTL and the size cap, feedback
that comes before its prediction, refusals naming the field, per-arm samples and live quality."""

import numpy as np
import pytest

from serve.feedback import PENDING_S, FeedbackError, Ledger, estimated_quality, parse_feedback, quality
from serve.judge import auc


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(request_id: str, *, version: int = 1, arm: str = "production", scores=(0.9, 0.1), status: int = 200,
           latency_ms: float = 10.0) -> dict:
    return {"request_id": request_id, "version": version, "arm": arm, "latency_ms": latency_ms, "status": status,
            "scores": list(scores) if scores is not None else None}


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ledger(clock):
    return Ledger(feedback_ttl_s=60, max_predictions=3, clock=clock)


def test_clicks_join_their_answer_and_label_every_arm_that_predicted_it(ledger, clock):
    ledger.served([answer("a", scores=[0.8, 0.2, 0.5]), answer("a", version=2, arm="shadow", scores=[0.1, 0.7, 0.4])])
    assert ledger.feedback("a", {"clicked": [1]}) == "joined"
    arms = {(arm["version"], arm["arm"]): arm for arm in ledger.samples(since=0)}
    assert arms[(1, "production")]["scores"] == [0.8, 0.2, 0.5] and arms[(1, "production")]["labels"] == [0, 1, 0]
    assert arms[(2, "shadow")]["scores"] == [0.1, 0.7, 0.4] and arms[(2, "shadow")]["labels"] == [0, 1, 0]
    with pytest.raises(FeedbackError, match="already has feedback") as err:
        ledger.feedback("a", {"clicked": []})
    assert err.value.status == 409 and err.value.field == "request_id"


def test_feedback_before_its_answer_waits_for_it_and_is_dropped_if_it_never_comes(ledger, clock):
    assert ledger.feedback("early", {"clicked": [0]}) == "pending"
    ledger.served([answer("early")])
    assert ledger.samples(since=0)[0]["labels"] == [1, 0]
    assert ledger.feedback("misfit", {"clicked": [5]}) == "pending"
    ledger.served([answer("misfit")])  # two candidates: the waiting label does not fit, and is dropped alone
    assert ledger.counts["invalid"] == 1 and not ledger.predictions["misfit"].labelled
    assert ledger.feedback("never", {"clicked": [0]}) == "pending"
    clock.now += PENDING_S + 1
    ledger.served([])
    assert "never" not in ledger.pending and ledger.counts["expired"] == 1


def test_answers_wait_for_feedback_within_the_ttl_and_the_size_cap(ledger, clock):
    ledger.served([answer("old")])
    clock.now += 61
    ledger.served([answer(name) for name in ("b", "c", "d", "e")])  # the cap is 3: b goes too
    assert list(ledger.predictions) == ["c", "d", "e"]
    assert ledger.feedback("old", {"clicked": [0]}) == "pending"  # unknown again: it may still come


def test_a_label_that_does_not_fit_its_answer_is_refused_by_field(ledger):
    ledger.served([answer("r", scores=[0.5, 0.5])])
    with pytest.raises(FeedbackError, match="beyond the answer's 2 candidates") as err:
        ledger.feedback("r", {"clicked": [2]})
    assert err.value.field == "clicked" and err.value.status == 400
    assert ledger.feedback("r", {"clicked": [1]}) == "joined"  # a wrong label does not use the answer up


@pytest.mark.parametrize(("body", "field"), [
    ({"clicked": [0]}, "request_id"), ({"request_id": "", "clicked": []}, "request_id"),
    ({"request_id": "x"}, None), ({"request_id": "x", "clicked": [0], "score": 1}, "score"),
    ({"request_id": "x", "clicked": [-1]}, "clicked"), ({"request_id": "x", "clicked": "0"}, "clicked"),
    ({"request_id": "x", "score": 1.5}, "score"), ({"request_id": "x", "score": True}, "score"),
    ({"request_id": "x", "thumbs": "sideways"}, "thumbs")])
def test_bad_feedback_bodies_name_their_field(body, field):
    with pytest.raises(FeedbackError) as err:
        parse_feedback(body)
    assert err.value.field == field


def test_llm_feedback_is_a_score_per_answer():
    assert parse_feedback({"request_id": "x", "thumbs": "up"}) == ("x", {"score": 1.0})
    ledger = Ledger(feedback_ttl_s=60, max_predictions=10)
    ledger.served([answer("cmpl-1", scores=None)])
    assert ledger.feedback("cmpl-1", {"score": 0.25}) == "joined"
    [arm] = ledger.samples(since=0)
    assert arm["feedback_scores"] == [0.25] and arm["scores"] == []
    assert ledger.summary(window_s=60)[0]["feedback_score"] == 0.25


def test_samples_count_server_errors_and_keep_only_successful_latencies(ledger, clock):
    ledger.served([answer("a", latency_ms=5), answer(None, status=500, latency_ms=1, scores=None),
                   answer(None, status=400, latency_ms=2, scores=None)])
    [arm] = ledger.samples(since=0)
    assert (arm["requests"], arm["errors"], arm["latency_ms"]) == (3, 1, [5.0])
    assert ledger.samples(since=clock.now + 1)[0]["requests"] == 0


def test_live_quality_and_the_label_free_estimate():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=4000)
    labels = (rng.uniform(size=4000) < scores).astype(float)  # calibrated by construction
    brute = np.mean([(s > t) + 0.5 * (s == t) for s, t in zip(rng.choice(scores[labels == 1], 3000),
                                                               rng.choice(scores[labels == 0], 3000), strict=True)])
    assert auc(scores, labels) == pytest.approx(brute, abs=0.03)
    live, estimate = quality(scores, labels), estimated_quality(scores)
    # Calibrated scores: the estimate from scores alone agrees with the labels' AUC and logloss.
    assert estimate["estimated_auc"] == pytest.approx(live["auc"], abs=0.02)
    assert estimate["estimated_logloss"] == pytest.approx(live["logloss"], abs=0.02)
    assert live["calibration_error"] < 0.05
    assert quality(np.zeros(0), np.zeros(0))["auc"] is None and quality(scores, np.ones(4000))["auc"] is None
