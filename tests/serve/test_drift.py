"""Profiles (serve/profiles.py) and drift statistics (serve/drift.py): histograms filled in pieces merge to the
whole, round-trip through JSON with bad fields named, and the statistics agree with their definitions, scipy,
and the noise floor they claim."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from serve.drift import (
    MIN_LIVE_ROWS,
    PSI_MAJOR,
    feature_drift,
    jensen_shannon,
    kolmogorov_smirnov,
    psi,
    psi_noise_floor,
)
from serve.profiles import CategoricalHistogram, NumericHistogram, Profile, ProfileError


def test_numeric_reference_bins_hold_equal_shares_and_catch_the_rest():
    rng = np.random.default_rng(0)
    values = rng.normal(size=10_000)
    histogram = NumericHistogram.reference(values, bins=10)
    assert len(histogram.edges) == 9 and len(histogram.counts) == 10
    assert all(abs(count - 1000) <= 1 for count in histogram.counts)
    before = list(histogram.counts)
    histogram.add([-100.0, 100.0, math.nan])  # beyond the reference's range: the open-ended bins
    assert histogram.counts[0] == before[0] + 1 and histogram.counts[-1] == before[-1] + 1
    assert histogram.counts[1:-1] == before[1:-1] and histogram.missing == 1
    assert histogram.total == 10_002


def test_a_feature_with_few_values_gets_fewer_bins():
    histogram = NumericHistogram.reference([0, 0, 0, 1, 1, 2] * 100, bins=10)
    assert histogram.edges == [0.0, 1.0, 2.0]  # the values themselves: no bin between two of them
    assert histogram.counts == [0, 300, 200, 100]


def test_histograms_filled_in_pieces_merge_to_the_whole():
    rng = np.random.default_rng(1)
    reference = NumericHistogram.reference(rng.normal(size=2000))
    live = rng.normal(0.3, 1.0, size=900)
    whole = reference.empty()
    whole.add(live)
    first, second = reference.empty(), reference.empty()
    first.add(live[:400])
    second.add(live[400:])
    assert first.merged(second) == whole
    with pytest.raises(ProfileError, match="different edges"):
        whole.merged(NumericHistogram.reference(rng.normal(size=100)))


def test_categorical_bins_are_the_most_frequent_categories_then_all_others():
    values = ["a"] * 50 + ["b"] * 30 + ["c"] * 20 + ["d"] * 5 + [None] * 3
    histogram = CategoricalHistogram.reference(values, top_k=2)
    assert histogram.categories == ["a", "b"] and histogram.counts == [50, 30, 25] and histogram.missing == 3
    live = histogram.empty()
    live.add(["a", "zzz-new", None, 7])  # unseen categories (and numbers, as text) land in "others"
    assert live.counts == [1, 0, 2] and live.missing == 1
    assert live.merged(live).counts == [2, 0, 4]


def test_a_profile_round_trips_through_json_and_bad_fields_are_named():
    rng = np.random.default_rng(2)
    profile = Profile(features={"I1": NumericHistogram.reference(rng.normal(size=500)),
                                "C1": CategoricalHistogram.reference(rng.integers(0, 9, size=500).tolist())})
    text = json.dumps(profile.to_dict())
    assert Profile.from_dict(json.loads(text)) == profile
    assert profile.empty().merged(profile) == profile

    def broken(path: str, value) -> dict:
        data = json.loads(text)
        *parents, last = path.split(".")
        target = data
        for key in parents:
            target = target[key]
        target[last] = value
        return data

    for path, value, named in [("format", 99, "profile: expected an object with format 1"),
                               ("features.I1.edges", [1.0, 0.5], "profile.features.I1.edges"),
                               ("features.I1.counts", [1, 2], "profile.features.I1.counts"),
                               ("features.C1.missing", -1, "profile.features.C1.missing"),
                               ("features.C1.categories", ["x", "x"], "profile.features.C1.categories"),
                               ("features.C1.kind", "text", "profile.features.C1.kind")]:
        with pytest.raises(ProfileError, match=named.replace(".", r"\.")):
            Profile.from_dict(broken(path, value))


def test_psi_is_the_symmetric_divergence_of_the_bin_shares():
    reference = CategoricalHistogram(categories=["a", "b"], counts=[50, 30, 20])
    live = CategoricalHistogram(categories=["a", "b"], counts=[20, 30, 50])
    expected = (0.2 - 0.5) * math.log(0.2 / 0.5) + 0 + (0.5 - 0.2) * math.log(0.5 / 0.2)
    assert psi(reference, live) == pytest.approx(expected)
    assert psi(reference, reference) == 0.0
    assert jensen_shannon(reference, reference) == 0.0
    disjoint = CategoricalHistogram(categories=["a", "b"], counts=[0, 0, 10])
    only_a = CategoricalHistogram(categories=["a", "b"], counts=[10, 0, 0])
    assert jensen_shannon(only_a, disjoint) == pytest.approx(1.0)


def test_binned_ks_is_the_raw_ks_seen_at_the_edges():
    rng = np.random.default_rng(3)
    reference_values, live_values = rng.normal(size=5000), rng.normal(0.5, 1.0, size=2000)
    reference = NumericHistogram.reference(reference_values, bins=20)
    live = reference.empty()
    live.add(live_values)
    raw = stats.ks_2samp(reference_values, live_values).statistic
    binned = kolmogorov_smirnov(reference, live)
    assert binned <= raw + 1e-12 and binned == pytest.approx(raw, abs=0.03)


def test_without_drift_psi_sits_at_its_noise_floor_and_raises_no_flag():
    """200 windows of MIN_LIVE_ROWS rows from the reference's own distribution: their mean PSI is the stated noise
    floor (within 20%), and none is flagged."""
    rng = np.random.default_rng(4)
    reference = NumericHistogram.reference(rng.normal(size=20_000), bins=10)
    values = []
    for _ in range(200):
        live = reference.empty()
        live.add(rng.normal(size=MIN_LIVE_ROWS))
        values.append(feature_drift(reference, live))
    floor = psi_noise_floor(len(reference.counts), reference_rows=20_000, live_rows=MIN_LIVE_ROWS)
    assert np.mean([drift.psi for drift in values]) == pytest.approx(floor, rel=0.2)
    assert not any(drift.drifted for drift in values)
    assert max(drift.psi for drift in values) < PSI_MAJOR


def test_a_shifted_feature_is_flagged_once_there_are_enough_rows():
    rng = np.random.default_rng(5)
    reference = NumericHistogram.reference(rng.normal(size=20_000), bins=10)
    few, enough = reference.empty(), reference.empty()
    few.add(rng.normal(1.0, 1.0, size=MIN_LIVE_ROWS - 1))
    enough.add(rng.normal(1.0, 1.0, size=MIN_LIVE_ROWS))
    assert feature_drift(reference, few).psi >= PSI_MAJOR and not feature_drift(reference, few).drifted
    drift = feature_drift(reference, enough)
    assert drift.drifted and drift.distance_kind == "ks" and drift.distance > 0.3
    skewed = CategoricalHistogram.reference(["a"] * 500 + ["b"] * 500)
    live = skewed.empty()
    live.add(["a"] * 900 + ["b"] * 100)
    assert feature_drift(skewed, live).drifted and feature_drift(skewed, live).distance_kind == "js"
    with pytest.raises(ValueError, match="the reference's bins"):
        feature_drift(reference, skewed)
    other_edges = NumericHistogram(edges=[edge + 0.5 for edge in reference.edges])  # same count, other bins
    other_edges.add(rng.normal(size=MIN_LIVE_ROWS))
    with pytest.raises(ValueError, match="the reference's bins"):
        feature_drift(reference, other_edges)
