"""Watching what is served: each version's live traffic counted on the bins of its reference profile, and the
drift between the two, as Prometheus metrics through Ray Serve's metrics API.

A registered version carries its reference profile (`profile.json`, written at registration from the held-out
split: serve/evaluate.py). A replica that loads the version fills a `LiveProfile` with the same bins, from the
model inputs it scores (after encoding, as the model sees them) and the scores it answers with. Every
serve.monitor.publish_interval_s it publishes, per model, version and arm (the deployment's role: production or
canary):
  - the rows counted in each bin since the last publish, as counters (`slipway_profile_bin_rows`), which sum
    across replicas and over any time range: `live_from_bin_rows` rebuilds the merged live histogram of a
    window from them;
  - PSI per feature and of the scores over the replica's last serve.monitor.drift_window_s
    (`slipway_feature_psi`, `slipway_prediction_psi`), with the rows that window holds
    (`slipway_profile_window_rows`): a single replica's view, enough for a dashboard at a glance.
"""

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from serve.drift import FeatureDrift, feature_drift
from serve.profiles import Histogram, Profile, ProfileError

logger = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
SCORES = "score"  # the name prediction drift is published under, beside the features' names


def read_reference(directory: Path) -> Profile | None:
    """A version's reference profile, or None for a version registered without one (before profiles existed)."""
    path = Path(directory) / PROFILE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ProfileError(f"{path}: not valid JSON ({err})") from None
    return Profile.from_dict(data, source=str(path))


