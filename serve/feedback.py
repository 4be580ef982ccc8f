"""What each traffic arm served, and the delayed labels that clients send back for it (POST /v1/feedback).

The ingress replicas report every answered request to one ledger (serve/watcher.py holds it): its request id,
version, arm (production, canary or shadow), latency, status and, for rankers, the scores it answered with.
A client's feedback names a request id; the ledger joins it to every prediction made for that request (the
served one, and a shadow's of the same request), so each arm gets labelled rows for live quality and for the
rollout judge (serve/judge.py).

Bounded, so that a client that never sends feedback, or sends it for unknown ids, costs a fixed amount of memory:
  - predictions wait for their feedback at most `feedback_ttl_s`, and at most `max_predictions` of them are held
    (the oldest go first);
  - feedback that arrives before its prediction (the ingress reports in batches, every REPORT_INTERVAL_S) waits
    `PENDING_S` for it, at most `max_predictions` of them, and is dropped when its prediction never comes;
  - each arm keeps its last `max_samples` outcomes and labelled rows: the judge and `stage=monitor` read windows
    of the recent past, never the whole history.
Labels: a ranker's are the clicked candidates (indices into the request's candidates, every other candidate is a
non-click); an LLM's are one score in [0, 1] per request (thumbs up is 1, down 0).
"""

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

PENDING_S = 30.0  # feedback that came before its prediction waits this long for it


class FeedbackError(ValueError):
    """Feedback that cannot be joined; `field` names the part of the request that is wrong, `status` is the HTTP
    answer (409: the request already has feedback)."""

    def __init__(self, message: str, field: str | None, *, status: int = 400):
        super().__init__(message)
        self.field, self.status = field, status


@dataclass
class _Prediction:
    at: float
    arms: list[tuple[int, str, np.ndarray | None]]  # (version, arm, scores): the served answer, and a shadow's
    labelled: bool = False


@dataclass
class ArmLog:
    """One (version, arm)'s recent outcomes and labelled rows, oldest first."""

    outcomes: deque = field(default_factory=deque)  # (at, latency_ms, status)
    scores: deque = field(default_factory=deque)  # (at, scores) of every scored answer: the label-free estimate
    labelled: deque = field(default_factory=deque)  # (at, scores or None, labels)

    def trim(self, max_samples: int) -> None:
        for log in (self.outcomes, self.scores, self.labelled):
            while len(log) > max_samples:
                log.popleft()


def parse_feedback(payload: dict) -> tuple[str, dict]:
    """(request_id, label) from a POST /v1/feedback body: {"request_id", and one of "clicked" (a list of candidate
    indices), "score" (a number in [0, 1]) or "thumbs" ("up" or "down")}."""
    request_id = payload.get("request_id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
        raise FeedbackError("request_id: expected the id of an answer (its 'id' field), a non-empty string",
                            "request_id")
    given = [key for key in ("clicked", "score", "thumbs") if key in payload]
    if len(given) != 1:
        raise FeedbackError("expected exactly one of 'clicked' (rankers: indices of the clicked candidates), "
                            f"'score' (a number in [0, 1]) or 'thumbs' ('up' or 'down'); got {given or 'none'}",
                            given[1] if len(given) > 1 else None)
    key, value = given[0], payload[given[0]]
    if key == "clicked":
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                  for i in value):
            raise FeedbackError("clicked: expected a list of candidate indices (integers from 0)", "clicked")
        return request_id, {"clicked": sorted(set(value))}
    if key == "score":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise FeedbackError(f"score: expected a number in [0, 1], got {value!r}", "score")
        return request_id, {"score": float(value)}
    if value not in ("up", "down"):
        raise FeedbackError(f"thumbs: expected 'up' or 'down', got {value!r}", "thumbs")
    return request_id, {"score": 1.0 if value == "up" else 0.0}


