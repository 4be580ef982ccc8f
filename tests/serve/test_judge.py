"""The canary judge's statistics (serve/judge.py): alpha spending adds up and spends little early, each metric's
test agrees with scipy and a brute-force definition, clear cases are decided the right way, a whole rollout of
identical arms rarely FAILs (and would FAIL far more often without spending), and every verdict is JSON."""

import itertools
import json

import numpy as np
import pytest
from scipy import stats

from serve.judge import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Verdict,
    auc,
    decide,
    hodges_lehmann,
    judge_auc,
    judge_errors,
    judge_latency,
    judge_mean_score,
    look_alpha,
    resampled_aucs,
    spent_alpha,
)

LATENCY = {"tolerance_ms": 5.0, "tolerance_ratio": 0.1, "min_samples": 100}


def as_json(verdict: Verdict) -> dict:
    """The verdict through strict JSON (no NaN, no numpy types) and back."""
    return json.loads(json.dumps(verdict.to_dict(), allow_nan=False))


def latencies(rng: np.random.Generator, n: int, *, shift_ms: float = 0.0) -> np.ndarray:
    """Lognormal-ish serving latencies: a 12 ms median with a long right tail."""
    return rng.lognormal(np.log(12.0), 0.5, size=n) + shift_ms


def ranker_arm(rng: np.random.Generator, n: int, *, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 0/1 labels; signal 0 gives noise scores (AUC 0.5), larger signal a better ranker."""
    labels = rng.integers(0, 2, size=n)
    return signal * labels + rng.normal(size=n), labels


# --- alpha spending ---


def test_spent_alpha_is_alpha_at_the_end_monotone_and_small_early():
    assert spent_alpha(0.05, 1.0) == 0.05
    fractions = np.linspace(0.01, 1.0, 100)
    spent = [spent_alpha(0.05, t) for t in fractions]
    assert all(a < b for a, b in itertools.pairwise(spent))
    assert spent_alpha(0.05, 0.2) < 0.001
    assert spent_alpha(0.05, 0.01) < 1e-20


@pytest.mark.parametrize("looks", [1, 4, 20])
def test_look_alpha_shares_add_up_to_alpha(looks):
    shares = [look_alpha(0.05, look=k, looks=looks) for k in range(1, looks + 1)]
    assert sum(shares) == pytest.approx(0.05, rel=1e-12)
    assert all(share >= 0 for share in shares)
    assert shares[-1] == max(shares)  # O'Brien-Fleming keeps the most for the end


@pytest.mark.parametrize("call, name", [
    (lambda: spent_alpha(0.0, 0.5), "alpha"),
    (lambda: spent_alpha(1.0, 0.5), "alpha"),
    (lambda: spent_alpha(float("nan"), 0.5), "alpha"),
    (lambda: spent_alpha(0.05, 0.0), "fraction"),
    (lambda: spent_alpha(0.05, 1.5), "fraction"),
    (lambda: look_alpha(0.05, look=5, looks=4), "look"),
    (lambda: look_alpha(0.05, look=0, looks=4), "look"),
    (lambda: look_alpha(0.05, look=1, looks=0), "looks"),
    (lambda: look_alpha(0.05, look=1.5, looks=4), "look"),
])
def test_bad_spending_inputs_name_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


# --- latency ---


def test_a_canary_30_ms_slower_fails_with_the_shift_in_its_interval():
    rng = np.random.default_rng(1)
    verdict = judge_latency(latencies(rng, 300, shift_ms=30), latencies(rng, 300), alpha=0.025, **LATENCY)
    s = as_json(verdict)["statistics"]
    assert verdict.outcome == FAIL and verdict.critical
    assert s["ci_low"] <= 30 <= s["ci_high"] and abs(s["shift_ms"] - 30) < 2
    assert s["p_value"] < 0.025 and not s["subsampled"]
    assert "ms" in verdict.reason and "95% CI" in verdict.reason and "5.0 ms allowed" in verdict.reason


def test_the_same_distribution_passes_within_the_tolerance():
    rng = np.random.default_rng(2)
    verdict = judge_latency(latencies(rng, 1000), latencies(rng, 1000), alpha=0.025, **LATENCY)
    assert verdict.outcome == PASS, verdict.reason
    assert verdict.statistics["allowed_ms"] == 5.0  # 10% of a ~12 ms median is under the 5 ms floor


def test_the_allowance_scales_with_a_slow_production():
    rng = np.random.default_rng(3)
    slow = rng.lognormal(np.log(200.0), 0.3, size=400)
    verdict = judge_latency(slow + 12, rng.lognormal(np.log(200.0), 0.3, size=400), alpha=0.025, **LATENCY)
    assert verdict.statistics["allowed_ms"] == pytest.approx(0.1 * verdict.statistics["median_production_ms"])
    assert verdict.outcome != FAIL  # 12 ms on 200 ms is within the 10% ratio


def test_too_few_latency_samples_are_inconclusive_and_say_how_many_more():
    rng = np.random.default_rng(4)
    verdict = judge_latency(latencies(rng, 60, shift_ms=30), latencies(rng, 300), alpha=0.025, **LATENCY)
    assert verdict.outcome == INCONCLUSIVE
    assert "60 of 100 canary" in verdict.reason and "40 more canary" in verdict.reason
    as_json(verdict)


def test_hodges_lehmann_and_p_agree_with_brute_force_and_scipy():
    rng = np.random.default_rng(5)
    canary, production = latencies(rng, 37, shift_ms=3), latencies(rng, 23)
    differences = sorted(c - p for c in canary for p in production)
    shift, low, high = hodges_lehmann(canary, production, alpha=0.025)
    assert shift == pytest.approx(float(np.median(differences)))
    # k from the normal approximation of the rank index; the interval's ends are the k-th smallest and largest
    k = int(np.floor(37 * 23 / 2 - stats.norm.isf(0.025) * np.sqrt(37 * 23 * (37 + 23 + 1) / 12)))
    assert (low, high) == (pytest.approx(differences[k - 1]), pytest.approx(differences[-k]))
    verdict = judge_latency(canary, production, alpha=0.025, tolerance_ms=1, tolerance_ratio=0, min_samples=10)
    assert verdict.statistics["shift_ms"] == pytest.approx(shift)
    expected = stats.mannwhitneyu(canary, production, alternative="greater")
    assert verdict.statistics["p_value"] == pytest.approx(expected.pvalue)
    assert verdict.statistics["u_statistic"] == expected.statistic


def test_large_arms_are_subsampled_and_say_so():
    rng = np.random.default_rng(6)
    verdict = judge_latency(latencies(rng, 5000), latencies(rng, 2500), alpha=0.025, **LATENCY)
    s = as_json(verdict)["statistics"]
    assert s["subsampled"] and s["n_canary_used"] == s["n_production_used"] == 2000
    assert s["n_canary"] == 5000 and verdict.outcome == PASS


def test_an_interval_too_wide_for_an_early_look_decides_nothing():
    rng = np.random.default_rng(7)
    early = look_alpha(0.05, look=1, looks=20)  # ~2e-18: 20 samples a side bound no interval at that level
    verdict = judge_latency(latencies(rng, 20, shift_ms=30), latencies(rng, 20), alpha=early, tolerance_ms=5,
                            tolerance_ratio=0.1, min_samples=10)
    assert verdict.outcome == INCONCLUSIVE and verdict.statistics["ci_low"] is None
    assert "1 - " in verdict.reason  # the level is written out, not rounded to "100%"
    as_json(verdict)


@pytest.mark.parametrize("kwargs, name", [
    ({"canary_ms": [1.0, float("nan")]}, "canary_ms"),
    ({"production_ms": [[1.0]]}, "production_ms"),
    ({"alpha": 0.5}, "alpha"),
    ({"tolerance_ms": -1}, "tolerance_ms"),
    ({"tolerance_ratio": float("inf")}, "tolerance_ratio"),
    ({"min_samples": 0}, "min_samples"),
    ({"critical": 1}, "critical"),
])
def test_bad_latency_inputs_name_the_argument(kwargs, name):
    args = {"canary_ms": [1.0, 2.0], "production_ms": [1.0, 2.0], "alpha": 0.05, **LATENCY, **kwargs}
    with pytest.raises(ValueError, match=name):
        judge_latency(args.pop("canary_ms"), args.pop("production_ms"), **args)


# --- errors ---


def errors(canary_errors, production_errors, *, total=500, alpha=0.025, tolerance=0.01, min_samples=100):
    return judge_errors(canary_errors=canary_errors, canary_total=total, production_errors=production_errors,
                        production_total=total, alpha=alpha, tolerance=tolerance, min_samples=min_samples)


def test_no_errors_on_either_side_passes():
    verdict = errors(0, 0)
    assert verdict.outcome == PASS, verdict.reason
    s = as_json(verdict)["statistics"]
    assert s["p_value"] == 1.0 and s["ci_high"] == pytest.approx(1 - 0.025 ** (1 / 500))


def test_many_more_canary_errors_fail_with_fishers_p():
    verdict = errors(40, 2)
    assert verdict.outcome == FAIL and "40 of 500" in verdict.reason
    expected = stats.fisher_exact([[40, 460], [2, 498]], alternative="greater").pvalue
    assert verdict.statistics["p_value"] == pytest.approx(expected)


def test_error_rates_a_little_apart_are_inconclusive_and_too_few_requests_too():
    assert errors(9, 4).outcome == INCONCLUSIVE
    short = errors(0, 0, total=50)
    assert short.outcome == INCONCLUSIVE and "50 more canary" in short.reason


@pytest.mark.parametrize("kwargs, name", [
    ({"canary_errors": 6, "canary_total": 5}, "canary_errors"),
    ({"production_total": -1}, "production_total"),
    ({"production_errors": 1.5}, "production_errors"),
    ({"tolerance": 2}, "tolerance"),
    ({"alpha": -0.1}, "alpha"),
])
def test_bad_error_inputs_name_the_argument(kwargs, name):
    args = {"canary_errors": 0, "canary_total": 10, "production_errors": 0, "production_total": 10, "alpha": 0.05,
            "tolerance": 0.01, "min_samples": 5, **kwargs}
    with pytest.raises(ValueError, match=name):
        judge_errors(**args)


# --- AUC and feedback scores ---


def brute_force_auc(scores, labels) -> float:
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@pytest.mark.parametrize("seed", range(5))
def test_rank_auc_agrees_with_the_pairwise_count_ties_half(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40).astype(float)  # coarse scores: many ties
    labels = rng.integers(0, 2, size=40)
    assert auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels))


def test_the_fast_resampled_auc_is_the_auc_of_the_resample():
    rng = np.random.default_rng(8)
    positives, negatives = rng.integers(0, 5, size=30).astype(float), rng.integers(0, 4, size=50).astype(float)
    positive_draws, negative_draws = rng.integers(0, 30, size=(7, 30)), rng.integers(0, 50, size=(7, 50))
    fast = resampled_aucs(positives, negatives, positive_draws=positive_draws, negative_draws=negative_draws)
    for row, value in enumerate(fast):
        scores = np.concatenate([positives[positive_draws[row]], negatives[negative_draws[row]]])
        assert value == pytest.approx(brute_force_auc(scores, np.repeat([1, 0], [30, 50])))


def test_a_noise_canary_fails_against_an_informative_production():
    rng = np.random.default_rng(9)
    canary, production = ranker_arm(rng, 1000, signal=0.0), ranker_arm(rng, 1000, signal=2.0)
    verdict = judge_auc(*canary, *production, alpha=0.025, tolerance=0.02, min_samples=200)
    assert verdict.outcome == FAIL, verdict.reason
    assert verdict.statistics["ci_high"] < -0.02 and "AUC" in verdict.reason
    as_json(verdict)


def test_rankers_of_the_same_quality_pass_within_the_tolerance():
    rng = np.random.default_rng(10)
    # AUC ~0.96: at 3000 rows a side the 95% interval is about +-0.01 wide, so 0.02 is cleared on nearly every seed
    canary, production = ranker_arm(rng, 3000, signal=2.5), ranker_arm(rng, 3000, signal=2.5)
    verdict = judge_auc(*canary, *production, alpha=0.025, tolerance=0.02, min_samples=200)
    assert verdict.outcome == PASS, verdict.reason
    s = verdict.statistics
    assert s["ci_low"] <= s["difference"] <= s["ci_high"] and s["ci_low"] >= -0.02


def test_one_class_or_too_few_rows_is_inconclusive_and_says_which():
    rng = np.random.default_rng(11)
    scores, labels = ranker_arm(rng, 500, signal=1.0)
    one_class = judge_auc(scores, np.ones(500), scores, labels, alpha=0.025, tolerance=0.02, min_samples=100)
    assert one_class.outcome == INCONCLUSIVE and "canary has only positive labels" in one_class.reason
    short = judge_auc(scores, labels, scores[:80], labels[:80], alpha=0.025, tolerance=0.02, min_samples=100)
    assert short.outcome == INCONCLUSIVE and "20 more production" in short.reason
    as_json(one_class), as_json(short)


def test_an_early_looks_tiny_alpha_is_reached_by_the_normal_interval_and_alpha_0_decides_nothing():
    """1e-9 is far beyond 400 resamples' extremes: the interval is the difference -/+ z_{1-alpha} x the resamples'
    standard deviation, so an overwhelming drop still fails at an early look; a look that spends nothing holds."""
    rng = np.random.default_rng(12)
    canary, production = ranker_arm(rng, 1000, signal=0.0), ranker_arm(rng, 1000, signal=2.0)
    early = judge_auc(*canary, *production, alpha=1e-9, tolerance=0.02, min_samples=200, resamples=400)
    s = early.statistics
    assert early.outcome == FAIL, early.reason
    z = stats.norm.isf(1e-9)
    assert s["ci_high"] - s["difference"] == pytest.approx(s["difference"] - s["ci_low"])
    assert (s["ci_high"] - s["ci_low"]) / (2 * z) == pytest.approx(0.02, rel=0.5)  # an AUC's spread at 1000 rows
    nothing = judge_auc(*canary, *production, alpha=0.0, tolerance=0.02, min_samples=200, resamples=400)
    assert nothing.outcome == INCONCLUSIVE and as_json(nothing)["statistics"]["ci_low"] is None


def test_auc_bootstrap_is_fast_enough_for_a_rollout():
    import time

    rng = np.random.default_rng(13)
    canary, production = ranker_arm(rng, 5000, signal=1.0), ranker_arm(rng, 5000, signal=1.0)
    start = time.perf_counter()
    judge_auc(*canary, *production, alpha=0.025, tolerance=0.02, min_samples=200, resamples=1000)
    assert time.perf_counter() - start < 1.0


def test_feedback_scores_fail_when_worse_and_pass_when_alike():
    rng = np.random.default_rng(14)
    worse = judge_mean_score(rng.binomial(1, 0.6, 2000), rng.binomial(1, 0.7, 2000), alpha=0.025, tolerance=0.02,
                             min_samples=100)
    assert worse.metric == "feedback_score" and worse.outcome == FAIL, worse.reason
    alike = judge_mean_score(rng.binomial(1, 0.7, 4000), rng.binomial(1, 0.7, 4000), alpha=0.025, tolerance=0.05,
                             min_samples=100)
    assert alike.outcome == PASS, alike.reason
    short = judge_mean_score([1.0] * 10, [0.0] * 200, alpha=0.025, tolerance=0.05, min_samples=100)
    assert short.outcome == INCONCLUSIVE and "90 more canary" in short.reason
    for verdict in (worse, alike, short):
        as_json(verdict)


@pytest.mark.parametrize("call, name", [
    (lambda: auc([0.1, 0.2], [0, 2]), "labels"),
    (lambda: auc([0.1, 0.2], [0, 1, 1]), "labels"),
    (lambda: judge_auc([0.1], [1], [0.1], [1], alpha=0.05, tolerance=0.02, min_samples=1, resamples=0), "resamples"),
    (lambda: judge_mean_score([0.1, None], [0.1], alpha=0.05, tolerance=0.02, min_samples=1), "canary"),
    (lambda: judge_mean_score([0.1], [0.1], alpha=0.05, tolerance=-0.02, min_samples=1), "tolerance"),
])
def test_bad_quality_inputs_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# --- false alarms over a whole rollout ---

ALPHA = 0.05
LOOKS = 20  # 5 traffic steps x 4 looks each
SEEDS = 200
LATENCY_PER_LOOK, REQUESTS_PER_LOOK, LABELLED_PER_LOOK = 10, 100, 20


def rollout_of_identical_arms(seed: int) -> dict[str, bool]:
    """Which ways of judging FAIL a canary identical to production at any of the rollout's looks. Tolerances are 0,
    the edge of the null hypothesis, where false FAILs are likeliest. "all": latency, errors and AUC, each at
    look_alpha of ALPHA / 3, so that the union bound holds the whole rollout at ALPHA; "latency_spent": latency's
    verdicts of "all" alone; "latency_unspent": latency at its full ALPHA / 3 at every look instead."""
    rng = np.random.default_rng(seed)
    n = LOOKS * LATENCY_PER_LOOK
    canary_ms, production_ms = latencies(rng, n), latencies(rng, n)
    canary_failed, production_failed = (np.cumsum(rng.random(LOOKS * REQUESTS_PER_LOOK) < 0.02) for _ in range(2))
    canary_auc, production_auc = (ranker_arm(rng, LOOKS * LABELLED_PER_LOOK, signal=1.5) for _ in range(2))
    failed = {"all": False, "latency_spent": False, "latency_unspent": False}
    for look in range(1, LOOKS + 1):
        rows, requests, labelled = look * LATENCY_PER_LOOK, look * REQUESTS_PER_LOOK, look * LABELLED_PER_LOOK

        def latency(alpha, rows=rows):
            return judge_latency(canary_ms[:rows], production_ms[:rows], alpha=alpha, tolerance_ms=0.0,
                                 tolerance_ratio=0.0, min_samples=30)

        share = look_alpha(ALPHA / 3, look=look, looks=LOOKS)
        spent = latency(share)
        failed["latency_spent"] |= spent.outcome == FAIL
        if not failed["all"]:
            verdicts = [
                spent,
                judge_errors(canary_errors=int(canary_failed[requests - 1]), canary_total=requests,
                             production_errors=int(production_failed[requests - 1]), production_total=requests,
                             alpha=share, tolerance=0.0, min_samples=100),
                judge_auc(canary_auc[0][:labelled], canary_auc[1][:labelled], production_auc[0][:labelled],
                          production_auc[1][:labelled], alpha=share, tolerance=0.0, min_samples=60,
                          resamples=500, seed=seed),
            ]
            failed["all"] = decide(verdicts, last_look=False)[0] == FAIL
        if not failed["latency_unspent"]:
            failed["latency_unspent"] = latency(ALPHA / 3).outcome == FAIL
    return failed


@pytest.fixture(scope="module")
def false_fail_rates() -> dict[str, float]:
    rollouts = [rollout_of_identical_arms(seed) for seed in range(SEEDS)]
    return {way: sum(r[way] for r in rollouts) / SEEDS for way in rollouts[0]}


def margin(rate: float) -> float:
    """Three binomial standard errors of `rate` over SEEDS rollouts (0.046 for ALPHA)."""
    return 3 * float(np.sqrt(rate * (1 - rate) / SEEDS))


def test_a_rollout_of_identical_arms_rarely_fails(false_fail_rates):
    assert false_fail_rates["all"] <= ALPHA + margin(ALPHA), false_fail_rates
    assert false_fail_rates["latency_spent"] <= ALPHA / 3 + margin(ALPHA / 3), false_fail_rates


def test_testing_every_look_at_the_full_alpha_would_fail_far_more_often(false_fail_rates):
    # Why alpha is spent: 20 looks, each at latency's whole ALPHA / 3, give the null 20 chances to cross, and the
    # false FAILs pile up well past the level each test claims.
    assert false_fail_rates["latency_unspent"] > ALPHA / 3 + margin(ALPHA / 3), false_fail_rates
    assert false_fail_rates["latency_unspent"] > 3 * false_fail_rates["latency_spent"], false_fail_rates


# --- JSON ---


def plain(value) -> bool:
    """Only what json writes back as it was: no numpy scalars (np.float64 passes json.dumps but is no float)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    return value is None or type(value) in (bool, int, float, str)


def test_every_verdict_is_plain_strict_json():
    rng = np.random.default_rng(15)
    short_alpha = look_alpha(0.05, look=1, looks=20)
    canary, production = ranker_arm(rng, 300, signal=1.0), ranker_arm(rng, 300, signal=1.0)
    verdicts = [
        judge_latency(latencies(rng, 300, shift_ms=30), latencies(rng, 300), alpha=0.025, **LATENCY),
        judge_latency(latencies(rng, 300), latencies(rng, 300), alpha=0.025, **LATENCY),
        judge_latency(latencies(rng, 20), latencies(rng, 20), alpha=short_alpha, **{**LATENCY, "min_samples": 5}),
        judge_latency([5.0] * 50, [5.0] * 50, alpha=0.025, **LATENCY),  # all ties
        judge_latency(latencies(rng, 3000), latencies(rng, 10), alpha=0.025, **LATENCY),
        errors(40, 2), errors(0, 0), errors(9, 4), errors(500, 500), errors(0, 0, total=0),
        judge_auc(*canary, *production, alpha=0.025, tolerance=0.02, min_samples=100, resamples=200),
        judge_auc(*canary, *production, alpha=short_alpha, tolerance=0.02, min_samples=100),
        judge_auc(canary[0], np.zeros(300), *production, alpha=0.025, tolerance=0.02, min_samples=100),
        judge_mean_score(rng.random(300), rng.random(300), alpha=0.025, tolerance=0.05, min_samples=100),
        judge_mean_score(rng.random(300), rng.random(300), alpha=0.0, tolerance=0.05, min_samples=100),
    ]
    for v in verdicts:
        document = v.to_dict()
        assert plain(document) and document == as_json(v), document
        assert v.reason and "nan" not in v.reason.lower() and "inf" not in v.reason.lower(), v.reason
    assert {v.outcome for v in verdicts} == {PASS, FAIL, INCONCLUSIVE}
    assert isinstance(spent_alpha(0.05, 0.3), float) and isinstance(look_alpha(0.05, look=2, looks=4), float)


# --- the step ---


def verdict(metric: str, outcome: str, *, critical: bool = True) -> Verdict:
    return Verdict(metric, outcome, critical, f"{metric} {outcome}", {"n_canary": 1})


def test_a_critical_failure_fails_the_step_at_any_look():
    verdicts = [verdict("latency", FAIL), verdict("errors", PASS), verdict("auc", INCONCLUSIVE)]
    outcome, reason = decide(verdicts, last_look=False)
    assert outcome == FAIL and "latency" in reason and "auc" not in reason


def test_every_pass_passes():
    outcome, reason = decide([verdict("latency", PASS), verdict("auc", PASS, critical=False)], last_look=False)
    assert outcome == PASS and "latency" in reason and "auc" in reason


def test_inconclusive_or_a_non_critical_failure_holds_the_step():
    for other in (verdict("auc", INCONCLUSIVE), verdict("feedback_score", FAIL, critical=False)):
        outcome, reason = decide([verdict("latency", PASS), other], last_look=False)
        assert outcome == INCONCLUSIVE and other.metric in reason and "latency" not in reason


def test_at_the_last_look_anything_short_of_pass_fails():
    verdicts = [verdict("latency", PASS), verdict("auc", INCONCLUSIVE),
                verdict("feedback_score", FAIL, critical=False)]
    outcome, reason = decide(verdicts, last_look=True)
    assert outcome == FAIL and reason.startswith("inconclusive after the last look")
    assert "auc (inconclusive)" in reason and "feedback_score (fail, non-critical)" in reason
    assert decide([verdict("latency", PASS)], last_look=True)[0] == PASS


def test_decide_rejects_what_it_cannot_judge():
    with pytest.raises(ValueError, match="verdicts"):
        decide([], last_look=False)
    with pytest.raises(ValueError, match="verdicts"):
        decide([verdict("latency", "maybe")], last_look=False)
    with pytest.raises(ValueError, match="last_look"):
        decide([verdict("latency", PASS)], last_look="yes")
