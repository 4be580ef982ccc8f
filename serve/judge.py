"""The statistics of an automatic canary judge: a canary model version against production, served at the same time.

A rollout shifts traffic in steps and, within a step, looks at the evidence several times. At every look each
metric gets a Verdict (PASS, FAIL or INCONCLUSIVE) and `decide` turns the verdicts into the step's outcome. The
burden of proof is deliberately two-sided: FAIL needs evidence that the canary is worse by more than tolerated,
PASS needs evidence that it is not, and anything in between holds the step to collect more.

Alpha spending (why): a rollout looks again and again at growing data. Testing every look at the full alpha gives
the canary a fresh chance of a false FAIL at each one (tests/serve/test_judge.py measures about four times alpha
over 20 looks, against under a third of alpha with spending). `spent_alpha` is the Lan-DeMets O'Brien-Fleming-type
spending function
    alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t)),    t = the information fraction in (0, 1],
which spends almost nothing early (alpha(0.2) < 0.001 for alpha = 0.05), when a few samples would make any
decision noisy, and keeps nearly all of alpha for the end. `look_alpha` is the share spent at one look,
alpha(k/K) - alpha((k-1)/K); the shares of the K planned looks add up to alpha, and a test at look k is run at
its share. By the union bound the chance that a metric FAILs falsely at any look of the rollout is then at most
alpha (up to each test's own approximations: the normal approximation of the rank statistics, the bootstrap).
The price is that early looks mostly hold: only overwhelming evidence decides them. The same bound across
metrics: with several critical metrics, give each alpha / (their number) to hold the whole rollout's chance of any
false FAIL at alpha. The PASS side uses the same level, so a worse canary's chance of a false PASS is bounded in
the same way. An alpha of 0 (an early look of a very long plan, whose share underflows) is accepted and can
decide nothing.

Latency (`judge_latency`): Mann-Whitney U, one-sided (canary slower): latencies are skewed and heavy-tailed, and a
rank test needs no normality. Its effect size is the Hodges-Lehmann shift, the median of all pairwise differences
canary - production, with the distribution-free two-sided (1 - 2 alpha) interval between the k-th smallest and
k-th largest pairwise difference, k = floor(n m / 2 - z_{1 - alpha} sqrt(n m (n + m + 1) / 12)) (normal
approximation of the rank index; k < 1 leaves the interval unbounded). The n m differences are held in memory, so
an arm over MAX_PAIRWISE_ARM (2000) samples is replaced by a seeded random subsample of that many (at most 4 M
differences, 32 MB); the test and the interval use the same samples, and statistics["subsampled"] says so.
The allowance is max(tolerance_ms, tolerance_ratio x production's median): the ratio judges a slow endpoint
relatively, the floor keeps a fast one from failing for a change no user could notice.
    FAIL          p < alpha and ci_low > allowed (confidently slower by more than allowed);
    PASS          ci_high <= allowed;
    INCONCLUSIVE  otherwise, or fewer than min_samples in either arm.

Errors (`judge_errors`): Fisher's exact test, one-sided (canary's error rate higher): exact at the zero and tiny
counts that healthy services produce, where a normal approximation breaks down.
    FAIL          p < alpha and canary_rate - production_rate > tolerance;
    PASS          the one-sided Clopper-Pearson (1 - alpha) upper bound of canary's rate <= production_rate +
                  tolerance (production's rate is taken as known: it usually serves far more of the traffic);
    INCONCLUSIVE  otherwise, or fewer than min_samples requests in either arm.

Quality (`judge_auc`, `judge_mean_score`): non-inferiority of canary - production, the difference of ROC AUCs (for
rankers, on requests whose label has arrived) or of mean feedback scores (for LLMs: thumbs up 1, down 0), with a
two-sided (1 - 2 alpha) normal bootstrap interval: the observed difference -/+ z_{1 - alpha} times the standard
deviation of the resampled differences (a percentile interval cannot reach an early look's tiny alpha: that
quantile lies beyond every affordable resample). The arms are different requests, so each arm is resampled on its
own; AUC resamples are stratified by label so each one keeps both classes (and its AUC is defined).
    FAIL          ci_high < -tolerance (confidently worse by more than tolerated);
    PASS          ci_low >= -tolerance (confidently no worse than tolerated);
    INCONCLUSIVE  otherwise; or an arm with fewer than min_samples rows, or with one class only (AUC).

The step (`decide`): FAIL when any critical metric FAILs (it fails the rollout alone, at any look); PASS when every
metric PASSes; otherwise INCONCLUSIVE (hold and collect more) - a non-critical FAIL only holds the step - except
at the last look, where anything short of PASS FAILs: a canary that cannot show it is as good is not promoted.

Every number a Verdict carries is a plain int or float (JSON-serialisable); what is undefined is None, never NaN.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
from scipy import special, stats

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
OUTCOMES = (PASS, FAIL, INCONCLUSIVE)
MAX_PAIRWISE_ARM = 2000  # latency: the n m pairwise differences live in memory (2000 x 2000 = 32 MB)
Estimate = tuple[float, float | None, float | None]  # a point estimate and its interval's ends (None: unbounded)
BOOTSTRAP_CELLS = 1_000_000  # bootstrap: resamples x rows drawn at once: memory stays bounded for large arms


@dataclass(frozen=True)
class Verdict:
    metric: str  # "latency", "errors", "auc", "feedback_score"
    outcome: str  # PASS / FAIL / INCONCLUSIVE
    critical: bool
    reason: str  # one human sentence with the numbers
    statistics: dict = field(default_factory=dict)  # JSON-able evidence

    def to_dict(self) -> dict:
        return {"metric": self.metric, "outcome": self.outcome, "critical": self.critical, "reason": self.reason,
                "statistics": dict(self.statistics)}


# --- input checks: a bad argument is named, since a judge fed garbage would otherwise pass or fail silently ---


def _real(name: str, value, *, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
    return value


def _count(name: str, value, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _alpha(alpha) -> float:
    # Below 0.5 so that the two-sided (1 - 2 alpha) intervals exist; 0 is a look that spends nothing.
    return _real("alpha", alpha, low=0.0, high=0.5, high_open=True)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _sample(name: str, values) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a 1-D sequence of numbers: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(array)))} non-finite values")
    return array


def _labels(name: str, values, *, rows: int, scores_name: str) -> np.ndarray:
    array = _sample(name, values)
    if len(array) != rows:
        raise ValueError(f"{name} has {len(array)} rows but {scores_name} has {rows}")
    if not np.all((array == 0) | (array == 1)):
        raise ValueError(f"{name} must hold only 0 and 1 (pass only the rows whose label has arrived)")
    return array == 1


def _number(value) -> float | None:
    """A plain float for JSON, None where the statistic is undefined (never NaN or inf)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _confidence(alpha: float, *, sides: int = 2) -> str:
    """The level 1 - sides x alpha, written so that a tiny spent alpha does not read as "100%"."""
    tail = sides * alpha
    return f"{100 * (1 - tail):.6g}%" if tail >= 1e-4 else f"1 - {tail:.2g}"