def _labels_for(label: dict, scores: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
    """(scores, labels) rows of one prediction: a ranker's candidates with 1 where clicked; an LLM answer's score."""
    if "clicked" in label:
        if scores is None:
            raise FeedbackError("clicked: this answer had no candidates to click (send 'score' or 'thumbs')",
                                "clicked")
        if label["clicked"] and label["clicked"][-1] >= len(scores):
            raise FeedbackError(f"clicked: index {label['clicked'][-1]} is beyond the answer's {len(scores)} "
                                "candidates", "clicked")
        labels = np.zeros(len(scores))
        labels[label["clicked"]] = 1.0
        return scores, labels
    return scores if scores is not None and len(scores) == 1 else None, np.asarray([label["score"]])


class Ledger:
    """Predictions, outcomes and labels per (version, arm); see the module's docstring. Not thread-safe: one
    Serve replica's event loop owns it."""

    def __init__(self, *, feedback_ttl_s: float, max_predictions: int, max_samples: int = 100_000,
                 clock: Callable[[], float] = time.time):
        self.feedback_ttl_s, self.max_predictions, self.max_samples = feedback_ttl_s, max_predictions, max_samples
        self.clock = clock
        self.predictions: OrderedDict[str, _Prediction] = OrderedDict()
        self.pending: OrderedDict[str, tuple[float, dict]] = OrderedDict()  # feedback waiting for its prediction
        self.arms: dict[tuple[int, str], ArmLog] = {}
        self.counts = {"joined": 0, "pending": 0, "duplicate": 0, "expired": 0, "invalid": 0}

    def served(self, records: list[dict]) -> None:
        """Record answered requests: {"request_id", "version", "arm", "latency_ms", "status", "scores"?, "at"?}."""
        now = self.clock()
        for record in records:
            at = record.get("at", now)
            log = self.arms.setdefault((int(record["version"]), record["arm"]), ArmLog())
            log.outcomes.append((at, float(record["latency_ms"]), int(record["status"])))
            scores = None if record.get("scores") is None else np.asarray(record["scores"], dtype=np.float64)
            if scores is not None and record["status"] < 400:
                log.scores.append((at, scores))
            if record.get("request_id") and record["status"] < 400:
                self._hold(record["request_id"], at, int(record["version"]), record["arm"], scores)
            log.trim(self.max_samples)
        self._expire(now)

    def _hold(self, request_id: str, at: float, version: int, arm: str, scores: np.ndarray | None) -> None:
        prediction = self.predictions.get(request_id)
        if prediction is None:
            prediction = self.predictions[request_id] = _Prediction(at=at, arms=[])
        prediction.arms.append((version, arm, scores))
        waiting = self.pending.pop(request_id, None)
        if waiting is not None:
            try:
                self._join(request_id, waiting[1], at=waiting[0])
            except FeedbackError:  # counted as invalid; its client got its 202 long ago
                pass
        while len(self.predictions) > self.max_predictions:
            self.predictions.popitem(last=False)
            self.counts["expired"] += 1

    def feedback(self, request_id: str, label: dict) -> str:
        """Join a label to its request's predictions: "joined", or "pending" when the prediction has not been
        reported yet. Raises FeedbackError for a request labelled before or a label that does not fit it."""
        self._expire(self.clock())
        if request_id in self.pending:
            raise FeedbackError(f"request_id: {request_id} already has feedback waiting to be joined", "request_id",
                                status=409)
        if request_id not in self.predictions:
            self.pending[request_id] = (self.clock(), label)
            while len(self.pending) > self.max_predictions:
                self.pending.popitem(last=False)
                self.counts["expired"] += 1
            self.counts["pending"] += 1
            return "pending"
        return self._join(request_id, label, at=self.clock())

    def _join(self, request_id: str, label: dict, *, at: float) -> str:
        prediction = self.predictions[request_id]
        if prediction.labelled:
            self.counts["duplicate"] += 1
            raise FeedbackError(f"request_id: {request_id} already has feedback; each answer takes one", "request_id",
                                status=409)
        try:
            rows = [(version, arm, *_labels_for(label, scores)) for version, arm, scores in prediction.arms]
        except FeedbackError:
            self.counts["invalid"] += 1
            raise
        prediction.labelled = True
        for version, arm, scores, labels in rows:
            log = self.arms.setdefault((version, arm), ArmLog())
            log.labelled.append((at, scores, labels))
            log.trim(self.max_samples)
        self.counts["joined"] += 1
        return "joined"

    def _expire(self, now: float) -> None:
        while self.predictions and next(iter(self.predictions.values())).at < now - self.feedback_ttl_s:
            _, prediction = self.predictions.popitem(last=False)
            self.counts["expired"] += 0 if prediction.labelled else 1
        while self.pending and next(iter(self.pending.values()))[0] < now - PENDING_S:
            self.pending.popitem(last=False)
            self.counts["expired"] += 1

    # ------------------------------------------------------------------------------------------ reading

    def samples(self, *, since: float, until: float | None = None) -> list[dict]:
        """Per (version, arm), what it served in [since, until]: latencies, requests, server errors (5xx), and
        its labelled rows (scores, labels), as plain lists for the rollout judge."""
        until = self.clock() if until is None else until
        out = []
        for (version, arm), log in sorted(self.arms.items()):
            outcomes = [(latency, status) for at, latency, status in log.outcomes if since <= at <= until]
            labelled = [(scores, labels) for at, scores, labels in log.labelled if since <= at <= until]
            out.append({"version": version, "arm": arm, "requests": len(outcomes),
                        "errors": sum(status >= 500 for _, status in outcomes),
                        "latency_ms": [latency for latency, status in outcomes if status < 400],
                        "scores": _flat([scores for scores, _ in labelled if scores is not None]),
                        "labels": _flat([labels for scores, labels in labelled if scores is not None]),
                        "feedback_scores": _flat([labels for scores, labels in labelled if scores is None])})
        return out

    def summary(self, *, window_s: float) -> list[dict]:
        """Per (version, arm) over the last `window_s`: traffic, errors, latency percentiles and live quality."""
        now = self.clock()
        since = now - window_s
        out = []
        for entry in self.samples(since=since, until=now + 1):
            log = self.arms[(entry["version"], entry["arm"])]
            recent = [scores for at, scores in log.scores if at >= since]
            out.append({"version": entry["version"], "arm": entry["arm"], "requests": entry["requests"],
                        "errors": entry["errors"], **_latency_summary(entry["latency_ms"]),
                        **quality(np.asarray(entry["scores"]), np.asarray(entry["labels"])),
                        **estimated_quality(np.concatenate(recent) if recent else np.zeros(0)),
                        **_feedback_summary(entry["feedback_scores"])})
        return out


def _flat(arrays: list) -> list[float]:
    return np.concatenate(arrays).tolist() if arrays else []


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _latency_summary(latency_ms: list[float]) -> dict:
    if not latency_ms:
        return {"latency_p50_ms": None, "latency_p90_ms": None, "latency_p99_ms": None}
    p50, p90, p99 = np.percentile(latency_ms, [50, 90, 99])
    return {"latency_p50_ms": float(p50), "latency_p90_ms": float(p90), "latency_p99_ms": float(p99)}


def _feedback_summary(scores: list[float]) -> dict:
    return {"feedback_rows": len(scores), "feedback_score": float(np.mean(scores)) if scores else None}


def quality(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Live quality of labelled ranker rows: AUC, logloss and expected calibration error."""
    from serve.judge import auc
    from serve.profiles import Calibration

    if not len(scores):
        return {"labelled_rows": 0, "auc": None, "logloss": None, "calibration_error": None}
    clipped = np.clip(scores, 1e-7, 1 - 1e-7)
    logloss = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
    calibration = Calibration()
    calibration.add(scores, labels)
    return {"labelled_rows": len(scores), "auc": auc(scores, labels), "logloss": _finite(logloss),
            "calibration_error": _finite(calibration.expected_calibration_error())}


def estimated_quality(scores: np.ndarray) -> dict:
    """What AUC and logloss would be if the scores were calibrated (each row clicked with its score's
    probability): a label-free estimate of quality while labels are still on their way, in the manner of
    confidence-based performance estimation. It moves when the scores' distribution moves; it cannot see a model
    that became confidently wrong, which only labels show."""
    if not len(scores):
        return {"estimated_auc": None, "estimated_logloss": None}
    p = np.clip(np.sort(scores), 1e-7, 1 - 1e-7)
    entropy = -np.mean(p * np.log(p) + (1 - p) * np.log(1 - p))
    # Expected positive-negative pairs ordered right: row i positive (p_i), a lower-scored row j negative (1 - p_j).
    lower_negatives = np.concatenate([[0.0], np.cumsum(1 - p)[:-1]])
    pairs = p.sum() * (1 - p).sum() - np.sum(p * (1 - p))
    expected_auc = np.sum(p * lower_negatives) / pairs if pairs > 0 else float("nan")
    return {"estimated_auc": _finite(expected_auc), "estimated_logloss": _finite(entropy)}
