"""Profiles of what a model sees and says: fixed-edge histograms, one per input feature (and, later, of scores and
calibration bins), that a reference split and live traffic fill the same way and that merge by adding counts.

Why fixed edges: a histogram whose edges are set once, from the reference, can be filled in any replica and
merged across replicas and time windows by adding counts; the drift statistics (serve/drift.py) compare two
histograms with the same edges bin by bin.
  - Numeric features: edges at the reference's quantiles (deciles by default), so each bin holds about the same
    share of the reference, the layout PSI is defined on; two open-ended bins catch values beyond the reference's
    range, and missing values (NaN) are counted apart.
  - Categorical features: the reference's most frequent categories each get a bin, and one bin takes every other
    category ("category-frequency buckets"): a category unseen in the reference lands there, so a shift towards new
    categories shows as that bin growing.

Profiles are plain JSON (`to_dict`, `from_dict`), so a registry version can store its reference beside its
weights; reading one back checks every field and names the one that is wrong.
"""

from dataclasses import dataclass, field

import numpy as np

PROFILE_FORMAT = 1


class ProfileError(ValueError):
    """A profile that cannot be read or combined; the message names the field."""


class _Bins:
    """What both kinds of histogram share: counts per bin (`LAYOUT` names the list that defines the bins, one more
    bin than it has entries) and of missing values, merged by adding."""

    KIND: str
    LAYOUT: str
    counts: list[int]
    missing: int

    @property
    def layout(self) -> list:
        """What defines the bins: the edges or the categories."""
        return getattr(self, self.LAYOUT)

    def _check(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.layout) + 1)
        _check_counts(self.counts, len(self.layout) + 1, name="counts")

    def empty(self):
        """The same bins with no counts: what a replica fills with live traffic."""
        return type(self)(**{self.LAYOUT: list(self.layout)})

    def merged(self, other, *, name: str = "histogram"):
        if type(other) is not type(self) or other.layout != self.layout:
            raise ProfileError(f"{name}: cannot merge histograms with different {self.LAYOUT}")
        return type(self)(**{self.LAYOUT: list(self.layout)}, missing=self.missing + other.missing,
                          counts=[a + b for a, b in zip(self.counts, other.counts, strict=True)])

    @property
    def total(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict:
        return {"kind": self.KIND, self.LAYOUT: self.layout, "counts": self.counts, "missing": self.missing}


@dataclass
class NumericHistogram(_Bins):
    """Counts of values in (-inf, e0), [e0, e1), ..., [e_last, inf), and of missing (NaN) values."""

    KIND = "numeric"
    LAYOUT = "edges"
    edges: list[float]
    counts: list[int] = field(default_factory=list)
    missing: int = 0

    def __post_init__(self) -> None:
        self._check()

    @classmethod
    def reference(cls, values, *, bins: int = 10) -> "NumericHistogram":
        """A histogram of `values` with edges at their quantiles (duplicates dropped: a feature with few distinct
        values gets fewer bins), filled with them."""
        values = np.asarray(values, dtype=np.float64)
        present = values[~np.isnan(values)]
        # Quantiles that are data values (not interpolated between two), so discrete features get no bin that
        # can never fill.
        probabilities = np.linspace(0, 1, bins + 1)[1:-1]
        quantiles = np.quantile(present, probabilities, method="inverted_cdf") if present.size else np.array([])
        histogram = cls(edges=[float(edge) for edge in np.unique(quantiles)])
        histogram.add(values)
        return histogram

    def add(self, values) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        nan = np.isnan(values)
        self.missing += int(nan.sum())
        slots = np.searchsorted(np.asarray(self.edges), values[~nan], side="right")
        self.counts = (np.asarray(self.counts) + np.bincount(slots, minlength=len(self.counts))).tolist()


@dataclass
class CategoricalHistogram(_Bins):
    """Counts of the reference's most frequent categories, one bin each, then one bin for every other category,
    and of missing values (None)."""

    KIND = "categorical"
    LAYOUT = "categories"
    categories: list[str]
    counts: list[int] = field(default_factory=list)
    missing: int = 0

    def __post_init__(self) -> None:
        self._check()
        self._index = {category: slot for slot, category in enumerate(self.categories)}

    @classmethod
    def reference(cls, values, *, top_k: int = 20) -> "CategoricalHistogram":
        present = [str(value) for value in values if value is not None]
        names, counts = np.unique(np.asarray(present, dtype=object), return_counts=True) if present else ([], [])
        order = sorted(range(len(names)), key=lambda i: (-counts[i], names[i]))[:top_k]  # ties: by name, stably
        histogram = cls(categories=[str(names[i]) for i in order])
        histogram.add(values)
        return histogram

    def add(self, values) -> None:
        """Count `values` (any iterable; None is missing). Each distinct value is looked up once, so a batch of
        bucket ids costs a few numpy passes, not Python's work per value."""
        if isinstance(values, np.ndarray) and values.dtype.kind in "iu":  # bucket ids: nothing is missing
            distinct, counts = np.unique(values, return_counts=True)
        else:
            array = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=object).ravel()
            missing = np.equal(array, None)
            self.missing += int(missing.sum())
            distinct, counts = np.unique(array[~missing].astype(str), return_counts=True)
        other = len(self.categories)
        for value, count in zip(distinct.tolist(), counts.tolist(), strict=True):
            self.counts[self._index.get(str(value), other)] += count


