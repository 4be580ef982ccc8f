"""The eval gate's comparison (issue 14 item 7): a non-finite score never passes it, on either side."""

import json
import math

import pytest

from serve import promote

NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("mode,metric", [("min", "val_loss"), ("max", "auc")])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("production", [None, 2.5], ids=["first_model", "against_production"])
def test_a_non_finite_challenger_is_refused_naming_the_metric_and_value(value, production, mode, metric):
    """A diverged first model used to become production because there was nothing to compare it with."""
    decision = promote.decide(metric=metric, mode=mode, challenger=value, production=production, min_improvement=0.0)
    assert not decision.promote
    assert metric in decision.reason and str(value) in decision.reason and "challenger" in decision.reason


@pytest.mark.parametrize("mode,metric", [("min", "val_loss"), ("max", "auc")])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_a_non_finite_production_score_is_refused_rather_than_beaten(value, mode, metric):
    """No comparison with an undefined score: a finite challenger is not promoted silently (a person decides,
    with serve.force=true), whatever the direction of the infinity."""
    decision = promote.decide(metric=metric, mode=mode, challenger=0.7, production=value, min_improvement=0.0)
    assert not decision.promote
    assert "production" in decision.reason and str(value) in decision.reason and "serve.force" in decision.reason


def test_a_refusal_event_with_a_non_finite_score_is_strict_json():
    decision = promote.decide(metric="val_loss", mode="min", challenger=math.nan, production=None,
                              min_improvement=0.0)
    event = decision.to_event(challenger=2, production=None, min_improvement=0.0, forced=False)
    assert event["decision"] == "refused"
    assert json.loads(json.dumps(event, allow_nan=False))["challenger_value"] == "nan"


def test_finite_scores_are_still_compared():
    assert promote.decide(metric="val_loss", mode="min", challenger=1.0, production=2.0, min_improvement=0.5).promote
    assert not promote.decide(metric="auc", mode="max", challenger=0.7, production=0.69, min_improvement=0.05).promote
    assert promote.decide(metric="auc", mode="max", challenger=0.7, production=None, min_improvement=0.0).promote
