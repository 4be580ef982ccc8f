"""The watcher: one Serve deployment per application that every ingress replica reports its answers to, so that a
client's delayed feedback joins its prediction whichever replica answered (serve/feedback.py: Ledger).

It publishes live quality per model, version and arm as Prometheus gauges through Ray Serve's metrics API, and
answers the ingress's GET /v1/monitor routes: the per-arm summary that `stage=monitor` prints and the raw samples
that `stage=rollout` judges (serve/rollout.py).

It also holds the test-only fault hook (serve.monitor.fault_injection, off by default): added latency and an
error rate for one version, which scripts/replay_traffic.py sets to show that the judge and the alerts catch a
slow or failing canary. The ingress replicas pick the faults up with each report.
"""

import asyncio
import logging

from ray import serve
from ray.serve import metrics

from serve.feedback import FeedbackError, Ledger
from serve.registry import Registry

logger = logging.getLogger(__name__)

def quality_gauges() -> dict:
    """The live-quality gauges, by the summary key (serve/feedback.py) each publishes; tagged model, version, arm."""
    tags = ("model", "version", "arm")
    return {
        "auc": metrics.Gauge("slipway_live_auc", tag_keys=tags, description="AUC of the arm's labelled rows "
                             "(clicks joined by POST /v1/feedback) over serve.monitor.quality_window_s"),
        "logloss": metrics.Gauge("slipway_live_logloss", tag_keys=tags, description="Log loss of the arm's "
                                 "labelled rows over serve.monitor.quality_window_s"),
        "calibration_error": metrics.Gauge("slipway_live_calibration_error", tag_keys=tags, description="Expected "
                                           "calibration error (10 score bins) of the arm's labelled rows"),
        "estimated_auc": metrics.Gauge("slipway_live_estimated_auc", tag_keys=tags, description="AUC the arm's "
                                       "scores would have were they calibrated: a label-free estimate"),
        "estimated_logloss": metrics.Gauge("slipway_live_estimated_logloss", tag_keys=tags, description="Log loss "
                                           "the arm's scores would have were they calibrated: a label-free estimate"),
        "feedback_score": metrics.Gauge("slipway_live_feedback_score", tag_keys=tags, description="Mean feedback "
                                        "score (LLMs: score, or thumbs up 1 and down 0) of the arm's answers"),
        "labelled_rows": metrics.Gauge("slipway_live_labelled_rows", tag_keys=tags, description="Labelled rows "
                                       "the arm's live quality is computed from"),
        "reference_auc": metrics.Gauge("slipway_reference_auc", tag_keys=tags, description="The version's AUC on "
                                       "its held-out split when it was registered, beside its live AUC"),
    }


class Watcher:
    """Its methods are coroutines: they all run on the replica's event loop, one at a time, so the ledger needs no
    lock (Serve would run plain methods on a thread pool)."""

    def __init__(self, settings: dict):
        monitor = settings["monitor"]
        self.model, self.monitor = settings["model"], monitor
        self.ledger = Ledger(feedback_ttl_s=monitor["feedback_ttl_s"], max_predictions=monitor["max_predictions"])
        self.faults: dict[str, dict] = {}  # version -> {"latency_ms", "error_rate"}, the test-only hook
        self.registry = Registry(settings["registry"])
        self.reference_auc: dict[int, float | None] = {}  # by version, read once from its registry record
        self.gauges = quality_gauges()
        self.feedback_total = metrics.Counter("slipway_feedback", description="Feedback received, by what became "
                                              "of it (joined, pending, duplicate, invalid, expired)",
                                              tag_keys=("model", "outcome"))
        self._counted = dict(self.ledger.counts)
        self._publishing: asyncio.Task | None = None

    async def served(self, records: list[dict]) -> dict:
        """An ingress replica's answered requests since its last report; returns the faults to apply."""
        self.ledger.served(records)
        if self._publishing is None:
            self._publishing = asyncio.get_running_loop().create_task(self._publish())
        return self.faults

    async def feedback(self, request_id: str, label: dict) -> dict:
        """{"status": "joined" | "pending"} or {"error": {"message", "param"}}."""
        try:
            return {"status": self.ledger.feedback(request_id, label)}
        except FeedbackError as err:
            return {"error": {"message": str(err), "param": err.field, "status": err.status}}

    async def summary(self, window_s: float | None = None) -> dict:
        window_s = window_s or self.monitor["quality_window_s"]
        return {"model": self.model, "window_s": window_s, "now": self.ledger.clock(),
                "arms": self.ledger.summary(window_s=window_s), "feedback": dict(self.ledger.counts)}

    async def samples(self, since: float, until: float | None = None) -> dict:
        until = self.ledger.clock() if until is None else until
        return {"model": self.model, "since": since, "until": until,
                "arms": self.ledger.samples(since=since, until=until)}

    async def set_fault(self, version: int, fault: dict | None) -> dict:
        if fault:
            self.faults[str(version)] = fault
        else:
            self.faults.pop(str(version), None)
        logger.warning("fault injection for %s v%d: %s", self.model, version, fault or "cleared")
        return self.faults

    async def _publish(self) -> None:
        while True:
            await asyncio.sleep(self.monitor["publish_interval_s"])
            try:
                self._publish_once()
            except Exception:  # watching must never take serving down
                logger.exception("publishing live quality failed")

    def _publish_once(self) -> None:
        for arm in self.ledger.summary(window_s=self.monitor["quality_window_s"]):
            tags = {"model": self.model, "version": str(arm["version"]), "arm": arm["arm"]}
            values = {**arm, "reference_auc": self._reference_auc(arm["version"])}
            for name, gauge in self.gauges.items():
                if values.get(name) is not None:
                    gauge.set(values[name], tags=tags)
        for outcome, count in self.ledger.counts.items():
            if count > self._counted[outcome]:
                self.feedback_total.inc(count - self._counted[outcome], tags={"model": self.model, "outcome": outcome})
        self._counted = dict(self.ledger.counts)


    def _reference_auc(self, version: int) -> float | None:
        if version not in self.reference_auc:
            try:
                trained = self.registry.version(self.model, version).get("trained_metrics", {})
                self.reference_auc[version] = trained.get("auc")
            except Exception:  # a registry that cannot be read now: no reference gauge, try again next time
                logger.exception("could not read %s v%d's registered metrics", self.model, version)
                return None
        return self.reference_auc[version]


def watcher_deployment():
    """One replica: the ledger is the one place predictions and feedback meet. It does no model work, so it asks
    for no CPU of its own (a small cluster's CPUs go to the model replicas)."""
    return serve.deployment(Watcher).options(name="watcher", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                             max_ongoing_requests=1000)