Histogram = NumericHistogram | CategoricalHistogram


CALIBRATION_BINS = 10


@dataclass
class Calibration:
    """Scores against outcomes in equal-width score bins [0, 0.1), ..., [0.9, 1]: per bin the rows, the sum of
    their scores and how many were positive. Filled from labelled rows (the held-out split; live feedback)."""

    rows: list[int] = field(default_factory=lambda: [0] * CALIBRATION_BINS)
    score_sum: list[float] = field(default_factory=lambda: [0.0] * CALIBRATION_BINS)
    positives: list[int] = field(default_factory=lambda: [0] * CALIBRATION_BINS)

    def __post_init__(self) -> None:
        _check_counts(self.rows, CALIBRATION_BINS, name="rows")
        _check_counts(self.positives, CALIBRATION_BINS, name="positives")
        if not isinstance(self.score_sum, list) or len(self.score_sum) != CALIBRATION_BINS or \
                not all(_is_number(value) and value >= 0 for value in self.score_sum):
            raise ProfileError(f"score_sum: expected {CALIBRATION_BINS} sums of scores (numbers >= 0)")
        if any(p > r for p, r in zip(self.positives, self.rows, strict=True)):
            raise ProfileError("positives: a bin has more positives than rows")

    def add(self, scores, labels) -> None:
        scores = np.clip(np.asarray(scores, dtype=np.float64).ravel(), 0.0, 1.0)
        labels = np.asarray(labels, dtype=np.float64).ravel() > 0.5
        slots = np.minimum((scores * CALIBRATION_BINS).astype(np.int64), CALIBRATION_BINS - 1)
        self.rows = (np.asarray(self.rows) + np.bincount(slots, minlength=CALIBRATION_BINS)).tolist()
        self.positives = (np.asarray(self.positives) + np.bincount(slots[labels], minlength=CALIBRATION_BINS)).tolist()
        sums = np.bincount(slots, weights=scores, minlength=CALIBRATION_BINS)
        self.score_sum = (np.asarray(self.score_sum) + sums).tolist()

    def merged(self, other: "Calibration") -> "Calibration":
        return Calibration(rows=[a + b for a, b in zip(self.rows, other.rows, strict=True)],
                           score_sum=[a + b for a, b in zip(self.score_sum, other.score_sum, strict=True)],
                           positives=[a + b for a, b in zip(self.positives, other.positives, strict=True)])

    @property
    def total(self) -> int:
        return sum(self.rows)

    def expected_calibration_error(self) -> float:
        """The row-weighted mean gap between a bin's mean score and its positive rate (NaN with no rows)."""
        if not self.total:
            return float("nan")
        gaps = [abs(s - p) for r, s, p in zip(self.rows, self.score_sum, self.positives, strict=True) if r]
        return float(sum(gaps) / self.total)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "score_sum": self.score_sum, "positives": self.positives}


