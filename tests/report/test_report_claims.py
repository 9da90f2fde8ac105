"""The four claims on synthetic runs with planted truth: verdicts, reasons and numbers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats
from synthetic_runs import CLAIM_IDS, make_run, make_suite

from gradlab.report import CLAIMS, load_runs
from gradlab.report.claims import (
    CLAIM_FUNCTIONS,
    ClaimResult,
    bn_grad_slope,
    evaluate_claims,
    holm,
    is_conv_bn,
    t_mean_ci,
    welch_contrast,
    welch_diff_ci,
)


def _verdicts(path: Path, **kw) -> dict[str, ClaimResult]:
    return {c.id: c for c in evaluate_claims(load_runs([path]), **kw)}


@pytest.fixture(scope="module")
def supported(supported_suite: Path) -> dict[str, ClaimResult]:
    return _verdicts(supported_suite)


@pytest.fixture(scope="module")
def opposite(opposite_suite: Path) -> dict[str, ClaimResult]:
    return _verdicts(opposite_suite)


def test_claim_ids() -> None:
    assert CLAIMS == CLAIM_IDS == tuple(CLAIM_FUNCTIONS)


@pytest.mark.parametrize("cid", CLAIM_IDS)
def test_planted_effect_is_supported(supported: dict[str, ClaimResult], cid: str) -> None:
    c = supported[cid]
    assert c.verdict == "supported", c.reason
    # (degradation's headline is its per-seed depth-penalty contrast, over 3 seeds: the part
    # with the larger p of the two that must be significant)
    assert c.p_value < 0.05 and c.n == (3 if cid == "degradation" else 6)
    assert c.dataset == "digits"
    assert c.ci_low <= c.effect_size <= c.ci_high
    assert c.test and c.effect_name and c.method and c.source and c.statement
    assert not c.details.empty and not c.tests.empty


@pytest.mark.parametrize("cid", CLAIM_IDS)
def test_opposite_effect_is_contradicted(opposite: dict[str, ClaimResult], cid: str) -> None:
    c = opposite[cid]
    assert c.verdict == "contradicted", c.reason
    assert c.p_value < 0.05 and "significantly" in c.reason


def _part(c: ClaimResult, name: str) -> pd.Series:
    return c.tests.set_index("part").loc[name]


def test_planted_numbers_come_back(supported: dict[str, ClaimResult]) -> None:
    # Degradation: plain56 ends ~0.45, plain20 ~0.20 (conftest table), residual nets -0.05.
    assert _part(supported["degradation"], "plain56 vs plain20")["effect"] == pytest.approx(
        0.25, abs=0.03)
    assert supported["degradation"].effect_size == pytest.approx(0.30, abs=0.03)
    # Near-identity: each block's final residual_ratio is 0.3 x lognormal noise.
    assert supported["near-identity"].effect_size == pytest.approx(0.3, rel=0.15)
    # Gradient flow: |slope| 0.05 (plain) vs 0.004 (residual) decades per BN layer.
    assert supported["gradient-flow"].effect_size == pytest.approx(0.046, abs=0.002)
    tests = supported["smaller-responses"].tests.set_index("part")
    assert set(tests["role"]) == {"claim", "descriptive", "depth"}
    # Pairs of depth 20 and 56 are tested stratified by depth; each depth is listed on its own.
    assert tests.loc["resnet vs plain at matched layers, depth 20 only", "effect"] == \
        pytest.approx(0.6, abs=0.03)
    assert tests.loc["resnet vs plain at matched layers, depth 56 only", "effect"] == \
        pytest.approx(0.45, abs=0.03)
    # resnet20: 0.6 x plain; resnet56: 0.6 x 0.75 x plain -> geometric mean of the pairs ~0.52.
    assert tests.loc["resnet vs plain at matched layers", "effect"] == pytest.approx(0.52,
                                                                                      abs=0.03)
    assert tests.loc["depth trend among residual nets", "effect"] == pytest.approx(0.75,
                                                                                    abs=0.03)


def test_degradation_matches_a_direct_welch_test(supported_suite: Path) -> None:
    rs = load_runs([supported_suite])
    final = {(r.model, r.seed): r.final_scalar("loss") for r in rs.runs}
    deep = [final[("plain56", s)] for s in range(3)]
    shallow = [final[("plain20", s)] for s in range(3)]
    ref = stats.ttest_ind(deep, shallow, equal_var=False, alternative="greater")
    c = CLAIM_FUNCTIONS["degradation"](rs.runs)
    part = _part(c, "plain56 vs plain20")
    assert part["statistic"] == pytest.approx(ref.statistic)
    assert part["p_claimed"] == pytest.approx(ref.pvalue)
    assert part["effect"] == pytest.approx(np.mean(deep) - np.mean(shallow))
    assert (part["ci_low"], part["ci_high"]) == pytest.approx(welch_diff_ci(deep, shallow))


def test_degradation_reports_the_depth_penalty_contrast(supported_suite: Path) -> None:
    rs = load_runs([supported_suite])
    final = {(r.model, r.seed): r.final_scalar("loss") for r in rs.runs}
    mean = {m: np.mean([final[(m, s)] for s in range(3)])
            for m in ("plain20", "plain56", "resnet20", "resnet56")}
    c = CLAIM_FUNCTIONS["degradation"](rs.runs)
    part = c.tests.set_index("part").loc["depth penalty, plain - residual"]
    # All four models have seeds 0-2: the contrast is formed per seed (a seed's runs share
    # their data order) and tested over the 3 seeds.
    d = [(final[("plain56", s)] - final[("plain20", s)])
         - (final[("resnet56", s)] - final[("resnet20", s)]) for s in range(3)]
    ref = stats.ttest_1samp(d, 0.0, alternative="greater")
    assert part["role"] == "claim" and part["n"] == 3 and "per-seed" in part["test"]
    assert part["statistic"] == pytest.approx(ref.statistic)
    assert part["p_claimed"] == pytest.approx(ref.pvalue)
    assert part["effect"] == pytest.approx((mean["plain56"] - mean["plain20"])
                                           - (mean["resnet56"] - mean["resnet20"]))
    assert (part["ci_low"], part["ci_high"]) == pytest.approx(t_mean_ci(d))
    assert part["p_claimed"] < 0.05  # planted: plain degrades by 0.25, residual not at all
    # Supported needs it: the headline is the required part with the larger p (here this one).
    parts = c.tests.set_index("part")
    assert c.verdict == "supported" and c.p_value == pytest.approx(max(
        part["p_claimed"], parts.loc["plain56 vs plain20", "p_claimed"]))


def test_depth_penalty_without_shared_seeds_is_a_welch_contrast() -> None:
    from types import SimpleNamespace

    from gradlab.report.claims import _depth_penalty_part

    rng = np.random.default_rng(4)
    seeds = {("plain", 56): [0, 1, 2, 3], ("plain", 20): [0, 1, 2], ("residual", 56): [0, 1, 2],
             ("residual", 20): [0, 1, 2]}  # plain56 has a fourth seed: not paired
    rows = [{"family": f, "depth": d, "seed": s, "final_loss": rng.normal(0.1 * d, 0.3)}
            for (f, d), ss in seeds.items() for s in ss]
    details = pd.DataFrame(rows)
    run = SimpleNamespace
    sel = SimpleNamespace(plain={56: [run(model="plain56")], 20: [run(model="plain20")]},
                          residual={56: [run(model="resnet56")], 20: [run(model="resnet20")]})
    part = _depth_penalty_part(details, sel, 20, 56)
    groups = [details.query("family == @f and depth == @d")["final_loss"].to_numpy()
              for f, d in seeds]
    est, t, p_gt, p_lt, ci = welch_contrast(groups, [1, -1, -1, 1])
    assert "Welch-Satterthwaite" in part.test and part.n == 13
    assert (part.effect, part.statistic, part.p, part.p_opposite, *part.ci) == pytest.approx(
        (est, t, p_gt, p_lt, *ci))
    assert p_gt + p_lt == pytest.approx(1.0)


def test_welch_contrast_matches_ols_interaction_and_welch() -> None:
    # Four groups with the same spread (the same deviations around different means): the
    # Welch-Satterthwaite contrast is then exactly the OLS interaction t-test (df = N - 4).
    dev = np.array([-1.0, 0.0, 1.5, -0.2])
    means = {(1, 1): 0.9, (1, 0): 0.2, (0, 1): 0.35, (0, 0): 0.3}  # (plain, deep)
    y, rows = [], []
    for (plain, deep), m in means.items():
        y += list(m + 0.1 * dev)
        rows += [[1.0, plain, deep, plain * deep]] * len(dev)
    x, y = np.array(rows), np.array(y)
    beta, rss, *_ = np.linalg.lstsq(x, y, rcond=None)
    df = len(y) - 4
    se = np.sqrt(rss[0] / df * np.linalg.inv(x.T @ x)[3, 3])
    t_ref = beta[3] / se
    groups = [m + 0.1 * dev for m in means.values()]
    est, t, p_gt, p_lt, (lo, hi) = welch_contrast(groups, [1, -1, -1, 1])
    assert est == pytest.approx(beta[3]) and t == pytest.approx(t_ref)
    assert p_gt == pytest.approx(stats.t.sf(t_ref, df)) and p_lt == pytest.approx(
        stats.t.cdf(t_ref, df))
    half = stats.t.ppf(0.975, df) * se
    assert (lo, hi) == pytest.approx((beta[3] - half, beta[3] + half))
    # Two groups, weights (1, -1): Welch's t-test, unequal variances and sizes.
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 0.5, 3), rng.normal(0.0, 2.0, 5)
    ref = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    est, t, p_gt, _, ci = welch_contrast([a, b], [1, -1])
    assert t == pytest.approx(ref.statistic) and p_gt == pytest.approx(ref.pvalue)
    assert ci == pytest.approx(welch_diff_ci(a, b))
    # Degenerate input: too few values, or no spread at all (no evidence either way).
    assert welch_contrast([[1.0], [2.0, 3.0]], [1, -1])[2:4] == (1.0, 1.0)
    est, t, p_gt, p_lt, ci = welch_contrast([[1.0, 1.0], [0.5, 0.5]], [1, -1])
    assert (est, p_gt, p_lt, ci) == (0.5, 1.0, 1.0, (0.5, 0.5)) and np.isnan(t)


def test_no_effect_is_inconclusive_not_significant(tmp_path: Path) -> None:
    # Under no effect each claim still comes out significant (either way) about 5% of the time;
    # the noise of this fixed draw (dataset "d0" seeds it) happens to reach no significance.
    make_suite(tmp_path, truth=dict.fromkeys(CLAIM_IDS, 0), noise=0.2, dataset="d0")
    got = _verdicts(tmp_path)
    for cid in CLAIM_IDS:
        assert got[cid].verdict == "inconclusive", (cid, got[cid].reason)
        assert got[cid].reason.startswith("not significant (p=")


def test_runs_without_a_seed_are_never_paired(tmp_path: Path) -> None:
    make_suite(tmp_path)
    for model in ("plain20", "resnet20"):  # two unseeded runs each: independent, not pairs
        for i in range(2):
            make_run(tmp_path, model, None, name=f"{model}-noseed{i}")
    got = _verdicts(tmp_path)
    for cid in ("smaller-responses", "near-identity", "gradient-flow"):
        c = got[cid]
        assert c.verdict == "supported", (cid, c.reason)
        # The paired parts use the 3 seeds x 2 depths of same-seed pairs, as without them (a
        # None "pair" made 7); the per-run parts keep all 8 residual runs.
        ns = sorted(c.tests.query("role == 'claim'")["n"])
        assert ns == ([6] if cid == "gradient-flow" else [6, 8]), (cid, ns)
        assert any("plain20-noseed0, plain20-noseed1, resnet20-noseed0, resnet20-noseed1 "
                   "record no seed and are not paired" in n for n in c.notes), c.notes
    # Unpaired tests keep them as replicates (degradation's per-family Welch tests).
    assert got["degradation"].n == 8


def test_one_seed_is_inconclusive_for_every_claim(tmp_path: Path) -> None:
    make_suite(tmp_path, seeds=(0,))
    for cid, c in _verdicts(tmp_path).items():
        assert c.verdict == "inconclusive", cid
        assert "only one seed per model" in c.reason and "resnet56: seed 0" in c.reason


def test_missing_plain_counterpart_is_named(tmp_path: Path) -> None:
    make_suite(tmp_path, models=("plain20", "resnet20", "resnet56"))
    got = _verdicts(tmp_path)
    deg = got["degradation"]
    assert deg.verdict == "inconclusive"
    assert "no plain counterpart for resnet56" in deg.reason
    # Paired claims still test the depth that has both, and say what was left out.
    assert got["gradient-flow"].verdict == "supported"
    assert got["gradient-flow"].n == 3
    assert any("resnet56 has no plain counterpart" in n for n in got["gradient-flow"].notes)


def test_no_plain_nets_at_all(tmp_path: Path) -> None:
    make_suite(tmp_path, models=("resnet20", "resnet56"))
    got = _verdicts(tmp_path)
    for cid in ("degradation", "smaller-responses", "gradient-flow"):
        assert got[cid].verdict == "inconclusive"
        assert "no plain counterpart for resnet20; no plain counterpart for resnet56" in \
            got[cid].reason


def test_no_residual_nets_at_all(tmp_path: Path) -> None:
    make_suite(tmp_path, models=("plain20", "plain56"))
    got = _verdicts(tmp_path)
    assert got["near-identity"].reason == "no residual nets to test (only plain20, plain56)"
    assert got["gradient-flow"].reason == ("no residual counterpart for plain20; "
                                           "no residual counterpart for plain56")


def test_too_few_logged_steps_is_inconclusive(tmp_path: Path) -> None:
    make_suite(tmp_path, steps=30, every=10)  # 3 logged steps after init
    for cid, c in _verdicts(tmp_path).items():
        assert c.verdict == "inconclusive", cid
        assert c.reason.startswith("too few logged steps"), c.reason
        assert "plain20-s0 has 3" in c.reason


def test_failed_runs_are_excluded_with_their_reason(tmp_path: Path) -> None:
    make_suite(tmp_path)
    make_run(tmp_path, "plain56", 3, status="failed",
             failure={"reason": "loss is NaN", "step": 120, "layer": "layer2.3.bn1"})
    c = _verdicts(tmp_path)["degradation"]
    assert c.verdict == "supported" and _part(c, "plain56 vs plain20")["n"] == 6
    assert "plain56-s3 excluded (status failed: loss is NaN)" in c.notes


def test_mixed_datasets_are_tested_separately(tmp_path: Path) -> None:
    make_suite(tmp_path)
    make_suite(tmp_path, dataset="cifar10", seeds=(0,))
    results = evaluate_claims(load_runs([tmp_path]), ids=["degradation"])
    by = {c.dataset: c for c in results}
    assert set(by) == {"digits", "cifar10"}
    assert by["digits"].verdict == "supported"
    assert by["cifar10"].verdict == "inconclusive" and "one seed" in by["cifar10"].reason


def test_deeper_residual_worse_contradicts_degradation(tmp_path: Path) -> None:
    # Plain degrades as claimed, but the deeper residual net is clearly worse too.
    make_suite(tmp_path, models=("plain20", "plain56"))
    make_suite(tmp_path, models=("resnet20", "resnet56"), truth={"degradation": -1})
    c = _verdicts(tmp_path)["degradation"]
    assert c.verdict == "contradicted"
    assert "resnet56 ends with significantly higher loss than resnet20" in c.reason


def test_conv_bn_layers() -> None:
    assert is_conv_bn("bn1") and is_conv_bn("layer2.3.bn2")
    assert not is_conv_bn("fc") and not is_conv_bn("layer2.0.shortcut.1")
    assert not is_conv_bn("layer2.3") and not is_conv_bn("layer2.3.conv1")


def test_holm() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_confidence_intervals_are_those_of_the_tests() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, 7)
    ref = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    assert t_mean_ci(x) == pytest.approx((ref.low, ref.high))
    assert t_mean_ci(x, np.exp) == pytest.approx((np.exp(ref.low), np.exp(ref.high)))
    a, b = rng.normal(1.0, 0.5, 3), rng.normal(0.0, 2.0, 4)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert welch_diff_ci(a, b) == pytest.approx((ref.low, ref.high))
    assert np.isnan(t_mean_ci([1.0])[0]) and np.isnan(welch_diff_ci([1.0], [2.0, 3.0])[0])
    assert welch_diff_ci([1.0, 1.0], [2.0, 2.0]) == (-1.0, -1.0)  # no spread: zero width


@pytest.mark.parametrize("seed", range(40))
def test_an_interval_never_contradicts_its_test(seed: int) -> None:
    # With 2-4 runs a percentile bootstrap interval can exclude 0 while the t-test says p > 0.1
    # (d = [-0.2, -0.05]: bootstrap (-0.2, -0.05), one-sided p = 0.17). The t interval excludes
    # 0 exactly when the two-sided p < 0.05, i.e. the one-sided p in that direction < 0.025.
    rng = np.random.default_rng(seed)
    d = rng.normal(rng.normal(0, 0.5), 0.3, int(rng.integers(2, 5)))
    lo, hi = t_mean_ci(d)
    p_two = stats.ttest_1samp(d, 0.0).pvalue
    assert (lo > 0 or hi < 0) == (p_two < 0.05)
    a, b = rng.normal(0.3, 0.2, 3), rng.normal(0.0, 0.2, 3)
    lo, hi = welch_diff_ci(a, b)
    assert (lo > 0 or hi < 0) == (stats.ttest_ind(a, b, equal_var=False).pvalue < 0.05)


def test_small_sample_interval_agrees_with_the_test() -> None:
    lo, hi = t_mean_ci([-0.2, -0.05])
    assert lo < 0 < hi


def test_trend_interval_is_the_slope_t_interval(supported: dict[str, ClaimResult]) -> None:
    t = supported["smaller-responses"].details
    t = t[t["part"] == "depth trend"]
    x, y = t["depth"].to_numpy(float), np.log(t["mean_response_std"].to_numpy(float))
    fit = stats.linregress(x, y)
    half = stats.t.ppf(0.975, len(x) - 2) * fit.stderr
    span = x.max() - x.min()
    row = supported["smaller-responses"].tests.set_index("part").loc[
        "depth trend among residual nets"]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(
        (np.exp((fit.slope - half) * span), np.exp((fit.slope + half) * span)))


def _poison(run_dir: Path, metric: str, steps, value: float, layer: str | None = None) -> None:
    """Set ``metric`` (of ``layer``, or of every layer) at ``steps`` to ``value`` in place, as a
    step skipped by ``--on-nonfinite skip`` leaves it."""
    part = run_dir / "metrics" / "part-000001.parquet"
    df = pq.read_table(part).to_pandas()
    hit = (df["metric"] == metric) & df["step"].isin(list(steps))
    if layer is not None:
        hit &= df["layer"] == layer
    assert hit.any()
    df.loc[hit, "value"] = value
    schema = pq.read_schema(part)
    pq.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), part)


def test_nonfinite_values_are_left_out_of_final_means_and_named(tmp_path: Path) -> None:
    make_suite(tmp_path)
    # A skipped step near the end of two plain56 runs: inf loss, and inf/NaN responses.
    for s, v in ((0, np.inf), (1, np.nan)):
        _poison(tmp_path / f"plain56-s{s}", "loss", [590], np.inf)
        _poison(tmp_path / f"plain56-s{s}", "response_std", [600], v, "layer1.0.bn1")
        _poison(tmp_path / f"resnet56-s{s}", "residual_ratio", [600], v, "layer1.0")
    got = _verdicts(tmp_path)
    deg = got["degradation"]
    assert deg.verdict == "supported", deg.reason
    assert np.isfinite(deg.details["final_loss"]).all()
    assert _part(deg, "plain56 vs plain20")["effect"] == pytest.approx(0.25, abs=0.03)
    assert any("plain56-s0: 1 non-finite loss value" in n for n in deg.notes)
    assert any("plain56-s1: 1 non-finite loss value" in n for n in deg.notes)
    sr = got["smaller-responses"]
    assert sr.verdict == "supported", sr.reason
    assert any("plain56-s0: 1 non-finite response_std" in n for n in sr.notes)
    assert any("plain56-s1: 1 non-finite response_std" in n for n in sr.notes)
    ni = got["near-identity"]
    assert ni.verdict == "supported", ni.reason
    assert any("resnet56-s1: 1 non-finite residual_ratio" in n for n in ni.notes)
    rs = load_runs([tmp_path])
    run = next(r for r in rs.runs if r.name == "plain56-s0")
    finals = run.scalar("loss")
    tail = finals[finals.index > 0].iloc[-6:]  # 60 logged steps after 0: the last 10% is 6
    assert run.final_scalar("loss") == pytest.approx(tail[np.isfinite(tail)].mean())
    assert run.tail_nonfinite("loss") == 1 and run.tail_nonfinite("response_std") == 1
    layers = run.final_layers("response_std").set_index("layer")
    assert layers.loc["layer1.0.bn1", "nonfinite"] == 1
    assert np.isfinite(layers["value"]).all()


def test_gradient_flow_keeps_ranks_and_names_what_it_left_out(tmp_path: Path) -> None:
    make_suite(tmp_path)
    rs = load_runs([tmp_path])
    run = next(r for r in rs.runs if r.name == "plain56-s0")
    before = bn_grad_slope(run, [0])
    # One middle BN's gradient at init is inf: the other layers keep their ranks, so the slope
    # barely moves (dropping the layer and re-ranking would shift every later layer by one).
    _poison(tmp_path / "plain56-s0", "response_grad_norm", [0], np.inf, "layer2.4.bn1")
    _poison(tmp_path / "plain56-s1", "response_grad_norm", [0, 10, 20, 30, 40, 50, 60],
            np.inf)
    rs = load_runs([tmp_path])
    run = next(r for r in rs.runs if r.name == "plain56-s0")
    assert bn_grad_slope(run, [0]) == pytest.approx(before, rel=0.02)
    c = CLAIM_FUNCTIONS["gradient-flow"](rs.runs)
    assert c.verdict == "supported", c.reason
    assert c.n == 5
    assert any("plain56-s0: 1 response_grad_norm value" in n for n in c.notes)
    assert any("pair plain56-s1 / resnet56-s1 not used" in n for n in c.notes)


def test_early_window_of_one_step_is_named(tmp_path: Path) -> None:
    make_suite(tmp_path, every=100)
    c = CLAIM_FUNCTIONS["gradient-flow"](load_runs([tmp_path]).runs)
    assert any("first 10% of training holds one logged step (0)" in n for n in c.notes)

# -- stratification by depth, and the degradation claim's guards -----------------------------
def test_stratified_test_is_the_fixed_effects_linear_model() -> None:
    from gradlab.report.claims import _stratified_t1

    rng = np.random.default_rng(3)
    depth = np.array([20] * 4 + [56] * 3 + [110] * 5)
    d = np.where(depth == 20, 0.3, np.where(depth == 56, -0.1, 0.05)) + rng.normal(0, 0.1, 12)
    st = _stratified_t1(d, depth, "greater")
    # Independent: least squares on depth indicators; the estimate is the count-weighted mean
    # of the depth effects, its variance c' (X'X)^-1 c s^2 with s^2 on N - J df.
    levels = [20, 56, 110]
    X = (depth[:, None] == np.array(levels)[None, :]).astype(float)
    beta, res, *_ = np.linalg.lstsq(X, d, rcond=None)
    df = len(d) - len(levels)
    s2 = float(res[0]) / df
    c = X.sum(0) / len(d)
    est = float(c @ beta)
    se = float(np.sqrt(s2 * c @ np.linalg.inv(X.T @ X) @ c))
    assert st.est == pytest.approx(est) and st.df == df
    assert st.t == pytest.approx(est / se)
    assert st.p == pytest.approx(stats.t.sf(est / se, df))
    assert st.p_opposite == pytest.approx(stats.t.cdf(est / se, df))
    half = stats.t.ppf(0.975, df) * se
    assert st.ci == pytest.approx((est - half, est + half))
    # Each depth's own test is the one-sample t-test of its values.
    for lv, n, mean, p, _q, ci, t in st.depths:
        x = d[depth == lv]
        ref = stats.ttest_1samp(x, 0, alternative="greater")
        assert (n, mean) == (len(x), pytest.approx(x.mean()))
        assert (t, p) == pytest.approx((ref.statistic, ref.pvalue))
        assert ci == pytest.approx(t_mean_ci(x))
    # One depth: exactly the one-sample t-test.
    one = _stratified_t1(d[:4], depth[:4], "greater")
    ref = stats.ttest_1samp(d[:4], 0, alternative="greater")
    assert (one.t, one.p) == pytest.approx((ref.statistic, ref.pvalue))


def test_an_effect_that_reverses_between_depths_is_not_supported() -> None:
    from gradlab.report.claims import _decide, _strat_part

    # Large at depth 20, small but significantly opposite at depth 56: the pooled (stratified)
    # mean is clearly > 0, yet the claim does not hold at every depth tested.
    d = np.array([0.50, 0.52, 0.48, 0.51, 0.49, -0.05, -0.06, -0.04, -0.05, -0.055])
    depth = np.array([20] * 5 + [56] * 5)
    part = _strat_part(d, depth, "greater", name="x", test="t", effect_name="e",
                       transform=float, says="plain decays more",
                       opposite="residual decays more")
    assert part.p < 0.05 and [q.name for q in part.by_depth] == ["x, depth 20 only",
                                                                  "x, depth 56 only"]
    c = _decide("gradient-flow", [part], details=pd.DataFrame(), notes=[])
    assert c.verdict == "inconclusive"
    assert c.reason.startswith("the effect reverses between depths")
    assert "residual decays more at depth 56" in c.reason
    assert list(c.tests["role"]) == ["claim", "depth", "depth"]
    assert np.isfinite(c.tests["statistic"]).all()
    # The reversal is judged at alpha for that depth alone (no correction for the number of
    # depths): uncorrected p = 0.03 at depth 56 is enough to keep the verdict from being general.
    d56 = np.array([-0.02, -0.005, -0.012, 0.004, -0.01])
    p56 = stats.ttest_1samp(d56, 0, alternative="less").pvalue
    assert 0.025 < p56 < 0.05  # significant alone, not after Holm over two depths
    part = _strat_part(np.r_[d[:5], d56], depth, "greater", name="x", test="t",
                       effect_name="e", transform=float, says="s", opposite="o")
    assert part.p < 0.05
    c = _decide("gradient-flow", [part], details=pd.DataFrame(), notes=[])
    assert c.verdict == "inconclusive" and f"o at depth 56 (p={p56:.3g})" in c.reason
    # Both depths in the claimed direction: supported.
    part = _strat_part(np.abs(d), depth, "greater", name="x", test="t", effect_name="e",
                       transform=float, says="s", opposite="o")
    assert _decide("gradient-flow", [part], details=pd.DataFrame(), notes=[]).verdict == \
        "supported"


def test_zero_spread_is_no_evidence() -> None:
    from gradlab.report.claims import _t1, _welch

    assert _t1([0.2, 0.2, 0.2], "greater")[1:] == (1.0, 1.0)
    assert _welch([1.0, 1.0], [0.0, 0.0])[1:] == (1.0, 1.0)
    assert _t1([0.2], "greater")[1:] == (1.0, 1.0)


def _set_final_loss(run_dir: Path, value: float) -> None:
    """Every logged loss after step 0 set to ``value`` (so the final loss is exactly it)."""
    part = run_dir / "metrics" / "part-000001.parquet"
    df = pq.read_table(part).to_pandas()
    steps = df.loc[(df["metric"] == "loss") & (df["step"] > 0), "step"].unique()
    _poison(run_dir, "loss", steps, value)


def test_degradation_needs_the_depth_penalty_not_just_a_non_significant_residual(
        tmp_path: Path) -> None:
    # A much worse deeper residual net that a noisy two-seed Welch test cannot call worse.
    make_suite(tmp_path, seeds=(0, 1))
    finals = {"plain20": (0.01, 0.012), "plain56": (1.0, 1.1), "resnet20": (0.010, 0.011),
              "resnet56": (0.02, 1.5)}
    for model, values in finals.items():
        for seed, v in enumerate(values):
            _set_final_loss(tmp_path / f"{model}-s{seed}", v)
    c = _verdicts(tmp_path)["degradation"]
    parts = c.tests.set_index("part")
    assert parts.loc["plain56 vs plain20", "p_claimed"] < 0.05
    assert parts.loc["resnet56 vs resnet20", "p_claimed"] >= 0.05
    assert parts.loc["depth penalty, plain - residual", "p_claimed"] >= 0.05
    assert c.verdict == "inconclusive", c.reason
    assert "depth penalty of plain nets is not shown larger" in c.reason


def test_degradation_with_a_diverged_deeper_residual_run(tmp_path: Path) -> None:
    make_suite(tmp_path)
    # resnet56 seed 0: its whole final window non-finite (a run that went on with skip).
    part = tmp_path / "resnet56-s0" / "metrics" / "part-000001.parquet"
    steps = pq.read_table(part).to_pandas().query("metric == 'loss' and step >= 500")["step"]
    _poison(tmp_path / "resnet56-s0", "loss", steps.unique(), np.nan)
    c = _verdicts(tmp_path)["degradation"]
    assert "resnet56-s0" not in set(c.details["run"])
    assert any(n.startswith("resnet56-s0: no finite loss") for n in c.notes)
    assert c.verdict == "inconclusive" and "resnet56-s0 diverged" in c.reason, c.reason
    # Two such runs leave resnet56 one seed: too few to test at all.
    _poison(tmp_path / "resnet56-s1", "loss", steps.unique(), np.nan)
    c = _verdicts(tmp_path)["degradation"]
    assert c.verdict == "inconclusive"
    assert c.reason.startswith("too few runs with a finite final loss (resnet56 has 1")
    # A stopped (failed) deeper residual run that diverged also keeps support away.
    other = tmp_path / "other"
    make_suite(other)
    make_run(other, "resnet56", 7, status="failed",
             failure={"reason": "non-finite loss at step 120", "step": 120, "layer": None})
    c = _verdicts(other)["degradation"]
    assert c.verdict == "inconclusive" and "resnet56-s7 diverged" in c.reason


def test_runs_of_another_setup_are_neither_duplicates_nor_pooled(tmp_path: Path) -> None:
    import json

    make_suite(tmp_path)
    # The same model and seed as resnet20-s0, but another learning rate: another experiment.
    other = make_run(tmp_path, "resnet20", 0, name="resnet20-s0-lr005")
    info = json.loads((other / "run.json").read_text())
    info["config"]["lr"] = 0.05
    (other / "run.json").write_text(json.dumps(info))
    rs = load_runs([tmp_path])
    assert "resnet20-s0-lr005" in {r.name for r in rs.runs} and not rs.skipped
    got = _verdicts(tmp_path)
    for c in got.values():
        assert ("resnet20-s0-lr005 not used: its training setup differs from the 12 runs "
                "tested (lr 0.05 vs 0.1)") in c.notes, c.id
        assert "resnet20-s0-lr005" not in c.details.to_string()
    assert got["degradation"].verdict == "supported"
    # A diverged run of that other setup does not keep the tested setup from support.
    bad = make_run(tmp_path, "resnet56", 9, name="resnet56-s9-lr2", status="failed",
                   failure={"reason": "non-finite loss at step 40", "step": 40, "layer": None})
    info = json.loads((bad / "run.json").read_text())
    info["config"]["lr"] = 2.0
    (bad / "run.json").write_text(json.dumps(info))
    assert _verdicts(tmp_path)["degradation"].verdict == "supported"
    # lr 1 and lr 1.0 are one setup.
    from gradlab.report.load import setup_of

    runs = {r.name: r for r in load_runs([tmp_path]).runs}
    a = runs["resnet20-s0"]
    a.info["config"]["lr"] = 1
    b = runs["resnet20-s1"]
    b.info["config"]["lr"] = 1.0
    assert setup_of(a) == setup_of(b)
    # Figures leave the other setup out too, and say so.
    import gradlab.report.figures as figures

    caps = [c for _, c, _ in figures.make_figures(load_runs([tmp_path]))]
    assert caps and all("2 run(s) of another training setup" in c for c in caps)
    shutil.rmtree(bad)
    # A true duplicate (same model, seed and setup) is still counted once.
    make_run(tmp_path, "resnet20", 1, name="resnet20-s1-again")
    rs = load_runs([tmp_path])
    assert [why for _, why in rs.skipped if "duplicate" in why] == [
        "duplicate of resnet20-s1 (same model resnet20, dataset, seed 1 and setup); counted "
        "once"] or [why for _, why in rs.skipped if "duplicate" in why] == [
        "duplicate of resnet20-s1-again (same model resnet20, dataset, seed 1 and setup); "
        "counted once"]
