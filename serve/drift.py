"""Drift between a reference histogram and a live one with the same bins (serve/profiles.py).

Per feature:
  - PSI (population stability index, the symmetric KL divergence of the bin shares), for every feature. The usual
    reading, from credit scoring where it began: under 0.1 no real change, 0.1-0.25 a moderate shift, over 0.25 a
    major one (PSI_MODERATE, PSI_MAJOR). A feature is flagged at PSI_MAJOR.
  - Jensen-Shannon distance (base 2, in [0, 1]) for categorical features: bounded, and defined when a bin is
    empty on one side (a category that vanished), where PSI needs a floor.
  - Kolmogorov-Smirnov distance for numeric features: the largest gap between the two cumulative shares at the
    bin edges (the KS statistic of the binned data, a lower bound on the raw data's).

Sampling noise: with no drift at all, PSI is not zero. PSI is twice a KL divergence to second order, and
2 n KL of a multinomial with B bins is about chi-squared with B - 1 degrees of freedom, so the expected PSI of two
samples of n and m rows from the same distribution is about (B - 1)(1/n + 1/m) (`psi_noise_floor`; the test holds
it against simulation). With 10 bins and a large reference, a window of 360 live rows already has an expected
noise PSI of 0.025, a tenth of PSI_MAJOR; fewer rows than MIN_LIVE_ROWS are never flagged.
"""

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import jensenshannon

from serve.profiles import CategoricalHistogram, Histogram, NumericHistogram

PSI_MODERATE = 0.1
PSI_MAJOR = 0.25
PSI_FLOOR = 1e-4  # the share an empty bin is given in PSI's logarithm
MIN_LIVE_ROWS = 360  # 10 bins: expected noise PSI (psi_noise_floor) at most 0.025, a tenth of PSI_MAJOR


@dataclass(frozen=True)
class FeatureDrift:
    psi: float
    distance: float  # Jensen-Shannon (categorical) or Kolmogorov-Smirnov (numeric)
    distance_kind: str  # "js" or "ks"
    live_rows: int
    drifted: bool  # PSI at or over PSI_MAJOR on at least MIN_LIVE_ROWS live rows


def shares(histogram: Histogram) -> np.ndarray:
    """Each bin's share of the present values (missing values are their own bin, last)."""
    counts = np.asarray([*histogram.counts, histogram.missing], dtype=np.float64)
    total = counts.sum()
    return counts / total if total else counts


def psi(reference: Histogram, live: Histogram) -> float:
    expected, actual = (np.maximum(shares(h), PSI_FLOOR) for h in (reference, live))
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def psi_noise_floor(bins: int, *, reference_rows: int, live_rows: int) -> float:
    """The PSI to expect between two samples of the same distribution (see the module's docstring)."""
    return (bins - 1) * (1 / reference_rows + 1 / live_rows)


def jensen_shannon(reference: CategoricalHistogram, live: CategoricalHistogram) -> float:
    return float(jensenshannon(shares(reference), shares(live), base=2))


def kolmogorov_smirnov(reference: NumericHistogram, live: NumericHistogram) -> float:
    """The largest gap between the cumulative shares of present values, at the bin edges."""
    def cumulative(histogram: NumericHistogram) -> np.ndarray:
        counts = np.asarray(histogram.counts, dtype=np.float64)
        return np.cumsum(counts) / counts.sum() if counts.sum() else np.zeros_like(counts)

    return float(np.max(np.abs(cumulative(reference) - cumulative(live))))


def feature_drift(reference: Histogram, live: Histogram) -> FeatureDrift:
    """Drift of one feature; the two histograms must have the same bins (a live histogram is reference.empty()
    filled with traffic)."""
    if type(reference) is not type(live) or reference.layout != live.layout:
        raise ValueError("drift: the live histogram must have the reference's bins")
    value = psi(reference, live)
    if isinstance(reference, CategoricalHistogram):
        distance, kind = jensen_shannon(reference, live), "js"
    else:
        distance, kind = kolmogorov_smirnov(reference, live), "ks"
    rows = live.total + live.missing
    return FeatureDrift(psi=value, distance=distance, distance_kind=kind, live_rows=rows,
                        drifted=rows >= MIN_LIVE_ROWS and value >= PSI_MAJOR)