@dataclass
class Profile:
    """One histogram per feature, filled from the same rows; with a scoring model's outputs, the histogram of its
    scores (prediction drift) and, where the rows were labelled, its calibration."""

    features: dict[str, Histogram]
    scores: NumericHistogram | None = None
    calibration: Calibration | None = None

    @classmethod
    def reference(cls, *, numeric: dict, categorical: dict, scores=None, labels=None, top_k: int = 20) -> "Profile":
        """The reference of rows given as columns: numeric and categorical feature values by name (categorical
        ones binned by their `top_k` most frequent values), and a model's `scores` of them (with their `labels`,
        the calibration too)."""
        features = {name: NumericHistogram.reference(values) for name, values in numeric.items()}
        features.update({name: CategoricalHistogram.reference(values, top_k=top_k)
                         for name, values in categorical.items()})
        profile = cls(features=features, scores=None if scores is None else NumericHistogram.reference(scores))
        if labels is not None:
            profile.calibration = Calibration()
            profile.calibration.add(scores, labels)
        return profile

    def add(self, columns: dict, *, scores=None, labels=None) -> None:
        """Count rows given as columns by feature name (every feature of the profile), with their scores and
        labels where the profile has those."""
        absent = sorted(set(self.features) - set(columns))
        if absent:
            raise ProfileError(f"rows lack the profile's features {absent}")
        for name, histogram in self.features.items():
            histogram.add(columns[name])
        if self.scores is not None and scores is not None:
            self.scores.add(scores)
        if self.calibration is not None and labels is not None:
            self.calibration.add(scores, labels)

    def empty(self) -> "Profile":
        """The same edges and categories with no counts: what a replica fills with live traffic."""
        return Profile(features={name: histogram.empty() for name, histogram in self.features.items()},
                       scores=None if self.scores is None else self.scores.empty(),
                       calibration=None if self.calibration is None else Calibration())

    @property
    def rows(self) -> int:
        """Rows profiled (every feature histogram counts each row once)."""
        first = next(iter(self.features.values()), None)
        return 0 if first is None else first.total + first.missing

    def merged(self, other: "Profile") -> "Profile":
        if set(other.features) != set(self.features):
            differing = sorted(set(self.features) ^ set(other.features))
            raise ProfileError(f"cannot merge profiles of different features: {differing}")
        if (self.scores is None) != (other.scores is None) or (self.calibration is None) != (other.calibration is None):
            raise ProfileError("cannot merge a profile with scores or calibration and one without")
        return Profile(features={name: histogram.merged(other.features[name], name=f"features.{name}")
                                 for name, histogram in self.features.items()},
                       scores=None if self.scores is None else self.scores.merged(other.scores, name="scores"),
                       calibration=None if self.calibration is None else self.calibration.merged(other.calibration))

    def to_dict(self) -> dict:
        data = {"format": PROFILE_FORMAT, "features": {name: h.to_dict() for name, h in self.features.items()}}
        if self.scores is not None:
            data["scores"] = self.scores.to_dict()
        if self.calibration is not None:
            data["calibration"] = self.calibration.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: object, *, source: str = "profile") -> "Profile":
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{source}: expected an object with format {PROFILE_FORMAT}")
        features = data.get("features")
        if not isinstance(features, dict):
            raise ProfileError(f"{source}.features: expected an object of feature name -> histogram")
        scores = data.get("scores")
        if scores is not None:
            scores = _histogram_from_dict(scores, key=f"{source}.scores")
            if not isinstance(scores, NumericHistogram):
                raise ProfileError(f"{source}.scores.kind: expected 'numeric'")
        return cls(features={name: _histogram_from_dict(value, key=f"{source}.features.{name}")
                             for name, value in features.items()},
                   scores=scores, calibration=_calibration_from_dict(data.get("calibration"),
                                                                     key=f"{source}.calibration"))


def _calibration_from_dict(data: object, *, key: str) -> Calibration | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ProfileError(f"{key}: expected an object with rows, score_sum and positives")
    try:
        return Calibration(rows=data.get("rows"), score_sum=data.get("score_sum"), positives=data.get("positives"))
    except ProfileError as err:
        raise ProfileError(f"{key}.{err}") from None


def _histogram_from_dict(data: object, *, key: str) -> Histogram:
    if not isinstance(data, dict) or data.get("kind") not in ("numeric", "categorical"):
        raise ProfileError(f"{key}.kind: expected 'numeric' or 'categorical'")
    missing = data.get("missing")
    if not isinstance(missing, int) or isinstance(missing, bool) or missing < 0:
        raise ProfileError(f"{key}.missing: expected a count (an integer >= 0), got {missing!r}")
    try:
        if data["kind"] == "numeric":
            edges = data.get("edges")
            if not isinstance(edges, list) or not all(_is_number(edge) for edge in edges) or \
                    any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
                raise ProfileError(f"{key}.edges: expected increasing finite numbers")
            return NumericHistogram(edges=[float(edge) for edge in edges], counts=data.get("counts"), missing=missing)
        categories = data.get("categories")
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories) or \
                len(set(categories)) != len(categories):
            raise ProfileError(f"{key}.categories: expected distinct strings")
        return CategoricalHistogram(categories=categories, counts=data.get("counts"), missing=missing)
    except ProfileError as err:
        raise ProfileError(str(err) if str(err).startswith(key) else f"{key}.{err}") from None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _check_counts(counts: object, expected: int, *, name: str) -> None:
    if not isinstance(counts, list) or len(counts) != expected or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ProfileError(f"{name}: expected {expected} counts (integers >= 0)")