def _p(p: float | None) -> str:
    return "p undefined" if p is None else f"p={p:.2g}"


def _too_few(what: str, min_samples: int, **counts: int) -> str | None:
    """The INCONCLUSIVE reason when an arm has fewer than min_samples, saying how many more each needs."""
    if all(n >= min_samples for n in counts.values()):
        return None
    have = " and ".join(f"{n} of {min_samples} {arm} {what}" for arm, n in counts.items())
    need = " and ".join(f"{min_samples - n} more {arm}" for arm, n in counts.items() if n < min_samples)
    return f"too few {what} to judge yet: {have}; {need} needed"


# --- alpha spending ---


def spent_alpha(alpha: float, fraction: float) -> float:
    """The alpha spent by information fraction `fraction` (O'Brien-Fleming type, see the module docstring).
    Monotone in fraction, tending to 0 as fraction -> 0, and exactly alpha at fraction 1."""
    alpha = _real("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    fraction = _real("fraction", fraction, low=0.0, high=1.0, low_open=True)
    if fraction == 1.0:
        return alpha  # exactly, not alpha up to the rounding of isf and sf
    # ndtr/ndtri rather than stats.norm: the same values, without its per-call overhead (a rollout simulation calls
    # this thousands of times); the lower tail keeps full precision where the spent alpha is tiny.
    return float(2 * special.ndtr(special.ndtri(alpha / 2) / math.sqrt(fraction)))


def look_alpha(alpha: float, *, look: int, looks: int) -> float:
    """The share of alpha spent at look `look` (1-based) of at most `looks` planned looks:
    spent_alpha(look / looks) - spent_alpha((look - 1) / looks). The shares of looks 1..looks add up to alpha, so
    running each look's tests at its share bounds, by the union bound, a metric's chance of any false FAIL over the
    whole rollout by alpha. A look past the plan would spend alpha that is not there, hence the ValueError."""
    looks = _count("looks", looks, low=1)
    look = _count("look", look, low=1)
    if look > looks:
        raise ValueError(f"look {look} is beyond the {looks} planned looks: all of alpha is already spent")
    before = spent_alpha(alpha, (look - 1) / looks) if look > 1 else 0.0
    return max(0.0, spent_alpha(alpha, look / looks) - before)


# --- latency ---


def hodges_lehmann(canary: np.ndarray, production: np.ndarray, *, alpha: float) -> Estimate:
    """The median of the pairwise differences canary - production and its two-sided (1 - 2 alpha) distribution-free
    interval from their order statistics; (shift, None, None) when the samples are too small for that level."""
    n, m = len(canary), len(production)
    pairs = n * m
    diffs = np.subtract.outer(canary, production).ravel()
    middle = [(pairs - 1) // 2, pairs // 2]
    z = -special.ndtri(alpha) if alpha > 0 else math.inf  # z_{1 - alpha}, from the lower tail for precision
    k = math.floor(pairs / 2 - z * math.sqrt(pairs * (n + m + 1) / 12)) if math.isfinite(z) else 0
    ends = [k - 1, pairs - k] if k >= 1 else []
    ordered = np.partition(diffs, sorted(set(middle + ends)))
    shift = float((ordered[middle[0]] + ordered[middle[1]]) / 2)
    if not ends:
        return shift, None, None
    return shift, float(ordered[ends[0]]), float(ordered[ends[1]])


def _subsample(values: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    if len(values) <= MAX_PAIRWISE_ARM:
        return values
    return rng.choice(values, size=MAX_PAIRWISE_ARM, replace=False)


def _latency_outcome(*, p: float | None, low: float | None, high: float | None, alpha: float, allowed: float) -> str:
    if low is not None and p is not None and p < alpha and low > allowed:
        return FAIL
    if high is not None and high <= allowed:
        return PASS
    return INCONCLUSIVE


def judge_latency(canary_ms, production_ms, *, alpha: float, tolerance_ms: float, tolerance_ratio: float,
                  min_samples: int, critical: bool = True, seed: int = 0) -> Verdict:
    """Is the canary slower than production by more than allowed? (rules: the module docstring)"""
    canary, production = _sample("canary_ms", canary_ms), _sample("production_ms", production_ms)
    alpha = _alpha(alpha)
    tolerance_ms = _real("tolerance_ms", tolerance_ms, low=0.0, high=math.inf)
    tolerance_ratio = _real("tolerance_ratio", tolerance_ratio, low=0.0, high=math.inf)
    min_samples = _count("min_samples", min_samples, low=1)
    critical = _flag("critical", critical)
    statistics = {"n_canary": len(canary), "n_production": len(production), "min_samples": min_samples,
                  "alpha": alpha, "confidence": 1 - 2 * alpha, "tolerance_ms": tolerance_ms,
                  "tolerance_ratio": tolerance_ratio, "subsampled": False, "n_canary_used": None,
                  "n_production_used": None, "median_canary_ms": None, "median_production_ms": None,
                  "allowed_ms": None, "shift_ms": None, "ci_low": None, "ci_high": None, "u_statistic": None,
                  "p_value": None}
    short = _too_few("latency samples", min_samples, canary=len(canary), production=len(production))
    if short:
        return Verdict("latency", INCONCLUSIVE, critical, short, statistics)
    rng = np.random.default_rng(seed) if max(len(canary), len(production)) > MAX_PAIRWISE_ARM else None
    used_canary, used_production = _subsample(canary, rng), _subsample(production, rng)
    test = stats.mannwhitneyu(used_canary, used_production, alternative="greater")
    shift, low, high = hodges_lehmann(used_canary, used_production, alpha=alpha)
    median_production = float(np.median(production))
    allowed = max(tolerance_ms, tolerance_ratio * median_production)
    p = _number(test.pvalue)  # scipy's p is NaN in degenerate cases; JSON gets None, and None never FAILs
    statistics.update(subsampled=bool(len(used_canary) < len(canary) or len(used_production) < len(production)),
                      n_canary_used=len(used_canary), n_production_used=len(used_production),
                      median_canary_ms=float(np.median(canary)), median_production_ms=median_production,
                      allowed_ms=allowed, shift_ms=shift, ci_low=low, ci_high=high,
                      u_statistic=float(test.statistic), p_value=p)
    outcome = _latency_outcome(p=p, low=low, high=high, alpha=alpha, allowed=allowed)
    return Verdict("latency", outcome, critical, _latency_reason(outcome, statistics), statistics)


def _latency_reason(outcome: str, s: dict) -> str:
    alpha, allowed = s["alpha"], s["allowed_ms"]
    head = f"canary latency {s['shift_ms']:+.1f} ms"
    base = f"production's {s['median_production_ms']:.1f} ms median"
    if s["ci_low"] is None:
        return (f"{head} against {base}, but {s['n_canary_used']} and {s['n_production_used']} samples bound no "
                f"{_confidence(alpha)} interval at this look's alpha {alpha:.2g}; more samples needed")
    interval = f"({_confidence(alpha)} CI {s['ci_low']:.1f}..{s['ci_high']:.1f})"
    if outcome == FAIL:
        return (f"{head} {interval} over {base}, beyond the {allowed:.1f} ms allowed "
                f"(Mann-Whitney p={s['p_value']:.2g} < alpha {alpha:.2g})")
    if outcome == PASS:
        return f"{head} {interval} against {base}, within the {allowed:.1f} ms allowed"
    return (f"{head} {interval} against {base}: not yet clear of the {allowed:.1f} ms allowed "
            f"(Mann-Whitney {_p(s['p_value'])}, alpha {alpha:.2g}); more samples needed")


# --- errors ---


def _clopper_pearson_upper(errors: int, total: int, *, alpha: float) -> float:
    """The one-sided (1 - alpha) upper bound of a binomial rate: exact, so it holds at 0 errors too."""
    if errors == total:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, errors + 1, total - errors))


def _error_counts(errors_name: str, errors, total_name: str, total) -> tuple[int, int]:
    total = _count(total_name, total)
    errors = _count(errors_name, errors)
    if errors > total:
        raise ValueError(f"{errors_name} ({errors}) must not exceed {total_name} ({total})")
    return errors, total


def judge_errors(*, canary_errors: int, canary_total: int, production_errors: int, production_total: int,
                 alpha: float, tolerance: float, min_samples: int, critical: bool = True) -> Verdict:
    """Does the canary fail more requests than production, by more than `tolerance` (a difference of rates)?"""
    canary_errors, canary_total = _error_counts("canary_errors", canary_errors, "canary_total", canary_total)
    production_errors, production_total = _error_counts("production_errors", production_errors,
                                                        "production_total", production_total)
    alpha = _alpha(alpha)
    tolerance = _real("tolerance", tolerance, low=0.0, high=1.0)
    min_samples = _count("min_samples", min_samples, low=1)
    critical = _flag("critical", critical)
    statistics = {"n_canary": canary_total, "n_production": production_total, "canary_errors": canary_errors,
                  "production_errors": production_errors, "min_samples": min_samples, "alpha": alpha,
                  "tolerance": tolerance, "canary_rate": None, "production_rate": None, "difference": None,
                  "ci_high": None, "p_value": None}
    short = _too_few("requests", min_samples, canary=canary_total, production=production_total)
    if short:
        return Verdict("errors", INCONCLUSIVE, critical, short, statistics)
    table = [[canary_errors, canary_total - canary_errors], [production_errors, production_total - production_errors]]
    p = _number(stats.fisher_exact(table, alternative="greater").pvalue)
    canary_rate, production_rate = canary_errors / canary_total, production_errors / production_total
    upper = _clopper_pearson_upper(canary_errors, canary_total, alpha=alpha)
    statistics.update(canary_rate=canary_rate, production_rate=production_rate,
                      difference=canary_rate - production_rate, ci_high=upper, p_value=p)
    if p is not None and p < alpha and canary_rate - production_rate > tolerance:
        outcome = FAIL
    elif upper <= production_rate + tolerance:
        outcome = PASS
    else:
        outcome = INCONCLUSIVE
    return Verdict("errors", outcome, critical, _errors_reason(outcome, statistics), statistics)


def _errors_reason(outcome: str, s: dict) -> str:
    head = (f"canary error rate {100 * s['canary_rate']:.2f}% ({s['canary_errors']} of {s['n_canary']}) against "
            f"production's {100 * s['production_rate']:.2f}% ({s['production_errors']} of {s['n_production']})")
    allowed = f"{100 * s['tolerance']:.2f} points allowed"
    if outcome == FAIL:
        return (f"{head}: {100 * s['difference']:+.2f} points, beyond the {allowed} "
                f"(Fisher p={s['p_value']:.2g} < alpha {s['alpha']:.2g})")
    bound = f"upper bound {100 * s['ci_high']:.2f}% at {_confidence(s['alpha'], sides=1)}"
    if outcome == PASS:
        return f"{head}: canary's {bound} is within the {allowed}"
    return (f"{head}: canary's {bound} is not yet within the {allowed} (Fisher {_p(s['p_value'])}, "
            f"alpha {s['alpha']:.2g}); more requests needed")


# --- quality: bootstrap non-inferiority ---


def auc(scores, labels) -> float | None:
    """ROC AUC from ranks (Mann-Whitney's U over n1 n0), ties counting half; None with a single class."""
    scores = _sample("scores", scores)
    positive = _labels("labels", labels, rows=len(scores), scores_name="scores")
    n1 = int(positive.sum())
    n0 = len(scores) - n1
    if n1 == 0 or n0 == 0:
        return None
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def resampled_aucs(positives: np.ndarray, negatives: np.ndarray, *, positive_draws: np.ndarray,
                   negative_draws: np.ndarray) -> np.ndarray:
    """The AUC of each resample (a row of draws, indices into positives and negatives), without sorting any of them:
    with the negatives sorted once, a resample's negatives are counts per sorted position, and each drawn positive
    beats the drawn negatives below its score and ties those equal to it."""
    resamples, n0 = negative_draws.shape
    order = np.argsort(negatives, kind="stable")
    position = np.empty(n0, dtype=np.intp)
    position[order] = np.arange(n0)
    counts = np.bincount((position[negative_draws] + (n0 * np.arange(resamples))[:, None]).ravel(),
                         minlength=resamples * n0)
    below = np.zeros((resamples, n0 + 1), dtype=np.int64)  # below[:, k]: drawn negatives at sorted positions < k
    np.cumsum(counts.reshape(resamples, n0), axis=1, out=below[:, 1:])
    ordered = negatives[order]
    less = np.searchsorted(ordered, positives, side="left")
    not_more = np.searchsorted(ordered, positives, side="right")
    # Flat indices into `below`: one gather per resample row, cheaper than take_along_axis's broadcasting.
    rows = ((n0 + 1) * np.arange(resamples))[:, None]
    flat = below.ravel()
    wins = flat[less[positive_draws] + rows].sum(axis=1) + flat[not_more[positive_draws] + rows].sum(axis=1)
    return wins / (2.0 * positive_draws.shape[1] * n0)


def _chunks(resamples: int, rows: int) -> list[int]:
    per_chunk = max(1, BOOTSTRAP_CELLS // max(rows, 1))
    return [min(per_chunk, resamples - start) for start in range(0, resamples, per_chunk)]


def _bootstrap_auc(scores: np.ndarray, positive: np.ndarray, *, resamples: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Resampled AUCs of one arm, stratified: positives and negatives are drawn separately, keeping both classes."""
    positives, negatives = scores[positive], scores[~positive]
    parts = []
    for size in _chunks(resamples, len(scores)):
        positive_draws = rng.integers(0, len(positives), size=(size, len(positives)), dtype=np.int32)
        negative_draws = rng.integers(0, len(negatives), size=(size, len(negatives)), dtype=np.int32)
        parts.append(resampled_aucs(positives, negatives, positive_draws=positive_draws,
                                    negative_draws=negative_draws))
    return np.concatenate(parts)


def _bootstrap_mean(values: np.ndarray, *, resamples: int, rng: np.random.Generator) -> np.ndarray:
    parts = [values[rng.integers(0, len(values), size=(size, len(values)), dtype=np.int32)].mean(axis=1)
             for size in _chunks(resamples, len(values))]
    return np.concatenate(parts)


def _non_inferiority(observed: float, difference_draws: np.ndarray, *, alpha: float,
                     tolerance: float) -> tuple[str, float | None, float | None]:
    """The outcome and the normal bootstrap interval: the observed difference -/+ z_{1 - alpha} times the
    resamples' standard deviation. Not the percentile interval: an early look's spent alpha (1e-8 and less) lies
    far beyond the most extreme of any affordable number of resamples, where a percentile would silently claim a
    level it does not have; the normal interval extrapolates with the difference's asymptotic normality (AUC:
    DeLong et al. 1988; a mean: the central limit theorem)."""
    if alpha <= 0:
        return INCONCLUSIVE, None, None
    spread = float(np.std(difference_draws, ddof=1)) if len(difference_draws) > 1 else math.inf
    z = -special.ndtri(alpha)
    low, high = observed - z * spread, observed + z * spread
    if not math.isfinite(low):
        return INCONCLUSIVE, None, None
    if high < -tolerance:
        return FAIL, float(low), float(high)
    if low >= -tolerance:
        return PASS, float(low), float(high)
    return INCONCLUSIVE, float(low), float(high)


def _quality_checks(alpha, tolerance, min_samples, resamples, critical) -> tuple[float, float, int, int, bool]:
    return (_alpha(alpha), _real("tolerance", tolerance, low=0.0, high=math.inf),
            _count("min_samples", min_samples, low=1), _count("resamples", resamples, low=1),
            _flag("critical", critical))


def judge_auc(canary_scores, canary_labels, production_scores, production_labels, *, alpha: float, tolerance: float,
              min_samples: int, resamples: int = 1000, seed: int = 0, critical: bool = True) -> Verdict:
    """Does the canary rank at least as well as production, within `tolerance` of AUC? Pass only labelled rows."""
    canary = _sample("canary_scores", canary_scores)
    canary_positive = _labels("canary_labels", canary_labels, rows=len(canary), scores_name="canary_scores")
    production = _sample("production_scores", production_scores)
    production_positive = _labels("production_labels", production_labels, rows=len(production),
                                  scores_name="production_scores")
    alpha, tolerance, min_samples, resamples, critical = _quality_checks(alpha, tolerance, min_samples, resamples,
                                                                         critical)
    statistics = {"n_canary": len(canary), "n_production": len(production),
                  "canary_positives": int(canary_positive.sum()),
                  "production_positives": int(production_positive.sum()), "min_samples": min_samples,
                  "alpha": alpha, "confidence": 1 - 2 * alpha, "tolerance": tolerance, "resamples": resamples,
                  "canary_auc": None, "production_auc": None, "difference": None, "ci_low": None, "ci_high": None}
    short = _too_few("labelled rows", min_samples, canary=len(canary), production=len(production))
    single = [f"{arm} has only {'positive' if positive.all() else 'negative'} labels"
              for arm, positive in (("canary", canary_positive), ("production", production_positive))
              if positive.all() or not positive.any()]
    if short or single:
        reason = short or f"AUC is undefined with one class: {' and '.join(single)}"
        return Verdict("auc", INCONCLUSIVE, critical, reason, statistics)
    canary_auc, production_auc = auc(canary, canary_positive), auc(production, production_positive)
    statistics.update(canary_auc=canary_auc, production_auc=production_auc, difference=canary_auc - production_auc)
    rng = np.random.default_rng(seed)
    draws = (_bootstrap_auc(canary, canary_positive, resamples=resamples, rng=rng)
             - _bootstrap_auc(production, production_positive, resamples=resamples, rng=rng))
    outcome, low, high = _non_inferiority(statistics["difference"], draws, alpha=alpha, tolerance=tolerance)
    statistics.update(ci_low=low, ci_high=high)
    return Verdict("auc", outcome, critical, _quality_reason("auc", outcome, statistics), statistics)


def judge_mean_score(canary, production, *, alpha: float, tolerance: float, min_samples: int, resamples: int = 1000,
                     seed: int = 0, critical: bool = True) -> Verdict:
    """Are the canary's feedback scores (e.g. thumbs up 1, down 0) on average no worse than production's, within
    `tolerance`? The same non-inferiority rule as AUC, on the difference of means."""
    canary_scores, production_scores = _sample("canary", canary), _sample("production", production)
    alpha, tolerance, min_samples, resamples, critical = _quality_checks(alpha, tolerance, min_samples, resamples,
                                                                         critical)
    statistics = {"n_canary": len(canary_scores), "n_production": len(production_scores),
                  "min_samples": min_samples, "alpha": alpha, "confidence": 1 - 2 * alpha, "tolerance": tolerance,
                  "resamples": resamples, "canary_mean": None, "production_mean": None, "difference": None,
                  "ci_low": None, "ci_high": None}
    short = _too_few("scores", min_samples, canary=len(canary_scores), production=len(production_scores))
    if short:
        return Verdict("feedback_score", INCONCLUSIVE, critical, short, statistics)
    canary_mean, production_mean = float(canary_scores.mean()), float(production_scores.mean())
    statistics.update(canary_mean=canary_mean, production_mean=production_mean,
                      difference=canary_mean - production_mean)
    rng = np.random.default_rng(seed)
    draws = (_bootstrap_mean(canary_scores, resamples=resamples, rng=rng)
             - _bootstrap_mean(production_scores, resamples=resamples, rng=rng))
    outcome, low, high = _non_inferiority(statistics["difference"], draws, alpha=alpha, tolerance=tolerance)
    statistics.update(ci_low=low, ci_high=high)
    return Verdict("feedback_score", outcome, critical, _quality_reason("feedback_score", outcome, statistics),
                   statistics)


def _quality_head(metric: str, s: dict) -> str:
    key = "auc" if metric == "auc" else "mean"
    name = "AUC" if metric == "auc" else "mean feedback score"
    return (f"canary {name} {s[f'canary_{key}']:.4f} against production's {s[f'production_{key}']:.4f} "
            f"({s['difference']:+.4f})")


def _quality_reason(metric: str, outcome: str, s: dict) -> str:
    if s["ci_low"] is None:
        return f"{_quality_head(metric, s)}: this look's alpha {s['alpha']:.2g} decides nothing; more data needed"
    interval = f"{_confidence(s['alpha'])} CI {s['ci_low']:+.4f}..{s['ci_high']:+.4f}"
    allowed = f"the {s['tolerance']:.4f} drop allowed"
    if outcome == FAIL:
        return f"{_quality_head(metric, s)}, {interval}: worse by more than {allowed}"
    if outcome == PASS:
        return f"{_quality_head(metric, s)}, {interval}: no worse than {allowed}"
    return f"{_quality_head(metric, s)}, {interval}: not yet clear of {allowed}; more data needed"


# --- the step ---


def _listing(verdicts: list[Verdict]) -> str:
    return ", ".join(f"{v.metric} ({v.outcome}{'' if v.critical else ', non-critical'})" for v in verdicts)


def decide(verdicts: Sequence[Verdict], *, last_look: bool) -> tuple[str, str]:
    """The step's outcome and its reason, from the metrics' verdicts (rules: the module docstring)."""
    verdicts = list(verdicts)
    if not verdicts:
        raise ValueError("verdicts is empty: a step with no evidence can neither pass nor fail")
    for verdict in verdicts:
        if not isinstance(verdict, Verdict) or verdict.outcome not in OUTCOMES:
            raise ValueError(f"verdicts must hold Verdicts with an outcome in {OUTCOMES}, got {verdict!r}")
    last_look = _flag("last_look", last_look)
    failed = [v for v in verdicts if v.critical and v.outcome == FAIL]
    if failed:
        return FAIL, "critical metric failed: " + "; ".join(f"{v.metric}: {v.reason}" for v in failed)
    short = [v for v in verdicts if v.outcome != PASS]
    if not short:
        return PASS, "every metric passed: " + ", ".join(v.metric for v in verdicts)
    if last_look:
        return FAIL, f"inconclusive after the last look: {_listing(short)} did not pass"
    return INCONCLUSIVE, f"holding to collect more: {_listing(short)} did not pass yet"
