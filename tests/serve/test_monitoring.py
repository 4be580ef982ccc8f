"""Live profiles (serve/monitoring.py) without Serve: the drift window, reading a reference back with bad files
named, rebuilding a live profile from bin counters, and calibration. The replicas' side over HTTP and Ray's
metrics endpoint is in tests/serve/test_serving_ranker.py."""

import json

import numpy as np
import pytest

from serve.monitoring import PROFILE_FILE, SCORES, LiveProfile, live_from_bin_rows, profile_drift, read_reference
from serve.profiles import Calibration, Profile, ProfileError


def reference_profile(rows: int = 5000, seed: int = 0) -> Profile:
    rng = np.random.default_rng(seed)
    scores = rng.uniform(size=rows)
    return Profile.reference(numeric={"x": rng.normal(size=rows)}, categorical={"c": rng.integers(0, 5, size=rows)},
                             scores=scores, labels=rng.uniform(size=rows) < scores)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_window_holds_the_intervals_of_its_last_seconds_only():
    reference, clock = reference_profile(), Clock()
    live = LiveProfile(reference, window_s=10, clock=clock)
    rng = np.random.default_rng(1)
    shifted = {"x": rng.normal(3.0, 1.0, size=500), "c": rng.integers(0, 5, size=500)}
    live.add(shifted, scores=rng.uniform(size=500))
    assert live.close_interval().rows == 500
    assert live.drift()["x"].drifted and not live.drift()["c"].drifted
    for _ in range(3):  # unshifted traffic for the next 15 s: the shifted interval leaves the window
        clock.now += 5
        live.add({"x": rng.normal(size=400), "c": rng.integers(0, 5, size=400)}, scores=rng.uniform(size=400))
        live.close_interval()
    window = live.window()
    assert window.rows == 800  # the last two intervals (at 10 s and 15 s)
    drift = live.drift()
    assert not any(d.drifted for d in drift.values()) and drift[SCORES].live_rows == 800


def test_a_live_profile_rebuilt_from_bin_counters_is_the_one_counted():
    reference = reference_profile()
    rng = np.random.default_rng(2)
    live = reference.empty()
    live.add({"x": np.append(rng.normal(size=300), np.nan), "c": rng.integers(0, 8, size=301)},
             scores=rng.uniform(size=301))
    counters = {}
    for name, histogram in [*live.features.items(), (SCORES, live.scores)]:
        counters.update({(name, str(i)): float(rows) for i, rows in enumerate(histogram.counts) if rows})
        if histogram.missing:
            counters[(name, "missing")] = float(histogram.missing)
    rebuilt = live_from_bin_rows(reference, counters)
    assert rebuilt.features == live.features and rebuilt.scores == live.scores
    assert profile_drift(reference, rebuilt)["x"].live_rows == 301
    with pytest.raises(ProfileError, match="feature 'y'"):
        live_from_bin_rows(reference, {("y", "0"): 1.0})
    with pytest.raises(ProfileError, match="bin '99'"):
        live_from_bin_rows(reference, {("x", "99"): 1.0})


def test_a_reference_reads_back_and_a_bad_one_is_refused_naming_file_and_field(tmp_path):
    assert read_reference(tmp_path) is None  # a version registered before profiles: served, not watched
    reference = reference_profile()
    (tmp_path / PROFILE_FILE).write_text(json.dumps(reference.to_dict()))
    back = read_reference(tmp_path)
    assert back == reference and back.calibration.total == 5000
    data = reference.to_dict()
    data["calibration"]["positives"][3] = data["calibration"]["rows"][3] + 1
    (tmp_path / PROFILE_FILE).write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"profile.json.calibration.positives: a bin has more positives"):
        read_reference(tmp_path)
    data = reference.to_dict()
    data["scores"] = data["features"]["c"]
    (tmp_path / PROFILE_FILE).write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"profile.json.scores.kind: expected 'numeric'"):
        read_reference(tmp_path)
    (tmp_path / PROFILE_FILE).write_text("{")
    with pytest.raises(ProfileError, match=r"profile.json: not valid JSON"):
        read_reference(tmp_path)


def test_calibration_bins_measure_the_gap_between_scores_and_outcomes():
    rng = np.random.default_rng(3)
    scores = rng.uniform(size=50_000)
    calibrated, overconfident = Calibration(), Calibration()
    calibrated.add(scores, rng.uniform(size=scores.size) < scores)
    overconfident.add(scores, rng.uniform(size=scores.size) < 0.5)  # outcomes ignore the scores
    assert calibrated.expected_calibration_error() < 0.01
    assert overconfident.expected_calibration_error() == pytest.approx(0.25, abs=0.01)  # mean |s - 0.5|
    halves = Calibration(), Calibration()
    halves[0].add(scores[:20_000], scores[:20_000] > 0.5)
    halves[1].add(scores[20_000:], scores[20_000:] > 0.5)
    whole = Calibration()
    whole.add(scores, scores > 0.5)
    merged = halves[0].merged(halves[1])
    assert merged.rows == whole.rows and merged.positives == whole.positives
    np.testing.assert_allclose(merged.score_sum, whole.score_sum)
    assert np.isnan(Calibration().expected_calibration_error())


def test_prompts_are_read_from_packed_fine_tuning_rows():
    """Each conversation's tokens before its first trained one, from rows that pack several conversations and
    pad the rest (the layout datasets/chat.py prepares)."""
    from datasets.chat import _assemble_rows, _example, prompts_of

    def conversation(first: int, prompt: int, answer: int):
        trained = np.r_[np.zeros(prompt, dtype=bool), np.ones(answer, dtype=bool)]
        return _example(np.arange(first, first + prompt + answer), trained, score=0.0)

    groups = [[conversation(10, 3, 2), conversation(20, 5, 4)], [conversation(30, 7, 1)]]
    rows = _assemble_rows(groups, seq_len=16, pad_id=0)
    prompts = prompts_of(rows["tokens"], rows["loss_mask"], rows["document_ids"])
    assert [p.tolist() for p in prompts] == [[10, 11, 12], [20, 21, 22, 23, 24], list(range(30, 37))]


def test_rows_counted_early_once_many_are_held_are_not_lost_or_counted_twice():
    reference, rng = reference_profile(), np.random.default_rng(4)
    live = LiveProfile(reference, window_s=60)
    live.PENDING_ROWS = 100  # counted on the adding thread from 100 held rows on
    expected = reference.empty()
    for size in (60, 60, 30):
        columns = {"x": rng.normal(size=size), "c": rng.integers(0, 5, size=size)}
        scores = rng.uniform(size=size)
        live.add(columns, scores=scores)
        expected.add(columns, scores=scores)
    closed = live.close_interval()
    assert closed.features == expected.features and closed.scores == expected.scores and closed.rows == 150
