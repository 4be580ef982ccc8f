import numpy as np
import pytest

from datasets.metrics import binary_metrics, calibration, logloss, roc_auc


def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + half the ties, over every pair."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    return wins / (len(positives) * len(negatives))


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 500) / 20.0  # many ties
    labels = (rng.random(500) < 0.2 + 0.6 * scores).astype(np.float32)
    assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_auc_extremes():
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert roc_auc(np.full(4, 0.3), labels) == 0.5


def test_auc_without_both_classes_is_an_error():
    with pytest.raises(ValueError, match="0 positive labels out of 3"):
        roc_auc(np.array([0.1, 0.2, 0.3]), np.zeros(3))


def test_logloss_and_calibration():
    probs, labels = np.array([0.8, 0.4]), np.array([1.0, 0.0])
    assert logloss(probs, labels) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert logloss(np.array([0.0]), np.array([1.0])) == pytest.approx(-np.log(1e-7))  # clipped, not inf
    assert calibration(probs, labels) == pytest.approx(0.6 / 0.5)
    assert set(binary_metrics(probs, labels)) == {"auc", "logloss", "calibration"}