class LiveProfile:
    """One version's traffic on its reference's bins, kept per publishing interval so that the last
    `window_s` seconds of it can be compared with the reference.

    `add` is on the request path, so it only keeps the batch's columns; they are counted when the interval
    closes (on the publisher's thread), all of the interval's rows in one numpy pass per feature, or sooner
    once PENDING_ROWS are held. `add` may be called from any thread."""

    PENDING_ROWS = 100_000

    def __init__(self, reference: Profile, *, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.reference, self.window_s, self.clock = reference, window_s, clock
        self._lock = threading.Lock()
        self._pending: list[tuple[dict, object]] = []  # (columns, scores) added since the last count
        self._pending_rows = 0
        self._current = reference.empty()  # counted in the current interval
        self._started = clock()  # when the current interval began
        self._intervals: deque[tuple[float, Profile]] = deque()  # (start, counts) of closed intervals, oldest first

    def add(self, columns: dict, *, scores=None) -> None:
        rows = len(next(iter(columns.values()), ()))
        with self._lock:
            self._pending.append((columns, scores))
            self._pending_rows += rows
            full = self._pending_rows >= self.PENDING_ROWS
        if full:
            self._count_pending()

    def _count_pending(self) -> None:
        with self._lock:
            pending, self._pending, self._pending_rows = self._pending, [], 0
        if not pending:
            return
        columns = {name: np.concatenate([batch[name] for batch, _ in pending]) for name in self.reference.features}
        scores = None if any(s is None for _, s in pending) else np.concatenate([s for _, s in pending])
        counted = self.reference.empty()
        counted.add(columns, scores=scores)
        with self._lock:
            self._current = self._current.merged(counted)

    def close_interval(self) -> Profile:
        """End the current interval and return what it counted (what a publish adds to the counters)."""
        self._count_pending()
        now = self.clock()
        with self._lock:
            closed, self._current = self._current, self.reference.empty()
            self._intervals.append((self._started, closed))
            self._started = now
            while self._intervals and self._intervals[0][0] < now - self.window_s:
                self._intervals.popleft()
        return closed

    def window(self) -> Profile:
        """The rows of the closed intervals that began within the last window_s seconds."""
        with self._lock:
            intervals = [profile for _, profile in self._intervals]
        merged = self.reference.empty()
        for profile in intervals:
            merged = merged.merged(profile)
        return merged

    def drift(self) -> dict[str, FeatureDrift]:
        """Drift of every feature, and of the scores under SCORES, over the window."""
        return profile_drift(self.reference, self.window())


def profile_drift(reference: Profile, live: Profile) -> dict[str, FeatureDrift]:
    drift = {name: feature_drift(histogram, live.features[name]) for name, histogram in reference.features.items()}
    if reference.scores is not None and live.scores is not None:
        drift[SCORES] = feature_drift(reference.scores, live.scores)
    return drift


class ProfileMetrics:
    """The Prometheus side of live profiles (see the module's docstring)."""

    TAGS = ("model", "version", "arm")

    def __init__(self):
        from ray.serve import metrics

        self.bin_rows = metrics.Counter(
            "slipway_profile_bin_rows", description="Rows served whose feature (or score) fell in the bin of the "
            "version's reference profile; bin 'missing' counts absent values", tag_keys=(*self.TAGS, "feature", "bin"))
        self.feature_psi = metrics.Gauge(
            "slipway_feature_psi", description="PSI of a feature between the reference profile and this replica's "
            "last serve.monitor.drift_window_s of traffic (0.25 and over: a major shift)",
            tag_keys=(*self.TAGS, "feature"))
        self.prediction_psi = metrics.Gauge(
            "slipway_prediction_psi", description="PSI of the scores between the reference profile and this "
            "replica's last serve.monitor.drift_window_s of traffic", tag_keys=self.TAGS)
        self.window_rows = metrics.Gauge(
            "slipway_profile_window_rows", description="Rows in this replica's drift window (drift is flagged from "
            "serve/drift.py MIN_LIVE_ROWS on)", tag_keys=self.TAGS)

    def publish(self, live: LiveProfile, *, tags: dict, bin_counters: bool = True) -> None:
        closed = live.close_interval()
        for name, histogram in _histograms(closed) if bin_counters else ():
            for bin_name, rows in _bin_rows(histogram):
                self.bin_rows.inc(rows, tags={**tags, "feature": name, "bin": bin_name})
        window = live.window()
        self.window_rows.set(window.rows, tags=tags)
        if not window.rows:
            return
        for name, drift in profile_drift(live.reference, window).items():
            if name == SCORES:
                self.prediction_psi.set(drift.psi, tags=tags)
            else:
                self.feature_psi.set(drift.psi, tags={**tags, "feature": name})


def _histograms(profile: Profile):
    yield from profile.features.items()
    if profile.scores is not None:
        yield SCORES, profile.scores


def _bin_rows(histogram: Histogram):
    """(bin name, rows) of the bins that counted any: bins by index, and 'missing'."""
    counts = np.asarray(histogram.counts)
    for index in np.flatnonzero(counts).tolist():
        yield str(index), int(counts[index])
    if histogram.missing:
        yield "missing", histogram.missing


# ------------------------------------------------------------------------------------ reading it back

BIN_ROWS_METRIC = "ray_slipway_profile_bin_rows"  # as Ray exports ProfileMetrics.bin_rows (a counter: + "_total")


def bin_rows_from_exposition(text: str, *, model: str, version: int, arm: str | None = None) -> dict:
    """{(feature, bin): rows} summed over every replica (and arm, unless one is named) in a Prometheus text
    exposition (a scrape of Ray's metrics endpoint)."""
    from prometheus_client.parser import text_string_to_metric_families

    rows: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != BIN_ROWS_METRIC:
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_total") and labels.get("model") == model and \
                    labels.get("version") == str(version) and arm in (None, labels.get("arm")):
                key = (labels["feature"], labels["bin"])
                rows[key] = rows.get(key, 0.0) + sample.value
    return rows


def live_from_bin_rows(reference: Profile, rows: dict) -> Profile:
    """The live profile that {(feature, bin): rows} counted (bin counters of one version, or the increase of
    them over a time range), on the reference's bins; bins or features it does not know are refused by name."""
    live = reference.empty()
    histograms = dict(_histograms(live))
    for (name, bin_name), count in rows.items():
        histogram = histograms.get(name)
        if histogram is None:
            raise ProfileError(f"bin counts name feature {name!r}, which the reference profile does not have")
        if bin_name == "missing":
            histogram.missing += int(round(count))
        elif bin_name.isdigit() and int(bin_name) < len(histogram.counts):
            histogram.counts[int(bin_name)] += int(round(count))
        else:
            raise ProfileError(f"bin counts of {name!r} name bin {bin_name!r}; the reference has bins 0.."
                               f"{len(histogram.counts) - 1} and 'missing'")
    return live
