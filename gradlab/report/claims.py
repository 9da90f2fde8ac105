"""The four published claims, each tested on run directories with scipy.

Every claim is a function ``(runs) -> ClaimResult`` over the runs of one dataset. The design
choices that matter for the numbers, and why:

* **The unit of replication is the training run.** Layers of one network are not independent
  observations (they share the data, the initialization scale and each other's inputs), so a test
  over all (layer, seed) pairs would count one run many times and report p-values far too small.
  Each run (or each plain/residual pair of runs) is first reduced to one number, e.g. the mean log
  ratio over its matched layers, and the test runs over those numbers. The pooled (layer, seed)
  Wilcoxon test is still reported, marked *descriptive*, for comparison.
* **Pairs.** A plainN run is paired with the resnetN run of the same seed (same depth, same data
  order), so each difference is within a depth. A run that records no seed is never paired
  (tests over single runs still use it).
* **Depths.** Pairs (or runs) of several depths are tested together stratified by depth (depth a
  fixed effect: the test's variance is the spread within depths, on N - J degrees of freedom),
  not pooled as if one depth's mean were another's; each depth's own test is listed, and a
  verdict whose effect is significantly reversed at one depth (that depth's own test at
  ``ALPHA``, uncorrected: the conservative choice, as a reversal only weakens the verdict) is
  ``inconclusive`` with that reason.
* **One setup.** Runs pooled as seeds or paired must share their training setup
  (:data:`~gradlab.report.load.SETUP_KEYS`); of several, the one with the most runs is tested
  and the others are named.
* **"Final" values** are the mean over the last 10% of logged steps (step 0, the initialization,
  excluded): one noisy batch does not decide a claim.
* **Tests are one-sided** in the claim's direction; a claim is ``supported`` when its direction is
  significant at ``ALPHA`` = 0.05, ``contradicted`` when the opposite direction is, and otherwise
  ``inconclusive`` with the reason. Claims with two parts are supported only when *both* parts
  are (an intersection-union test, which needs no correction: its p-value is the larger of the
  two); they are contradicted when *either* part's opposite is significant after Holm's correction
  over the parts (a union, which does need it).
* **Effect sizes** come with the two-sided 95% confidence interval of the model their test
  assumes: Student's t for one-sample tests and depth trends, Welch's for two-sample
  comparisons. An interval that excludes no effect means one-sided p < 0.025, and a p of 0.05 or
  more means an interval that includes it (between the two, a supported claim's two-sided
  interval can touch zero). A test over values with no spread at all gives no evidence (p = 1).
  (Percentile bootstrap intervals, which earlier versions gave, cover far less than 95% with the
  2-6 runs or pairs a claim usually has.) Only the descriptive pooled Wilcoxon median, over
  hundreds of (layer, seed) values, has a percentile bootstrap interval (10,000 resamples, RNG
  seed 0).
* **Non-finite values** (a step skipped by ``--on-nonfinite skip`` logs its inf/NaN values) are
  left out of every mean over steps, and each run where that happened is named in the notes (a
  skipped step's finite values count). Per-layer values that are not finite and positive are
  left out of log ratios, with a note.
* **Eligible runs**: status ``completed``, at least ``MIN_LOGGED_STEPS`` logged steps after step
  0, the metric the claim needs, and a model with at least ``MIN_SEEDS`` distinct seeds. Everything
  excluded is listed in the claim's notes.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from gradlab.report.load import (
    EARLY_FRACTION,
    LoadedRun,
    RunSet,
    main_setup,
    setup_difference,
    setup_of,
)

__all__ = ["CLAIMS", "ALPHA", "MIN_SEEDS", "MIN_LOGGED_STEPS", "ClaimResult", "CLAIM_FUNCTIONS",
           "degradation", "smaller_responses", "near_identity", "gradient_flow",
           "evaluate_claims", "is_conv_bn", "welch_contrast"]

CLAIMS: tuple[str, ...] = ("degradation", "smaller-responses", "near-identity", "gradient-flow")
ALPHA = 0.05
MIN_SEEDS = 2
MIN_LOGGED_STEPS = 5
# Gradient-flow is measured early in training, where optimization difficulty shows first:
# EARLY_FRACTION (0.1, from load, which keeps those rows exactly for long runs).
N_BOOT = 10_000
BOOT_SEED = 0

_CONV_BN = re.compile(r"(^|\.)bn[12]$")


def is_conv_bn(layer: str) -> bool:
    """BN right after a 3x3 conv (stem ``bn1``, block ``bn1``/``bn2``), as in Fig. 7.

    Excludes the final linear ``fc`` and option-B projection BNs (``shortcut.1``), which follow a
    1x1 conv and sit outside the residual branch.
    """
    return bool(_CONV_BN.search(layer))


@dataclass
class ClaimResult:
    """The verdict on one claim for one dataset, with the numbers behind it.

    The headline fields (``test`` ... ``n``) are those of the part that decided the verdict (for a
    supported two-part claim, the part with the larger p-value); ``tests`` holds every part.
    """

    id: str
    title: str
    statement: str
    source: str
    method: str
    verdict: str
    reason: str
    test: str = ""
    statistic: float = float("nan")
    p_value: float = float("nan")
    effect_name: str = ""
    effect_size: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    n: int = 0
    details: pd.DataFrame = field(default_factory=pd.DataFrame)
    tests: pd.DataFrame = field(default_factory=pd.DataFrame)
    dataset: str | None = None
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, object]:
        """One flat row (for tables, markdown and JSON)."""
        return {"claim": self.id, "dataset": self.dataset, "verdict": self.verdict,
                "test": self.test, "statistic": self.statistic, "p_value": self.p_value,
                "effect_name": self.effect_name, "effect_size": self.effect_size,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
                "reason": self.reason}


@dataclass
class _Part:
    """One sub-test of a claim: p in the claim's direction and in the opposite one."""

    name: str
    test: str
    statistic: float
    p: float
    p_opposite: float
    effect_name: str
    effect: float
    ci: tuple[float, float]
    n: int
    says: str  # what the claim's direction means, e.g. "resnet below plain"
    opposite: str  # what the opposite means
    role: str = "claim"  # "claim" (must be significant) | "no-worse" | "descriptive" | "depth"
    # Where the values come from several depths: each depth's own test (role "depth"), which
    # decide nothing alone but keep a verdict from hiding an effect that reverses with depth.
    by_depth: list[_Part] = field(default_factory=list)

    def row(self) -> dict[str, object]:
        return {"part": self.name, "role": self.role, "test": self.test,
                "statistic": self.statistic, "p_claimed": self.p, "p_opposite": self.p_opposite,
                "effect_name": self.effect_name, "effect": self.effect, "ci_low": self.ci[0],
                "ci_high": self.ci[1], "n": self.n}


def _rows(parts: Iterable[_Part]) -> pd.DataFrame:
    """The tests table: every part, each followed by its per-depth tests."""
    return pd.DataFrame([r.row() for p in parts for r in [p, *p.by_depth]])


