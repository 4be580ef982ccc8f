"""Binary classification metrics over a whole evaluation set (numpy; no model or torch needed).

AUC is computed exactly from ranks, so it must see every prediction at once: the training loop gathers all
workers' predictions before calling it, because the mean of per-worker AUCs is not the AUC of the union.
It lives in datasets/, below trainers/, because data preparation uses it too: synthetic click logs record the
Bayes-optimal AUC and logloss of their planted probabilities with the same functions that score a model.
"""

import numpy as np

# Probabilities are clipped this far from 0 and 1 before taking logs, so one confident mistake costs a large
# but finite loss instead of inf.
PROB_EPSILON = 1e-7


def check_both_classes(labels: np.ndarray, *, what: str) -> None:
    positives = int(np.count_nonzero(labels))
    if positives == 0 or positives == len(labels):
        raise ValueError(
            f"{what} has {positives} positive labels out of {len(labels)}: AUC is undefined without both classes"
        )


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative, ties
    counting one half (the Mann-Whitney U statistic over average ranks)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0.5
    check_both_classes(labels, what="the evaluation set")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # The average 1-based rank of each distinct score: tied scores share the mean of the ranks they span.
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    positives = int(labels.sum())
    negatives = len(labels) - positives
    rank_sum = float(average_rank[inverse][labels].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def logloss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy in nats."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), PROB_EPSILON, 1.0 - PROB_EPSILON)
    labels = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(labels * np.log(probs) + (1.0 - labels) * np.log1p(-probs)))


def calibration(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean predicted probability over the observed click rate: 1.0 is calibrated, above 1 over-predicts."""
    observed = float(np.mean(labels))
    return float(np.mean(probs)) / observed if observed > 0 else float("nan")


def binary_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"auc": roc_auc(probs, labels), "logloss": logloss(probs, labels),
            "calibration": calibration(probs, labels)}
