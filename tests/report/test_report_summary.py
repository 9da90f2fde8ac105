"""Long runs are summarised while they are read: the claims' numbers must not change.

Every test compares a summarised load with the whole-table load of the same runs. Runs are
summarised when they have more than ``load.MAX_POINTS`` distinct logged steps; the tests lower
that threshold rather than write 100k-step runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic_runs import make_run

from gradlab.report import build_report, load_runs
from gradlab.report import load as L
from gradlab.report.claims import _early_steps, bn_grad_slope, evaluate_claims
from gradlab.runs import METRICS_SCHEMA, read_metrics

LAYER_METRICS = ("grad_norm", "weight_norm", "response_std", "response_grad_norm",
                 "residual_ratio", "identity_gap")


@pytest.fixture
def summarise(monkeypatch: pytest.MonkeyPatch):
    """Lower the threshold so the synthetic runs (61 logged steps) are summarised."""

    def at(points: int = 10) -> None:
        monkeypatch.setattr(L, "MAX_POINTS", points)

    return at


def split_parts(run: Path, every: int, *, eval_rows_in_previous: bool = True) -> None:
    """Rewrite a run's single part as several, the way a long run writes them: parts of
    ``every`` logged steps, test_* rows of step s written with the part holding the step before
    (the training loop writes evaluation rows at ``step + 1``), so neighbours share a step."""
    src = next((run / "metrics").glob("*.parquet"))
    df = pd.read_parquet(src)
    src.unlink()
    steps = np.unique(df["step"])
    owner = np.searchsorted(steps, df["step"])  # index of the row's step
    if eval_rows_in_previous:
        ev = df["metric"].str.startswith("test_").to_numpy() & (owner > 0)
        owner = np.where(ev, owner - 1, owner)
    for i, part in enumerate(np.unique(owner // every)):
        rows = df[(owner // every) == part]
        pq.write_table(pa.Table.from_pandas(rows, schema=METRICS_SCHEMA, preserve_index=False),
                       run / "metrics" / f"part-{i + 1:06d}.parquet")


def assert_same_run(a: L.LoadedRun, b: L.LoadedRun) -> None:
    """Every LoadedRun answer the claims and figures use, whole table (a) vs summary (b)."""
    assert not a.summarised and b.summarised
    assert a.logged_steps == b.logged_steps
    for m in L.REPORT_METRICS:
        assert a.has(m) == b.has(m), m
        np.testing.assert_array_equal(a.steps(m), b.steps(m))
        pd.testing.assert_series_equal(a.scalar(m), b.scalar(m))
        assert a.final_scalar(m) == pytest.approx(b.final_scalar(m), nan_ok=True)
        np.testing.assert_array_equal(a.tail_steps(m), b.tail_steps(m))
        for fraction in (L.TAIL_FRACTION, 0.25):
            pd.testing.assert_frame_equal(a.final_layers(m, fraction),
                                          b.final_layers(m, fraction), rtol=1e-12)
        steps = a.steps(m)
        for step in (None, 0, *steps[[0, len(steps) // 2, -1]].tolist()) if len(steps) else ():
            pd.testing.assert_frame_equal(a.layers_at(m, step), b.layers_at(m, step))
        if len(steps):
            some = steps[len(steps) // 3: len(steps) // 2]
            pd.testing.assert_frame_equal(a.layers_over(m, some), b.layers_over(m, some),
                                          rtol=1e-12)
            # the same rows in the same order (the layer categories may list other layers)
            pd.testing.assert_frame_equal(
                a.rows_at(m, some).astype({"layer": str}).reset_index(drop=True),
                b.rows_at(m, some).astype({"layer": str}).reset_index(drop=True))
    assert bn_grad_slope(a, _early_steps(a)) == bn_grad_slope(b, _early_steps(b))


def test_summary_answers_like_the_whole_table(supported_suite: Path, summarise) -> None:
    runs = [supported_suite / "plain56-s0", supported_suite / "resnet56-s1"]
    whole = load_runs(runs)
    summarise()
    summary = load_runs(runs)
    for a, b in zip(whole.runs, summary.runs, strict=True):
        assert a.name == b.name
        assert_same_run(a, b)
        # the per-layer rows kept exactly are few: first, last and (gradient-flow) early steps
        kept = b.tables["response_std"]["step"].unique()
        assert set(kept) == {0, 600}
        early = b.tables["response_grad_norm"]["step"].unique()
        assert set(early) == {*range(0, 61, 10), 600}


def test_claims_are_the_same_from_summaries(supported_suite: Path, opposite_suite: Path,
                                            summarise) -> None:
    whole = [evaluate_claims(load_runs([s])) for s in (supported_suite, opposite_suite)]
    summarise()
    summary = [evaluate_claims(load_runs([s])) for s in (supported_suite, opposite_suite)]
    for xs, ys in zip(whole, summary, strict=True):
        for x, y in zip(xs, ys, strict=True):
            assert (x.id, x.verdict, x.reason, x.n) == (y.id, y.verdict, y.reason, y.n)
            for f in ("statistic", "p_value", "effect_size", "ci_low", "ci_high"):
                assert getattr(x, f) == pytest.approx(getattr(y, f), rel=1e-9, nan_ok=True)
            pd.testing.assert_frame_equal(x.details, y.details, rtol=1e-9)


def test_parts_sharing_a_step_are_merged_once(tmp_path: Path, summarise) -> None:
    run = make_run(tmp_path, "resnet20", 0)
    split_parts(run, every=7)
    parts = sorted((run / "metrics").glob("*.parquet"))
    assert len(parts) == 9
    # a row repeated across the shared step: the later part's copy wins, as in read_metrics
    last = pd.read_parquet(parts[1])
    shared = last["step"].min()
    first = pd.read_parquet(parts[0])
    extra = last[(last["step"] == shared) & (last["metric"] == "response_std")].head(3)
    pq.write_table(pa.Table.from_pandas(pd.concat([first, extra.assign(value=-1.0)]),
                                        schema=METRICS_SCHEMA, preserve_index=False), parts[0])
    whole = load_runs([run]).runs[0]
    summarise()
    summary = load_runs([run]).runs[0]
    assert_same_run(whole, summary)
    assert (summary.rows_at("response_std", [shared])["value"] > 0).all()
    assert len(summary.scalar("test_loss")) == len(whole.scalar("test_loss")) == 7


def test_interleaved_parts_are_read_whole(tmp_path: Path, summarise) -> None:
    # Parts whose steps interleave (copied together by hand) cannot be streamed in order.
    run = make_run(tmp_path, "resnet20", 0)
    split_parts(run, every=7)
    parts = sorted((run / "metrics").glob("*.parquet"))
    parts[0].rename(run / "metrics" / "part-000099.parquet")
    summarise()
    r = load_runs([run]).runs[0]
    assert not r.summarised
    assert r.logged_steps == 60


def test_binned_series(supported_suite: Path, summarise) -> None:
    summarise(points=8)
    r = load_runs([supported_suite / "resnet56-s0"]).runs[0]
    raw = read_metrics(r.path, metrics=["residual_ratio"])
    b = r.summary.binned("residual_ratio")
    assert b["bin"].max() < 8 and b["rows"].sum() == len(raw)
    one = raw[raw["layer"] == "layer2.3"]
    got = b[b["layer"] == "layer2.3"]
    idx = np.clip(np.searchsorted(r.summary.edges, one["step"], side="right") - 1, 0, 7)
    want = one.assign(bin=idx).groupby("bin").agg(step=("step", "mean"), value=("value", "mean"),
                                                  min=("value", "min"), max=("value", "max"))
    np.testing.assert_allclose(got[["step", "value", "min", "max"]].to_numpy(),
                               want.to_numpy(), rtol=1e-12)
    # metric() of a summarised run is the binned series (what figures draw)
    assert len(r.metric("residual_ratio")) == len(b)


def test_nan_values_are_skipped_in_means_as_pandas_does(tmp_path: Path, summarise) -> None:
    run = make_run(tmp_path, "resnet20", 0)
    part = next((run / "metrics").glob("*.parquet"))
    df = pd.read_parquet(part)
    bad = (df["metric"] == "response_std") & (df["step"] == 600) & (df["layer"] == "bn1")
    df.loc[bad, "value"] = np.nan
    nan_layer = (df["metric"] == "weight_norm") & (df["layer"] == "fc") & (df["step"] >= 550)
    df.loc[nan_layer, "value"] = np.nan
    pq.write_table(pa.Table.from_pandas(df, schema=METRICS_SCHEMA, preserve_index=False), part)
    whole = load_runs([run]).runs[0]
    summarise()
    summary = load_runs([run]).runs[0]
    assert_same_run(whole, summary)
    assert np.isnan(summary.final_layers("weight_norm").set_index("layer").loc["fc", "value"])


def test_long_runs_load_in_worker_processes(supported_suite: Path, summarise,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    summarise()
    alone = load_runs([supported_suite])
    monkeypatch.setattr(L, "PARALLEL_MIN_BYTES", 0)
    side = load_runs([supported_suite])  # fresh processes: the threshold is passed to them
    assert [r.name for r in side.runs] == [r.name for r in alone.runs]
    assert all(r.summarised for r in side.runs)
    for a, b in zip(alone.runs, side.runs, strict=True):
        pd.testing.assert_frame_equal(a.final_layers("response_std"),
                                      b.final_layers("response_std"))


def test_worker_skips_carry_their_reason(tmp_path: Path, summarise,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(tmp_path, "plain20", 0)
    bad = make_run(tmp_path, "plain20", 1)
    part = next((bad / "metrics").glob("*.parquet"))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    summarise()
    monkeypatch.setattr(L, "PARALLEL_MIN_BYTES", 0)
    rs = load_runs([tmp_path])
    assert [r.name for r in rs.runs] == ["plain20-s0"] and rs.runs[0].summarised
    (path, reason), = rs.skipped
    assert path == str(bad.resolve()) and "part-000001.parquet" in reason


def test_a_failed_load_worker_falls_back_to_loading_here(supported_suite: Path, summarise,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    summarise()
    monkeypatch.setattr(L, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(sys, "executable", str(supported_suite / "no-such-python"))
    with pytest.warns(RuntimeWarning, match="load worker failed"):
        rs = load_runs([supported_suite])
    assert len(rs.runs) == 12 and all(r.summarised for r in rs.runs)


def test_report_from_summarised_runs(supported_suite: Path, summarise, tmp_path: Path) -> None:
    summarise(points=20)
    rep = build_report([supported_suite], tmp_path, formats=())
    assert all(c.verdict == "supported" for c in rep.claims)
    caption = dict((n, c) for n, c, _ in rep.figures)["residual_ratio_heatmap"]
    assert "summarised while loading into 20 step bins" in caption


# -- read_metrics, as the report reads short runs ------------------------------------------------
@pytest.mark.parametrize("categorical", [False, True], ids=["strings", "categorical"])
def test_read_metrics_keeps_the_latest_copy_of_a_repeated_row(tmp_path: Path,
                                                             categorical: bool) -> None:
    # Parts with disjoint, shared and overlapping step ranges (a resume over old parts), and
    # a row repeated inside the overlap: the result must be the whole-table de-duplication.
    rng = np.random.default_rng(0)
    (tmp_path / "metrics").mkdir()
    frames = []
    for i, (lo, hi) in enumerate([(0, 9), (9, 19), (20, 29), (25, 34), (40, 44)]):
        steps = np.repeat(np.arange(lo, hi + 1), 3)
        n = len(steps)
        df = pd.DataFrame({"step": steps, "layer": np.tile(["", "a", "b"], n // 3),
                           "depth": np.tile(np.array([-1, 0, 1], np.int32), n // 3),
                           "metric": np.tile(["loss", "grad_norm", "grad_norm"], n // 3),
                           "value": rng.normal(size=n)})
        frames.append(df)
        pq.write_table(pa.Table.from_pandas(df, schema=METRICS_SCHEMA, preserve_index=False),
                       tmp_path / "metrics" / f"part-{i + 1:06d}.parquet")
    want = (pd.concat(frames, ignore_index=True)
            .drop_duplicates(["step", "layer", "metric"], keep="last", ignore_index=True))
    got = read_metrics(tmp_path, categorical=categorical)
    assert len(want) == 3 * 40  # 46 steps written, 9 and 25-29 twice: 40 distinct
    if categorical:
        assert isinstance(got["layer"].dtype, pd.CategoricalDtype)
        got = got.astype({"layer": object, "metric": object})
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert list(got.dtypes.astype(str))[::2] == ["int64", "int32", "float64"]