def _strat_part(d: Sequence[float], depth: Sequence[int], alternative: str, *, name: str,
                test: str, effect_name: str, transform: Callable[[float], float],
                says: str, opposite: str) -> _Part:
    """A claim part from :func:`_stratified_t1` (effect and CI through ``transform``)."""
    st = _stratified_t1(d, depth, alternative)
    if len(st.depths) > 1:
        test += f", stratified by depth (t on {st.df:g} df within depths)"
    per = [_Part(name=f"{name}, depth {lv} only", test="one-sample t-test, one-sided",
                 statistic=t, p=p, p_opposite=q, effect_name=effect_name,
                 effect=transform(mean), ci=(transform(lo), transform(hi)), n=n,
                 says=f"{says} at depth {lv}", opposite=f"{opposite} at depth {lv}",
                 role="depth")
           for lv, n, mean, p, q, (lo, hi), t in st.depths] if len(st.depths) > 1 else []
    return _Part(name=name, test=test, statistic=st.t, p=st.p, p_opposite=st.p_opposite,
                 effect_name=effect_name, effect=transform(st.est),
                 ci=(transform(st.ci[0]), transform(st.ci[1])), n=len(d), says=says,
                 opposite=opposite, by_depth=per)


def _significant(q: _Part, side: str) -> str | None:
    """``q.says`` (side "says") or ``q.opposite`` (side "opposite") with its p, where that p is
    below ALPHA; else None."""
    p = q.p if side == "says" else q.p_opposite
    return f"{getattr(q, side)} (p={p:.3g})" if p < ALPHA else None


def _depth_split(parts: Iterable[_Part]) -> str:
    """The depths at which a part's direction (or its opposite) is significant on its own (each
    at ALPHA): explains an inconclusive pooled test."""
    return "; ".join(s for part in parts for q in part.by_depth
                     for side in ("says", "opposite") if (s := _significant(q, side)))


def _reversal(part: _Part, verdict: str) -> str | None:
    """Why a verdict on a part pooled over depths does not stand: the opposite is significant
    at one of its depths, or None.

    Each depth is tested at ALPHA without a correction for the number of depths: a reversal
    found here only keeps the verdict from being general (it becomes inconclusive), so not
    correcting is the conservative choice.
    """
    side = "opposite" if verdict == "supported" else "says"
    return "; ".join(s for q in part.by_depth if (s := _significant(q, side))) or None


#: How every claim that pools pairs (or runs) of several depths tests them (its method text).
_BY_DEPTH = ("Where the pairs (or runs) come from several depths, the t-tests are stratified by "
             "depth (depth a fixed effect; variance within depths, N - J df) and each depth is "
             "also tested alone: a reversal significant at one depth (p < 0.05, uncorrected) "
             "makes the verdict inconclusive.")

_INFO = {
    "degradation": (
        "Degradation with depth",
        "The deeper plain net ends with higher training loss than the shallower one; the deeper "
        "residual net does not.",
        "He et al. 2015, Fig. 1 and Fig. 6",
        "Final training loss per run = mean of the last 10% of logged training-batch losses "
        "(step 0 excluded). Depths compared: the shallowest and the deepest depth that both plain "
        "and residual nets have (with >= 2 seeds each). Part 1: one-sided Welch t-test, deeper "
        "plain > shallower plain. Part 2: one-sided Welch t-test, deeper residual > shallower "
        "residual. Part 3: the depth penalty of plain minus that of residual nets, (deep - "
        "shallow plain) - (deep - shallow residual) final loss, tested > 0 one-sided: per seed "
        "with a one-sample t-test over seeds where all four models share their seeds (a seed's "
        "runs share the data order), else by a Welch-Satterthwaite contrast of the four means. "
        "Supported: parts 1 and 3 significant (p < 0.05) and part 2 not (part 2 alone would "
        "be absence of evidence; part 3 tests the difference between the families directly), "
        "and no run of the four models diverged. Contradicted: deeper plain significantly "
        "lower, or deeper residual significantly higher (Holm over the two). Effects: "
        "differences of mean final loss with 95% CIs of the test's model (Welch's for parts 1 "
        "and 2). A run with no finite loss in its final window is left out of the tests and "
        "named; it, or a run stopped by a non-finite value, keeps the claim from support."),
    "smaller-responses": (
        "Residual nets have smaller layer responses",
        "Residual nets' response_std is below plain nets' at matched layers, and falls with "
        "depth among residual nets.",
        "He et al. 2015, Fig. 7",
        "response_std of the BatchNorm after every 3x3 conv (stem bn1 and block bn1/bn2; fc "
        "excluded), final = mean over the last 10% of logged steps. Part 1: for each plainN/"
        "resnetN pair of the same seed, d = mean over matched layers (same name) of "
        "ln(std_resnet / std_plain); one-sided one-sample t-test of d < 0 over pairs. Effect: "
        "geometric-mean ratio resnet/plain = exp(mean d), 95% CI exp of d's t interval. "
        "Part 2: per residual run, the mean "
        "response_std over those layers; least-squares slope of its log on depth, one-sided t-test "
        "of slope < 0 (with two depths this is the pooled two-sample t-test). Effect: the fitted "
        "ratio deepest/shallowest, 95% CI from the slope's t interval (n - 2 df). Both parts "
        "must be significant (p < 0.05); contradicted if either opposite direction is (Holm "
        "over the two). The pooled Wilcoxon signed-rank test over all matched (layer, seed) "
        "pairs is shown as descriptive only (layers of one run are not independent). "
        + _BY_DEPTH),
    "near-identity": (
        "Residual blocks stay close to the identity",
        "residual_ratio < 1 for most blocks; identity_gap of residual blocks is below plain "
        "blocks at matched positions.",
        "He et al. 2015, sec. 3.1 and 4.2",
        "Final = mean over the last 10% of logged steps. Part 1: per residual run, m = the upper "
        "median over its blocks of log10(residual_ratio) (the middle value; of an even count "
        "the upper one: m < 0 exactly when most blocks have ratio < 1); "
        "one-sided one-sample t-test of m < 0 over runs. Effect: 10^mean(m), the typical block's "
        "ratio (95% CI: 10^ of m's t interval). Part 2: for each plainN/resnetN pair of the same "
        "seed, d = mean over matched blocks (same name; identity_gap exists where a block keeps "
        "its shape) of ln(gap_resnet / gap_plain); one-sided t-test of d < 0. Effect: "
        "exp(mean d), 95% CI exp of d's t interval. Both parts must be significant; "
        "contradicted if either opposite is (Holm over the two). "
        + _BY_DEPTH),
    "gradient-flow": (
        "Gradients flow better through residual nets",
        "response_grad_norm decays (or explodes) through depth more in plain nets than in "
        "residual nets.",
        "He et al. 2016; Balduzzi et al. 2017",
        "Per run: log10(response_grad_norm) at each 3x3-conv BN, averaged over the logged steps in "
        "the first 10% of training (step 0 included), regressed by least squares on the layer's "
        "rank in forward order; |slope| is the decay or growth in decades per layer. For each "
        "plainN/resnetN pair of the same seed, d = |slope_plain| - |slope_resnet|; one-sided "
        "one-sample t-test of d > 0 over pairs. Effect: mean d (decades per layer) with its t "
        "95% CI. Layers whose values there are not finite and positive are left out (keeping the "
        "others' ranks). The slopes at init (step 0) and at the final step are listed too. "
        + _BY_DEPTH),
}


# -- statistics helpers -------------------------------------------------------------------------
def _rng() -> np.random.Generator:
    return np.random.default_rng(BOOT_SEED)


def _ci(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return (float(lo), float(hi))


def t_mean_ci(x: Sequence[float], transform: Callable[[np.ndarray], np.ndarray] = lambda v: v
              ) -> tuple[float, float]:
    """Two-sided 95% CI of ``transform(mean(x))`` by Student's t (the one-sample t-test's model):
    mean +- t(0.975, n - 1) s / sqrt(n), through the increasing ``transform``."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return (float("nan"), float("nan"))
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    lo, hi = transform(np.array([x.mean() - half, x.mean() + half]))
    return (float(lo), float(hi))


def welch_diff_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided 95% CI of mean(a) - mean(b) by Welch's t (the Welch test's model), with the
    Welch-Satterthwaite degrees of freedom."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return (float("nan"), float("nan"))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = a.mean() - b.mean()
    if va + vb == 0:  # no spread at all: a zero-width interval, as t_mean_ci gives
        return (float(diff), float(diff))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    return (float(diff - half), float(diff + half))


def welch_contrast(groups: Sequence[Sequence[float]], weights: Sequence[float]
                   ) -> tuple[float, float, float, float, tuple[float, float]]:
    """Linear contrast ``sum(w_g * mean_g)`` of independent groups, tested without assuming equal
    variances (Welch-Satterthwaite, the k-group form of Welch's t): (estimate, t, p estimate > 0,
    p estimate < 0, two-sided 95% CI).

    SE^2 = sum(w_g^2 s_g^2 / n_g), df = SE^4 / sum((w_g^2 s_g^2 / n_g)^2 / (n_g - 1)). With two
    groups and weights (1, -1) this is Welch's t-test. Fewer than two values in a group: NaN
    statistic and interval, p = 1 each way. No spread at all: a zero-width interval and p = 1
    each way (no evidence from a test whose variance is zero, where scipy's Welch test would
    return t = inf and p = 0 for any difference of means).
    """
    est, var, denom = 0.0, 0.0, 0.0
    for g, w in zip(groups, weights, strict=True):
        g = np.asarray(g, dtype=float)
        if len(g) < 2:
            return (float("nan"), float("nan"), 1.0, 1.0, (float("nan"), float("nan")))
        v = w * w * g.var(ddof=1) / len(g)
        est += w * g.mean()
        var += v
        denom += v * v / (len(g) - 1)
    if not var > 0:  # no spread (or a NaN): no test, as _p reads an undefined one
        return (float(est), float("nan"), 1.0, 1.0, (float(est), float(est)))
    se, df = np.sqrt(var), var * var / denom
    t = est / se
    half = stats.t.ppf(0.975, df) * se
    return (float(est), float(t), _p(stats.t.sf(t, df)), _p(stats.t.cdf(t, df)),
            (float(est - half), float(est + half)))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and counts as a test)."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    order = np.argsort(np.where(np.isnan(p), np.inf, p))
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        val = p[i] * (m - rank) if np.isfinite(p[i]) else np.nan
        running = max(running, val) if np.isfinite(val) else running
        adj[i] = min(1.0, running) if np.isfinite(val) else np.nan
    return adj.tolist()


def _quiet(fn: Callable, *args, **kw):
    # scipy warns on degenerate input (zero variance, tiny n); the verdict reports it instead.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def _t1(d: Sequence[float], alternative: str) -> tuple[float, float, float]:
    """One-sample t-test vs 0: (t, p in ``alternative``, p in the opposite direction).

    No spread at all (or fewer than two values): no test, p = 1 each way, as in
    :func:`welch_contrast` (scipy would give t = inf and p = 0 for any non-zero mean).
    """
    d = np.asarray(d, dtype=float)
    if len(d) < 2 or not np.ptp(d) > 0:  # (all equal; ptp, not a rounded std)
        return float("nan"), 1.0, 1.0
    opposite = "greater" if alternative == "less" else "less"
    r = _quiet(stats.ttest_1samp, d, 0.0, alternative=alternative)
    r2 = _quiet(stats.ttest_1samp, d, 0.0, alternative=opposite)
    return float(r.statistic), _p(r.pvalue), _p(r2.pvalue)


def _welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch t-test of mean(a) > mean(b): (t, p greater, p less); no spread in either group,
    or fewer than two values in one: no test, p = 1 each way (as :func:`_t1`)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2 or not (np.ptp(a) > 0 or np.ptp(b) > 0):
        return float("nan"), 1.0, 1.0
    r = _quiet(stats.ttest_ind, a, b, equal_var=False, alternative="greater")
    r2 = _quiet(stats.ttest_ind, a, b, equal_var=False, alternative="less")
    return float(r.statistic), _p(r.pvalue), _p(r2.pvalue)


@dataclass
class _Strat:
    """A one-sample t-test of mean(d) vs 0 with the pairs (or runs) stratified by depth."""

    est: float
    t: float
    p: float  # in the claim's direction
    p_opposite: float
    ci: tuple[float, float]  # two-sided 95%, before any transform
    df: float
    depths: list[tuple[int, int, float, float, float, tuple[float, float], float]]
    # per depth: (depth, n, mean, p claimed, p opposite, 95% CI, t)


def _stratified_t1(d: Sequence[float], depth: Sequence[int], alternative: str) -> _Strat:
    """Test mean(d) vs 0 where the values come from several depths.

    Pairs (or runs) of one depth share that depth's mean effect; pooling depths into one
    one-sample t-test would count the spread *between* depths as noise and lose the test where
    the effect changes with depth. So depth is a fixed effect: d_ij = mu_j + e_ij, the estimate
    is the mean of all values (each depth weighted by its count), its variance s^2 / N with s^2
    the within-depth variance on N - J degrees of freedom (J depths). With one depth this is
    the one-sample t-test and its t interval. Each depth's own t-test (two or more values) is
    returned too, for the check that the effect does not reverse between depths.
    """
    d, depth = np.asarray(d, dtype=float), np.asarray(depth)
    levels = sorted(set(depth.tolist()))
    per = []
    for lv in levels:
        x = d[depth == lv]
        t_j, p_j, q_j = _t1(x, alternative)
        per.append((int(lv), len(x), float(x.mean()), p_j, q_j, t_mean_ci(x), t_j))
    if len(levels) == 1:
        t, p, q = _t1(d, alternative)
        return _Strat(float(d.mean()), t, p, q, t_mean_ci(d), len(d) - 1.0, per)
    n, df = len(d), len(d) - len(levels)
    means = {lv: d[depth == lv].mean() for lv in levels}
    resid = d - np.array([means[v] for v in depth.tolist()])
    est = float(d.mean())
    ss = float((resid ** 2).sum())
    flat = all(not np.ptp(d[depth == lv]) > 0 for lv in levels)
    if df < 1 or flat or not ss > 0:  # no within-depth spread to test against
        return _Strat(est, float("nan"), 1.0, 1.0, (float("nan"), float("nan")), float(df),
                      per)
    se = np.sqrt(ss / df / n)
    t = est / se
    lower, upper = _p(stats.t.cdf(t, df)), _p(stats.t.sf(t, df))
    p, q = (lower, upper) if alternative == "less" else (upper, lower)
    half = stats.t.ppf(0.975, df) * se
    return _Strat(est, float(t), p, q, (est - half, est + half), float(df), per)


def _p(p: float) -> float:
    # An undefined test (NaN p: no spread and no effect) is no evidence either way.
    return float(p) if np.isfinite(p) else 1.0


def _trend(x: np.ndarray, y: np.ndarray
           ) -> tuple[float, float, float, float, tuple[float, float]]:
    """OLS slope of y on x with its t statistic: (slope, t, p slope < 0, p slope > 0, two-sided
    95% CI of the slope: slope +- t(0.975, n - 2) stderr).

    A parametric trend test rather than Spearman's rho: with two depths of three seeds each, a
    rank test can never reach p < 0.05 (the most extreme of C(6,3) = 20 arrangements has
    p = 1/20), so it could not support the claim whatever the data.
    """
    lo = _quiet(stats.linregress, x, y, alternative="less")
    hi = _quiet(stats.linregress, x, y, alternative="greater")
    se = float(lo.stderr)
    half = stats.t.ppf(0.975, len(x) - 2) * se if len(x) > 2 else float("nan")
    ci = (float(lo.slope - half), float(lo.slope + half))
    if not se > 0:  # an exact fit (or too few points): no test, as _t1
        return float(lo.slope), float("nan"), 1.0, 1.0, ci
    return float(lo.slope), float(lo.slope) / se, _p(lo.pvalue), _p(hi.pvalue), ci


# -- run selection ------------------------------------------------------------------------------
@dataclass
class _Selection:
    plain: dict[int, list[LoadedRun]]
    residual: dict[int, list[LoadedRun]]
    notes: list[str]
    single_seed: list[str]  # models dropped for having one seed
    reason: str | None = None  # why nothing is left, when nothing is


def _select(runs: Iterable[LoadedRun], needs: Sequence[str]) -> _Selection:
    """Eligible runs by family and depth; everything excluded is noted with why."""
    runs = list(runs)
    notes: list[str] = []
    kept: list[LoadedRun] = []
    few_steps: list[str] = []
    missing: list[str] = []
    not_done: list[str] = []
    for r in runs:
        if r.status != "completed":
            why = f"status {r.status}"
            if r.failure and r.failure.get("reason"):
                why += f": {r.failure.get('reason')}"
            notes.append(f"{r.name} excluded ({why})")
            not_done.append(r.name)
        elif r.logged_steps < MIN_LOGGED_STEPS:
            notes.append(f"{r.name} excluded (too few logged steps: {r.logged_steps} < "
                         f"{MIN_LOGGED_STEPS})")
            few_steps.append(f"{r.name} has {r.logged_steps}")
        elif not all(r.has(m) for m in needs):
            absent = [m for m in needs if not r.has(m)]
            notes.append(f"{r.name} excluded (no {', '.join(absent)} rows)")
            missing.append(r.name)
        else:
            kept.append(r)

    # One training setup: runs pooled as seeds, or paired, must differ only in model and seed.
    # Where several setups are present, the one with the most runs is tested (ties: the first
    # run's) and the others are named.
    main = main_setup(kept)
    setups = [setup_of(r) for r in kept]
    tested = [r for r, s in zip(kept, setups, strict=True) if s == main]
    for r, s in zip(kept, setups, strict=True):
        if s != main:
            notes.append(f"{r.name} not used: its training setup differs from the "
                         f"{len(tested)} runs tested ({setup_difference(s, main)})")
    kept = tested

    # Residual nets: one family and shortcut variant (resnet with option A when present), so a
    # comparison never mixes different architectures under one depth.
    res_keys = sorted({(r.family, r.variant) for r in kept if r.residual},
                      key=lambda k: (k != ("resnet", "A"), k[0] != "resnet", k))
    res_key = res_keys[0] if res_keys else None
    for k in res_keys[1:]:
        notes.append(f"{k[0]} (shortcut {k[1]}) runs not used: claims compare plain nets with "
                     f"{res_key[0]} (shortcut {res_key[1]})")
    plain_fam = [r for r in kept if not r.residual and r.family == "plain"]
    others = sorted({r.family for r in kept if not r.residual and r.family != "plain"})
    if others:
        notes.append(f"non-residual families {', '.join(others)} not used (only 'plain' is)")
    residual = [r for r in kept if r.residual and (r.family, r.variant) == res_key]

    single: list[str] = []

    def by_depth(rs: list[LoadedRun]) -> dict[int, list[LoadedRun]]:
        out: dict[int, list[LoadedRun]] = {}
        for r in sorted(rs, key=lambda r: (r.depth, r.seed if r.seed is not None else -1)):
            out.setdefault(r.depth, []).append(r)
        for depth in list(out):
            # Distinct seeds (a run that records none counts as its own).
            distinct = {r.seed if r.seed is not None else id(r) for r in out[depth]}
            if len(distinct) < MIN_SEEDS:
                model = out[depth][0].model
                seeds = ", ".join(str(r.seed) for r in out[depth])
                single.append(f"{model}: seed {seeds}")
                notes.append(f"{model} not used (only one seed: {seeds}; needs >= {MIN_SEEDS})")
                del out[depth]
        return out

    sel = _Selection(by_depth(plain_fam), by_depth(residual), notes, single)
    if not sel.plain and not sel.residual:
        if single:
            sel.reason = f"only one seed per model ({'; '.join(single)})"
        elif few_steps:
            sel.reason = (f"too few logged steps ({', '.join(few_steps)}; needs >= "
                          f"{MIN_LOGGED_STEPS} after step 0)")
        elif missing:
            sel.reason = f"no {', '.join(needs)} rows in the runs ({', '.join(missing)})"
        elif not_done:
            sel.reason = f"no completed runs ({', '.join(not_done)})"
        else:
            sel.reason = "no plain or residual nets among the runs"
    return sel


def _label(family: str, depth: int) -> str:
    return f"{family}{depth}"


def _nonfinite_notes(runs: Iterable[LoadedRun], metrics: Sequence[str]) -> list[str]:
    """A note for each run whose final window holds values that are not finite (left out of
    its final means: a step skipped by ``--on-nonfinite skip`` logs them)."""
    notes = []
    for r in runs:
        for m in metrics:
            n = r.tail_nonfinite(m)
            if n:
                notes.append(f"{r.name}: {n} non-finite {m} value(s) in the last 10% of logged "
                             "steps left out of its final mean")
    return notes


def _used(sel: _Selection, depths: Iterable[int] | None = None) -> list[LoadedRun]:
    """The selected runs (of these depths only, when given)."""
    keep = None if depths is None else set(depths)
    return [r for groups in (sel.plain, sel.residual) for d, rs in sorted(groups.items())
            if keep is None or d in keep for r in rs]


def _counterpart_reason(sel: _Selection, *, need_plain: bool = True,
                        need_residual: bool = True) -> str | None:
    """Why no plain/residual pair of one depth exists (None when one does)."""
    if set(sel.plain) & set(sel.residual):
        return None
    parts = []
    res_name = next(iter(sel.residual.values()))[0].family if sel.residual else "resnet"
    if need_plain:
        parts += [f"no plain counterpart for {_label(res_name, d)}" for d in sorted(sel.residual)]
    if need_residual:
        parts += [f"no residual counterpart for {_label('plain', d)}" for d in sorted(sel.plain)]
    if sel.single_seed:
        parts.append(f"only one seed for {'; '.join(sel.single_seed)}")
    return "; ".join(parts) or "no plain/residual pair of the same depth"


def _pairs(sel: _Selection) -> tuple[list[tuple[int, int | None, LoadedRun, LoadedRun]],
                                     list[str]]:
    """(depth, seed, plain run, residual run) for every depth and seed both families have."""
    pairs, notes = [], []
    for depth in sorted(set(sel.plain) & set(sel.residual)):
        # A run that records no seed shares nothing known with any other run: never paired (two
        # such runs are independent replicates, not a same-seed pair).
        p = {r.seed: r for r in sel.plain[depth] if r.seed is not None}
        q = {r.seed: r for r in sel.residual[depth] if r.seed is not None}
        unseeded = [r.name for r in sel.plain[depth] + sel.residual[depth] if r.seed is None]
        if unseeded:
            notes.append(f"depth {depth}: {', '.join(unseeded)} record no seed and are not "
                         "paired")
        for s in sorted(set(p) & set(q)):
            pairs.append((depth, s, p[s], q[s]))
        lone = sorted(set(p) ^ set(q))
        if lone:
            notes.append(f"depth {depth}: seeds {', '.join(map(str, lone))} have no same-seed "
                         "partner and are not paired")
    for depth in sorted(set(sel.residual) - set(sel.plain)):
        fam = sel.residual[depth][0].family
        notes.append(f"{_label(fam, depth)} has no plain counterpart; not compared")
    for depth in sorted(set(sel.plain) - set(sel.residual)):
        notes.append(f"plain{depth} has no residual counterpart; not compared")
    return pairs, notes


def _result(cid: str, verdict: str, reason: str, *, part: _Part | None = None,
            parts: Sequence[_Part] = (), details: pd.DataFrame | None = None,
            notes: Sequence[str] = (), p_value: float | None = None) -> ClaimResult:
    title, statement, source, method = _INFO[cid]
    res = ClaimResult(id=cid, title=title, statement=statement, source=source, method=method,
                      verdict=verdict, reason=reason,
                      details=details if details is not None else pd.DataFrame(),
                      tests=_rows(parts), notes=list(notes))
    if part is not None:
        res.test, res.statistic, res.n = part.test, part.statistic, part.n
        res.p_value = part.p if p_value is None else p_value
        res.effect_name, res.effect_size = part.effect_name, part.effect
        res.ci_low, res.ci_high = part.ci
    return res


def _decide(cid: str, parts: list[_Part], *, details: pd.DataFrame,
            notes: list[str]) -> ClaimResult:
    """Verdict for a claim whose every ``claim`` part must hold (see the module docstring)."""
    tested = [p for p in parts if p.role == "claim"]
    adj = holm([p.p_opposite for p in tested])
    worst = int(np.argmin(adj))
    weakest = max(tested, key=lambda p: p.p)
    if adj[worst] < ALPHA:
        p = tested[worst]
        why = f"{p.opposite} (p={adj[worst]:.3g}"
        why += ", Holm over the parts)" if len(tested) > 1 else ")"
        against = _reversal(p, "contradicted")
        if against is None:
            return _result(cid, "contradicted", why, part=p, parts=parts, details=details,
                           notes=notes, p_value=adj[worst])
        return _result(cid, "inconclusive", f"the effect reverses between depths: {why} "
                       f"pooled, but {against}", part=p, parts=parts, details=details,
                       notes=notes, p_value=adj[worst])
    if weakest.p < ALPHA:
        reason = "; ".join(f"{p.says} (p={p.p:.3g})" for p in tested)
        against = "; ".join(r for p in tested if (r := _reversal(p, "supported")))
        if not against:
            return _result(cid, "supported", reason, part=weakest, parts=parts,
                           details=details, notes=notes)
        return _result(cid, "inconclusive", f"the effect reverses between depths: {reason} "
                       f"pooled, but {against}", part=weakest, parts=parts, details=details,
                       notes=notes)
    failing = [p for p in tested if p.p >= ALPHA]
    reason = "not significant (" + "; ".join(f"p={p.p:.3g} for {p.name}" for p in failing) + ")"
    split = _depth_split(tested)
    if split:
        reason += f"; by depth: {split}"
    return _result(cid, "inconclusive", reason, part=weakest, parts=parts, details=details,
                   notes=notes)


def _paired_runs(cid: str, runs: Sequence[LoadedRun], metric: str
                 ) -> ClaimResult | tuple[_Selection,
                                          list[tuple[int, int | None, LoadedRun, LoadedRun]],
                                          list[str]]:
    """The selection of runs having ``metric``, its plainN/resnetN pairs by seed and the notes
    on what was left out; or the inconclusive result saying why no pair could be formed."""
    sel = _select(runs, [metric])
    if sel.reason:
        return _inconclusive(cid, sel.reason, sel.notes)
    pairs, pair_notes = _pairs(sel)
    notes = sel.notes + pair_notes
    if not pairs:
        return _inconclusive(cid, _counterpart_reason(sel) or "no plain/residual pairs", notes)
    return sel, pairs, notes


def _inconclusive(cid: str, reason: str, notes: Sequence[str] = (), *,
                  parts: Sequence[_Part] = (), details: pd.DataFrame | None = None
                  ) -> ClaimResult:
    return _result(cid, "inconclusive", reason, parts=parts, details=details, notes=notes)


# -- the claims ---------------------------------------------------------------------------------
def degradation(runs: Sequence[LoadedRun]) -> ClaimResult:
    """Deeper plain nets end with higher training loss; deeper residual nets do not (Fig. 1, 6).

    Deepest vs shallowest depth shared by both families, final loss per run, one-sided Welch
    t-tests; supported when the plain comparison is significant, the residual one is not, and
    the plain nets' depth penalty is significantly larger than the residual nets' (the family x
    depth contrast). "Not significantly worse" alone is weaker than "no worse": with few, noisy
    seeds it is easy to pass, which is why the contrast must also hold.
    """
    cid = "degradation"
    sel = _select(runs, ["loss"])
    if sel.reason:
        return _inconclusive(cid, sel.reason, sel.notes)
    common = sorted(set(sel.plain) & set(sel.residual))
    if len(common) < 2:
        reason = _counterpart_reason(sel)
        if reason is None:  # paired at exactly one depth
            extra = sorted((set(sel.plain) | set(sel.residual)) - set(common))
            reason = (f"needs two depths that both plain and residual nets have; only depth "
                      f"{common[0]} is shared")
            if extra:
                res_fam = next(iter(sel.residual.values()))[0].family
                missing = [f"no plain counterpart for {_label(res_fam, d)}" for d in extra
                           if d in sel.residual]
                missing += [f"no residual counterpart for plain{d}" for d in extra
                            if d in sel.plain]
                reason += " (" + "; ".join(missing) + ")"
            if sel.single_seed:
                reason += f"; only one seed for {'; '.join(sel.single_seed)}"
        return _inconclusive(cid, reason, sel.notes)
    lo, hi = common[0], common[-1]
    rows = []
    for fam, groups in (("plain", sel.plain), ("residual", sel.residual)):
        for d in (lo, hi):
            for r in groups[d]:
                rows.append({"family": fam, "model": r.model, "depth": d, "seed": r.seed,
                             "run": r.name, "final_loss": r.final_scalar("loss"),
                             "logged_steps": r.logged_steps})
    details = pd.DataFrame(rows)
    notes = sel.notes + _nonfinite_notes(_used(sel, (lo, hi)), ["loss"])
    # A run whose whole final window is non-finite has no final loss: it cannot enter a test of
    # mean loss, and leaving it out silently would favour its model. Such runs, and those that
    # stopped on a non-finite value, are named, and the claim cannot be supported with them.
    lost_runs = details.loc[~np.isfinite(details["final_loss"]), "run"]
    lost = set(lost_runs)
    for name in lost_runs:
        notes.append(f"{name}: no finite loss in its last 10% of logged steps; left out of the "
                     "tests")
    details = details[np.isfinite(details["final_loss"])]
    # (Only runs whose loss would have counted against the claim: a diverged deeper residual
    # or shallower plain net. Leaving out a diverged deeper plain net is conservative.)
    against = {sel.residual[hi][0].model, sel.plain[lo][0].model}
    setup = setup_of(sel.plain[lo][0])  # (runs of another setup are another experiment)
    diverged = [r.name for r in runs if r.model in against and setup_of(r) == setup and (
        r.name in lost or r.status == "failed" and r.failure is not None
        and str(r.failure.get("reason", "")).startswith("non-finite"))]
    short = [f"{g[d][0].model} has {n}" for fam, g in (("plain", sel.plain),
                                                          ("residual", sel.residual))
             for d in (lo, hi) if (n := len(_final_losses(details, fam, d))) < MIN_SEEDS]
    if short:
        return _inconclusive(cid, f"too few runs with a finite final loss ({'; '.join(short)}; "
                             f"needs >= {MIN_SEEDS})", notes, details=details)

    def part(fam: str, groups: dict[int, list[LoadedRun]], role: str) -> _Part:
        deep = _final_losses(details, fam, hi).to_numpy()
        shallow = _final_losses(details, fam, lo).to_numpy()
        t, p_gt, p_lt = _welch(deep, shallow)
        m_deep, m_shallow = groups[hi][0].model, groups[lo][0].model
        return _Part(
            name=f"{m_deep} vs {m_shallow}", test="Welch t-test, one-sided", statistic=t,
            p=p_gt, p_opposite=p_lt,
            effect_name=f"mean final loss {m_deep} - {m_shallow}",
            effect=float(deep.mean() - shallow.mean()), ci=welch_diff_ci(deep, shallow),
            n=len(deep) + len(shallow), role=role,
            says=f"{m_deep} ends with higher loss than {m_shallow}",
            opposite=(f"{m_deep} ends with significantly lower loss than {m_shallow}"
                      if fam == "plain" else
                      f"{m_deep} ends with significantly higher loss than {m_shallow}"))

    plain, res = part("plain", sel.plain, "claim"), part("residual", sel.residual, "no-worse")
    penalty = _depth_penalty_part(details, sel, lo, hi)
    parts = [plain, res, penalty]
    # Contradiction: deeper plain significantly better, or deeper residual significantly worse.
    adj = holm([plain.p_opposite, res.p])
    if adj[0] < ALPHA or adj[1] < ALPHA:
        if adj[0] <= adj[1]:
            return _result(cid, "contradicted", f"{plain.opposite} (p={adj[0]:.3g}, Holm)",
                           part=plain, parts=parts, details=details, notes=notes,
                           p_value=adj[0])
        return _result(cid, "contradicted", f"{res.opposite} (p={adj[1]:.3g}, Holm)", part=res,
                       parts=parts, details=details, notes=notes, p_value=adj[1])
    if plain.p < ALPHA and res.p >= ALPHA and penalty.p < ALPHA:
        reason = (f"{plain.says} (p={plain.p:.3g}); {res.name}: not significantly worse "
                  f"(p={res.p:.3g}); {penalty.says} (p={penalty.p:.3g})")
        if not diverged:
            return _result(cid, "supported", reason, part=max((plain, penalty),
                                                              key=lambda p: p.p),
                           parts=parts, details=details, notes=notes)
        reason = (f"{reason}; but {', '.join(diverged)} diverged (a non-finite loss), which a "
                  "test of mean final loss cannot weigh")
    elif plain.p >= ALPHA:
        reason = f"not significant (p={plain.p:.3g} for {plain.name})"
    elif res.p < ALPHA:
        reason = (f"{res.name} also ends worse (p={res.p:.3g}), though not significantly "
                  "after Holm's correction")
    else:
        # "Not significantly worse" alone is absence of evidence: the direct comparison of the
        # two families' depth penalties must show the difference the claim is about.
        reason = (f"{plain.says} (p={plain.p:.3g}), but the depth penalty of plain nets is not "
                  f"shown larger than that of residual nets (p={penalty.p:.3g})")
    return _result(cid, "inconclusive", reason, part=plain, parts=parts, details=details,
                   notes=notes)


def _final_losses(details: pd.DataFrame, family: str, depth: int) -> pd.Series:
    """The final losses of one family at one depth from degradation's details, by seed."""
    rows = details[(details["family"] == family) & (details["depth"] == depth)]
    return rows.set_index("seed")["final_loss"]


def _depth_penalty_part(details: pd.DataFrame, sel: _Selection, lo: int, hi: int) -> _Part:
    """The family x depth interaction: how much more going deeper raises the final loss in plain
    nets than in residual nets. Required for support: the residual half of the paper's
    statement rests on a non-significant test (absence of evidence), and this contrast tests
    the difference between the families directly.

    Where all four models have the same seeds, the four runs of a seed share their data order
    (and plain and option-A residual nets of a depth their initial weights), so the contrast is
    formed per seed and tested with a one-sample t-test over seeds (n = seeds); otherwise the
    groups are taken as independent (Welch-Satterthwaite, n = runs).
    """
    keys = [("plain", hi), ("plain", lo), ("residual", hi), ("residual", lo)]
    weights = [1.0, -1.0, -1.0, 1.0]
    by_seed = [_final_losses(details, f, d) for f, d in keys]
    seeds = by_seed[0].index
    paired = (len(seeds) >= 2 and not seeds.hasnans and seeds.is_unique
              and all(g.index.is_unique and set(g.index) == set(seeds) for g in by_seed))
    if paired:
        d = sum(w * g.loc[seeds].to_numpy() for w, g in zip(weights, by_seed, strict=True))
        est, (t, p_gt, p_lt), ci, n = float(d.mean()), _t1(d, "greater"), t_mean_ci(d), len(d)
        test = "one-sample t-test of the per-seed contrast (family x depth), one-sided"
    else:
        est, t, p_gt, p_lt, ci = welch_contrast([g.to_numpy() for g in by_seed], weights)
        n = sum(map(len, by_seed))
        test = "Welch-Satterthwaite contrast (family x depth), one-sided"
    p_hi, p_lo = sel.plain[hi][0].model, sel.plain[lo][0].model
    r_hi, r_lo = sel.residual[hi][0].model, sel.residual[lo][0].model
    return _Part(
        name="depth penalty, plain - residual", test=test,
        statistic=t, p=p_gt, p_opposite=p_lt,
        effect_name=f"({p_hi} - {p_lo}) - ({r_hi} - {r_lo}) mean final loss", effect=est,
        ci=ci, n=n, role="claim",
        says="going deeper raises the final loss more in plain nets than in residual nets",
        opposite="going deeper raises the final loss more in residual nets")


def _matched_log_ratio(plain: pd.DataFrame, res: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Inner join of per-layer values on the layer name, with ln(res / plain); and how many
    matched layers were left out for a value that is not finite and positive (no logarithm)."""
    m = plain.merge(res, on="layer", suffixes=("_plain", "_res"))
    ok = (m["value_plain"] > 0) & (m["value_res"] > 0) & np.isfinite(m["value_plain"]) \
        & np.isfinite(m["value_res"])
    m = m[ok]
    return m.assign(log_ratio=np.log(m["value_res"] / m["value_plain"])), int((~ok).sum())


def _paired_ratio_part(pairs, metric: str, layer_filter: Callable[[str], bool], name: str,
                       what: str, notes: list[str]
                       ) -> tuple[_Part | None, pd.DataFrame, pd.DataFrame]:
    """Part test: mean ln(res/plain) over matched layers per run pair, t-test of d < 0
    stratified by depth; what it leaves out is added to ``notes``."""
    rows, pooled = [], []
    for depth, seed, p, q in pairs:
        a, b = p.final_layers(metric), q.final_layers(metric)
        a, b = a[a["layer"].map(layer_filter)], b[b["layer"].map(layer_filter)]
        m, dropped = _matched_log_ratio(a, b)
        if dropped:
            notes.append(f"pair {p.name} / {q.name}: {dropped} matched layer(s) with a final "
                         f"{metric} that is not finite and positive left out")
        if m.empty:
            notes.append(f"pair {p.name} / {q.name} not used: no matched layers with a finite, "
                         f"positive final {metric}")
            continue
        pooled.append(m.assign(depth=depth, seed=seed))
        rows.append({"depth": depth, "seed": seed, "plain_run": p.name, "residual_run": q.name,
                     "matched_layers": len(m), "mean_log_ratio": float(m["log_ratio"].mean()),
                     "ratio": float(np.exp(m["log_ratio"].mean()))})
    details = pd.DataFrame(rows)
    pooled_df = pd.concat(pooled, ignore_index=True) if pooled else pd.DataFrame()
    if len(details) < 2:
        return None, details, pooled_df
    part = _strat_part(details["mean_log_ratio"].to_numpy(), details["depth"].to_numpy(),
                       "less", name=name,
                       test="one-sample t-test on per-pair mean log ratio, one-sided",
                       effect_name=f"geometric-mean {metric} ratio resnet/plain",
                       transform=lambda v: float(np.exp(v)),
                       says=f"{what} of residual nets below plain nets",
                       opposite=f"{what} of residual nets significantly above plain nets")
    return part, details, pooled_df


def _pooled_wilcoxon(pooled: pd.DataFrame, name: str) -> _Part | None:
    """Descriptive: Wilcoxon signed-rank over all matched (layer, seed) pairs."""
    if len(pooled) < 2:
        return None
    x = pooled["log_ratio"].to_numpy()
    lo = _quiet(stats.wilcoxon, x, alternative="less")
    hi = _quiet(stats.wilcoxon, x, alternative="greater")
    return _Part(name=name, test="Wilcoxon signed-rank over (layer, seed) pairs (descriptive)",
                 statistic=float(lo.statistic), p=_p(lo.pvalue), p_opposite=_p(hi.pvalue),
                 effect_name="median ratio resnet/plain", effect=float(np.exp(np.median(x))),
                 ci=_boot_median_ci(x), n=len(x), says="", opposite="", role="descriptive")


def _boot_median_ci(x: np.ndarray) -> tuple[float, float]:
    idx = _rng().integers(0, len(x), (N_BOOT, len(x)))
    return _ci(np.exp(np.median(x[idx], axis=1)))


def smaller_responses(runs: Sequence[LoadedRun]) -> ClaimResult:
    """Residual nets respond less than plain nets at matched layers, less still when deeper.

    Fig. 7 plots the std of each 3x3 conv's BN output; only those layers are used.
    """
    cid = "smaller-responses"
    got = _paired_runs(cid, runs, "response_std")
    if isinstance(got, ClaimResult):
        return got
    sel, pairs, notes = got
    notes = notes + _nonfinite_notes(_used(sel), ["response_std"])
    part1, details, pooled = _paired_ratio_part(
        pairs, "response_std", is_conv_bn, "resnet vs plain at matched layers",
        "response_std", notes)
    if part1 is None:
        return _inconclusive(cid, "fewer than two plain/residual pairs with matched BN layers",
                             notes, details=details)
    details = details.assign(part="resnet vs plain")
    parts = [part1]
    desc = _pooled_wilcoxon(pooled, "resnet vs plain, pooled layers")

    # Part 2: depth trend among residual nets.
    res_rows = []
    for depth, rs in sorted(sel.residual.items()):
        for r in rs:
            v = r.final_layers("response_std")
            v = v[v["layer"].map(is_conv_bn)]
            bad = ~(np.isfinite(v["value"]) & (v["value"] > 0))
            if bad.any():
                notes.append(f"{r.name}: {int(bad.sum())} BN layer(s) with a final "
                             "response_std that is not finite and positive left out of its "
                             "mean (depth trend)")
                v = v[~bad]
            if len(v):
                res_rows.append({"part": "depth trend", "depth": depth, "seed": r.seed,
                                 "residual_run": r.name, "mean_response_std":
                                 float(v["value"].mean())})
    trend = pd.DataFrame(res_rows)
    details = pd.concat([details, trend], ignore_index=True)
    if trend.empty or trend["depth"].nunique() < 2:
        only = ", ".join(str(d) for d in sorted(sel.residual))
        reason = (f"the depth trend needs residual nets of two depths with >= {MIN_SEEDS} seeds "
                  f"each; only depth {only}")
        # The matched-layer part can still contradict the claim on its own.
        if part1.p_opposite < ALPHA and _reversal(part1, "contradicted") is None:
            return _result(cid, "contradicted", f"{part1.opposite} (p={part1.p_opposite:.3g})",
                           part=part1, parts=parts + [desc] * bool(desc), details=details,
                           notes=notes, p_value=part1.p_opposite)
        return _inconclusive(cid, reason, notes, parts=parts + [desc] * bool(desc),
                             details=details)
    x = trend["depth"].to_numpy(float)
    y = np.log(trend["mean_response_std"].to_numpy(float))
    slope, t, p_lt, p_gt, (s_lo, s_hi) = _trend(x, y)
    span = float(x.max() - x.min())
    d_lo, d_hi = int(x.min()), int(x.max())
    part2 = _Part(name="depth trend among residual nets",
                  test="OLS slope of ln(mean response_std) on depth, t-test, one-sided",
                  statistic=t, p=p_lt, p_opposite=p_gt,
                  effect_name=f"fitted ratio of mean response_std, depth {d_hi} / {d_lo}",
                  effect=float(np.exp(slope * span)),
                  ci=(float(np.exp(s_lo * span)), float(np.exp(s_hi * span))),
                  n=len(trend),
                  says="mean response_std falls with depth among residual nets",
                  opposite="mean response_std significantly rises with depth among residual nets")
    parts.append(part2)
    res = _decide(cid, parts, details=details, notes=notes)
    if desc is not None:
        res.tests = _rows(parts + [desc])
    return res


def near_identity(runs: Sequence[LoadedRun]) -> ClaimResult:
    """Residual branches are small next to the shortcut, and residual blocks stay near identity.

    "Most blocks have ratio < 1" is exactly "the median block's log ratio is < 0", so each run is
    reduced to that median and the test runs over runs, not blocks.
    """
    cid = "near-identity"
    sel = _select(runs, ["identity_gap"])
    if sel.reason:
        return _inconclusive(cid, sel.reason, sel.notes)
    notes = sel.notes + _nonfinite_notes(_used(sel), ["residual_ratio", "identity_gap"])
    rows = []
    for depth, rs in sorted(sel.residual.items()):
        for r in rs:
            v = r.final_layers("residual_ratio")
            ok = np.isfinite(v["value"]) & (v["value"] > 0)
            if (~ok).any():
                notes.append(f"{r.name}: {int((~ok).sum())} block(s) with a final "
                             "residual_ratio that is not finite and positive left out")
            v = v[ok]
            if v.empty:
                notes.append(f"{r.name}: no finite, positive residual_ratio; not used")
                continue
            lr = np.sort(np.log10(v["value"].to_numpy()))
            # The upper median (the middle value; of an even count, the upper of the two): it
            # is < 0 exactly when more than half of the blocks have ratio < 1.
            rows.append({"part": "residual_ratio", "depth": depth, "seed": r.seed,
                         "residual_run": r.name, "blocks": len(v),
                         "median_log10_ratio": float(lr[len(lr) // 2]),
                         "fraction_below_1": float((lr < 0).mean())})
    part1_df = pd.DataFrame(rows)
    if len(part1_df) < 2:
        if sel.residual:
            reason = "fewer than two residual runs with residual_ratio"
        else:
            plain = ", ".join(f"plain{d}" for d in sorted(sel.plain))
            reason = f"no residual nets to test (only {plain})"
            if sel.single_seed:
                reason += f"; only one seed for {'; '.join(sel.single_seed)}"
        return _inconclusive(cid, reason, notes, details=part1_df)
    part1 = _strat_part(part1_df["median_log10_ratio"].to_numpy(),
                        part1_df["depth"].to_numpy(), "less",
                        name="residual_ratio < 1 for most blocks",
                        test="one-sample t-test on per-run median log10 ratio, one-sided",
                        effect_name="typical block residual_ratio (10^mean of run medians)",
                        transform=lambda v: float(10 ** v),
                        says="most blocks have residual_ratio < 1",
                        opposite="most blocks have residual_ratio significantly > 1")
    pairs, pair_notes = _pairs(sel)
    notes += pair_notes
    parts = [part1]
    if not pairs:
        reason = "identity_gap part: " + (_counterpart_reason(sel) or "no plain/residual pairs")
        if part1.p_opposite < ALPHA and _reversal(part1, "contradicted") is None:
            return _result(cid, "contradicted", f"{part1.opposite} (p={part1.p_opposite:.3g})",
                           part=part1, parts=parts, details=part1_df, notes=notes,
                           p_value=part1.p_opposite)
        return _inconclusive(cid, reason, notes, parts=parts, details=part1_df)
    part2, gap_df, pooled = _paired_ratio_part(
        pairs, "identity_gap", lambda _: True, "identity_gap resnet vs plain at matched blocks",
        "identity_gap", notes)
    details = pd.concat([part1_df, gap_df.assign(part="identity_gap")], ignore_index=True)
    if part2 is None:
        reason = "fewer than two plain/residual pairs with identity_gap at matched blocks"
        return _inconclusive(cid, reason, notes, parts=parts, details=details)
    parts.append(part2)
    res = _decide(cid, parts, details=details, notes=notes)
    desc = _pooled_wilcoxon(pooled, "identity_gap, pooled blocks")
    if desc is not None:
        res.tests = _rows(parts + [desc])
    return res


def bn_grad_slope(run: LoadedRun, steps: Sequence[int]) -> float:
    """Least-squares slope of log10(response_grad_norm) on forward rank over 3x3-conv BNs.

    Averaging log10 values over ``steps`` first; decades per layer; NaN with < 3 layers. Values
    that are not finite and positive are left out; a layer left with none drops out of the fit
    but keeps its rank (the others are not moved up a place).
    """
    return _bn_grad_slope(run, steps)[0]


def _bn_grad_slope(run: LoadedRun, steps: Sequence[int]) -> tuple[float, int]:
    """:func:`bn_grad_slope` and how many values it left out (not finite and positive)."""
    t = run.rows_at("response_grad_norm", steps)
    # The name test once per layer, not per row: early training of a long run is ~1M rows.
    t = t[t["layer"].isin([x for x in pd.unique(t["layer"]) if is_conv_bn(str(x))])]
    if t.empty:
        return float("nan"), 0
    v = t["value"].to_numpy(dtype=float)
    ok = np.isfinite(v) & (v > 0)
    per = (t.assign(lv=np.where(ok, np.log10(np.where(ok, v, 1.0)), np.nan))
           .groupby("layer", observed=True).agg(depth=("depth", "first"), lv=("lv", "mean"))
           .sort_values("depth", kind="stable"))
    rank = np.arange(len(per), dtype=float)  # every measured layer's place in forward order
    lv = per["lv"].to_numpy()
    fit = np.isfinite(lv)
    if fit.sum() < 3:
        return float("nan"), int((~ok).sum())
    return float(np.polyfit(rank[fit], lv[fit], 1)[0]), int((~ok).sum())


def _early_steps(run: LoadedRun) -> np.ndarray:
    steps = run.steps("response_grad_norm")
    if len(steps) == 0:
        return steps
    cutoff = EARLY_FRACTION * steps.max()
    early = steps[steps <= cutoff]
    return early if len(early) else steps[:1]


def gradient_flow(runs: Sequence[LoadedRun]) -> ClaimResult:
    """Gradient norms change through depth more in plain than in residual nets (|slope| test).

    Early training is used because that is where plain nets' optimization difficulty starts; the
    init and final slopes are listed for comparison.
    """
    cid = "gradient-flow"
    got = _paired_runs(cid, runs, "response_grad_norm")
    if isinstance(got, ClaimResult):
        return got
    sel, pairs, notes = got
    notes = list(notes)
    rows = []
    for depth, seed, p, q in pairs:
        row = {"depth": depth, "seed": seed, "plain_run": p.name, "residual_run": q.name}
        for tag, run in (("plain", p), ("residual", q)):
            steps = run.steps("response_grad_norm")
            early = _early_steps(run)
            row[f"slope_{tag}"], left_out = _bn_grad_slope(run, early)
            row[f"slope_{tag}_init"] = bn_grad_slope(run, [0])
            row[f"slope_{tag}_final"] = bn_grad_slope(run, [int(steps.max())])
            if left_out:
                notes.append(f"{run.name}: {left_out} response_grad_norm value(s) in the first "
                             "10% of training not finite and positive; left out of its slope")
            if len(early) == 1 and len(steps) > 1:
                notes.append(f"{run.name}: the first 10% of training holds one logged step "
                             f"({int(early[0])}); its early slope is the slope at that step")
        row["d_abs_slope"] = abs(row["slope_plain"]) - abs(row["slope_residual"])
        if not np.isfinite(row["d_abs_slope"]):
            notes.append(f"pair {p.name} / {q.name} not used: a slope is undefined (fewer than "
                         "3 BN layers with finite, positive response_grad_norm)")
        rows.append(row)
    details = pd.DataFrame(rows)
    ok = np.isfinite(details["d_abs_slope"].to_numpy())
    if ok.sum() < 2:
        return _inconclusive(cid, "fewer than two plain/residual pairs with >= 3 BN layers of "
                             "response_grad_norm", notes, details=details)
    part = _strat_part(details["d_abs_slope"].to_numpy()[ok], details["depth"].to_numpy()[ok],
                       "greater", name="|slope| plain - residual",
                       test="one-sample t-test on per-pair |slope| difference, one-sided",
                       effect_name="mean |slope| plain - residual (decades per layer)",
                       transform=float,
                       says="gradient norms change through depth more in plain nets",
                       opposite="gradient norms change through depth significantly more in "
                                "residual nets")
    return _decide(cid, [part], details=details, notes=notes)


CLAIM_FUNCTIONS: dict[str, Callable[[Sequence[LoadedRun]], ClaimResult]] = {
    "degradation": degradation,
    "smaller-responses": smaller_responses,
    "near-identity": near_identity,
    "gradient-flow": gradient_flow,
}


def evaluate_claims(runset: RunSet, ids: Sequence[str] = CLAIMS) -> list[ClaimResult]:
    """Test each claim within each dataset separately (never across datasets)."""
    out = []
    for dataset, runs in runset.by_dataset().items():
        for cid in ids:
            res = CLAIM_FUNCTIONS[cid](runs)
            res.dataset = dataset
            out.append(res)
    return out
