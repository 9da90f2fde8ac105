"""Figures of a report, drawn from run directories: each is ``(name, caption, PNG bytes)``.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot: no
global backend switch, no figure registry to leak memory into, so a long-lived process (a
notebook, the dashboard) can build reports repeatedly. seaborn supplies the style and the
colour-blind-safe palette; plain nets are also drawn dashed, so no figure relies on colour alone.

Aggregation, stated in every caption:

* Curves over steps: a run with more than ``MAX_POINTS`` logged steps is binned into
  ``MAX_POINTS`` equal step ranges (mean per bin); across seeds the line is the mean and the band
  the min-max.
* Per-layer profiles: the mean over seeds of each layer's value (final = mean over the last 10%
  of logged steps, as in the claims), band min-max over seeds, over completed runs only (the
  runs the claims test); curves over steps draw every run. These, and the step-0 and
  last-step profiles, are exact for every run, long or short.
* Long runs (more than ``MAX_POINTS`` distinct logged steps) are summarised while loading (see
  :mod:`~gradlab.report.load`): model-wide scalars are kept whole and binned here as above;
  per-layer series over steps (the residual_ratio heatmap) come from the run's ``MAX_POINTS``
  equal step bins (mean per bin, plotted at the mean step of the bin's rows), averaged into the
  heatmap's columns.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from gradlab.report.claims import is_conv_bn
from gradlab.report.load import MAX_POINTS, LoadedRun, RunSet, main_setup, setup_of

__all__ = ["MAX_POINTS", "HEATMAP_COLUMNS", "DPI", "make_figures", "bin_series"]

HEATMAP_COLUMNS = 200
DPI = 110
FigureTuple = tuple[str, str, bytes]

_STYLE = {"axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
          "ytick.labelsize": 8, "legend.fontsize": 8, "figure.titlesize": 11}


def bin_series(steps: np.ndarray, values: np.ndarray, edges: np.ndarray | None = None,
               max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Mean, min and max of ``values`` per step bin (``step`` = mean step of the bin).

    Returns a frame ``bin, step, mean, min, max``; ``bin`` is the step itself when unbinned.
    Values that are not finite are left out.

    With no ``edges`` and at most ``max_points`` distinct steps, every step is its own bin.
    """
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)  # a skipped step's inf/NaN: left out, as in every mean
    if not finite.all():
        steps, values = steps[finite], values[finite]
    if edges is None:
        edges = _edges(steps, max_points)
    if edges is None:
        df = pd.DataFrame({"bin": steps, "step": steps, "value": values})
    else:
        idx = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, len(edges) - 2)
        df = pd.DataFrame({"bin": idx, "step": steps, "value": values})
    return (df.groupby("bin").agg(step=("step", "mean"), mean=("value", "mean"),
                                  min=("value", "min"), max=("value", "max"))
            .reset_index())


def _edges(steps: np.ndarray, max_points: int) -> np.ndarray | None:
    if len(np.unique(steps)) <= max_points:
        return None
    return np.linspace(steps.min(), steps.max() + 1, max_points + 1)


class _Palette:
    """One colour per model across all figures; plain nets dashed."""

    def __init__(self, models: Sequence[str]):
        colours = sns.color_palette("colorblind", max(len(models), 1))
        self.colour = dict(zip(models, colours, strict=False))

    def style(self, run: LoadedRun) -> dict:
        return {"color": self.colour.get(run.model, "0.3"),
                "linestyle": "-" if run.residual else "--"}


def _groups(runs: Sequence[LoadedRun]) -> dict[str, list[LoadedRun]]:
    out: dict[str, list[LoadedRun]] = {}
    for r in sorted(runs, key=lambda r: (r.residual, r.family, r.depth, r.variant,
                                         r.seed if r.seed is not None else -1)):
        out.setdefault(r.model, []).append(r)
    return out


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    _plain_log_labels(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    fig.clf()  # drop artists now; with no pyplot registry nothing else holds the figure
    return buf.getvalue()


_PLAIN_NUMBERS = FuncFormatter(lambda v, _: f"{v:g}")


def _plain_log_labels(fig: Figure) -> None:
    # Log axes spanning less than a decade label minor ticks as "9x10^-1"; plain numbers read
    # faster.
    for ax in fig.axes:
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_formatter(_PLAIN_NUMBERS)
            ax.yaxis.set_minor_formatter(_PLAIN_NUMBERS if _few_decades(ax)
                                         else FuncFormatter(lambda v, _: ""))


def _few_decades(ax: Axes) -> bool:
    lo, hi = ax.get_ylim()
    return lo > 0 and hi / lo < 30


def _new(ncols: int = 1, nrows: int = 1, *, width: float = 7.6, height: float = 3.4
         ) -> tuple[Figure, np.ndarray]:
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", rc=_STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _seed_curve(ax: Axes, runs: list[LoadedRun], get: Callable[[LoadedRun], pd.Series],
                style: dict, label: str, *, markers: bool = False) -> bool:
    """Mean over seeds with a min-max band; returns whether anything was drawn."""
    series = [get(r) for r in runs]
    series = [s for s in series if len(s)]
    if not series:
        return False
    all_steps = np.concatenate([s.index.to_numpy() for s in series])
    edges = _edges(all_steps, MAX_POINTS)
    binned = [bin_series(s.index.to_numpy(), s.to_numpy(), edges)
              .assign(run=i) for i, s in enumerate(series)]
    df = pd.concat(binned)
    agg = df.groupby("bin").agg(step=("step", "mean"), mean=("mean", "mean"), lo=("mean", "min"),
                              hi=("mean", "max")).sort_values("step")
    kw = {"marker": "o", "markersize": 3} if markers else {}
    ax.plot(agg["step"], agg["mean"], label=f"{label} (n={len(series)})", lw=1.3, **style, **kw)
    if len(series) > 1:
        ax.fill_between(agg["step"], agg["lo"], agg["hi"], color=style["color"], alpha=0.18,
                        lw=0)
    return True


def _bin_note(runs: Sequence[LoadedRun], metric: str) -> str:
    # As _seed_curve decides: per model, over the distinct steps of all its runs together.
    binned = any(_edges(np.concatenate([r.scalar(metric).index.to_numpy() for r in rs]),
                        MAX_POINTS) is not None for rs in _groups(runs).values())
    if binned:
        return (f" A model whose runs together log more than {MAX_POINTS:,} distinct steps has "
                f"its curves binned into {MAX_POINTS:,} equal step ranges (mean per bin) before "
                "averaging over seeds.")
    return " Every logged step is plotted (no binning)."


def fig_training(runs: Sequence[LoadedRun], pal: _Palette, suffix: str) -> FigureTuple | None:
    fig, axes = _new(2)
    drawn = False
    for model, rs in _groups(runs).items():
        st = pal.style(rs[0])
        drawn |= _seed_curve(axes[0, 0], rs, lambda r: r.scalar("loss"), st, model)
        _seed_curve(axes[0, 1], rs, lambda r: 100 * (1 - r.scalar("accuracy")), st, model)
    if not drawn:
        return None
    axes[0, 0].set(yscale="log", xlabel="training step (optimizer updates)",
                   ylabel="training loss (cross-entropy, nats)", title="Training loss")
    axes[0, 1].set(xlabel="training step (optimizer updates)", ylabel="training error (%)",
                   title="Training error (training batch)")
    axes[0, 0].legend(loc="upper right")
    fig.suptitle(f"Training curves{suffix} (cf. He et al. 2015, Fig. 1 and 6)")
    caption = ("Training loss (log scale) and training error (1 - accuracy on the training "
               "batch, %) per model; line: mean over seeds, band: min-max over seeds; plain nets "
               "dashed, residual nets solid." + _bin_note(runs, "loss"))
    return ("training_curves" + _slug(suffix), caption, _png(fig))


def fig_test_error(runs: Sequence[LoadedRun], pal: _Palette, suffix: str) -> FigureTuple | None:
    fig, axes = _new(1, width=6.0, height=3.4)
    ax = axes[0, 0]
    drawn = False
    for model, rs in _groups(runs).items():
        drawn |= _seed_curve(ax, rs, lambda r: 100 * (1 - r.scalar("test_accuracy")),
                             pal.style(rs[0]), model, markers=True)
    if not drawn:
        return None
    ax.set(xlabel="training step (optimizer updates)", ylabel="test error (%)",
           title=f"Test error at evaluation steps{suffix}")
    ax.legend()
    caption = ("Test error (1 - test accuracy, %) at the evaluation steps, including the final "
               "step; line: mean over seeds, band: min-max over seeds."
               + _bin_note(runs, "test_accuracy"))
    return ("test_error" + _slug(suffix), caption, _png(fig))


def _profile(rs: Sequence[LoadedRun], get: Callable[[LoadedRun], pd.DataFrame],
             keep: Callable[[str], bool] = lambda _: True) -> pd.DataFrame:
    """Per-layer value over seeds: ``layer, pos (forward-order index), mean, lo, hi``."""
    frames = []
    for r in rs:
        v = get(r)
        v = v[v["layer"].map(keep)].sort_values("depth").reset_index(drop=True)
        frames.append(v.assign(pos=np.arange(len(v))))
    if not frames or all(f.empty for f in frames):
        return pd.DataFrame(columns=["layer", "pos", "mean", "lo", "hi"])
    df = pd.concat(frames)
    return (df.groupby("layer").agg(pos=("pos", "first"), mean=("value", "mean"),
                                    lo=("value", "min"), hi=("value", "max"))
            .reset_index().sort_values("pos"))


def _draw_profile(ax: Axes, prof: pd.DataFrame, style: dict, label: str, n: int,
                  x: np.ndarray | None = None) -> None:
    x = prof["pos"].to_numpy() + 1 if x is None else x
    ax.plot(x, prof["mean"], label=f"{label} (n={n})", lw=1.2, marker=".", markersize=3,
            **style)
    if n > 1:
        ax.fill_between(x, prof["lo"], prof["hi"], color=style["color"], alpha=0.18, lw=0)


def fig_response_std(runs: Sequence[LoadedRun], pal: _Palette, suffix: str
                     ) -> FigureTuple | None:
    fig, axes = _new(2)
    drawn = False
    for model, rs in _groups(runs).items():
        prof = _profile(rs, lambda r: r.final_layers("response_std"), is_conv_bn)
        if prof.empty:
            continue
        drawn = True
        st = pal.style(rs[0])
        _draw_profile(axes[0, 0], prof, st, model, len(rs))
        desc = prof.sort_values("mean", ascending=False)
        _draw_profile(axes[0, 1], desc, st, model, len(rs), x=np.arange(1, len(desc) + 1))
    if not drawn:
        return None
    axes[0, 0].set(xlabel="layer index (3x3 conv + BN, forward order)",
                   ylabel="response std (BN output, dimensionless)",
                   title="Layer responses in forward order")
    axes[0, 1].set(xlabel="layer index (sorted by magnitude)",
                   ylabel="response std (BN output, dimensionless)",
                   title="Layer responses sorted descending")
    axes[0, 0].legend()
    fig.suptitle(f"Standard deviation of layer responses{suffix} (cf. He et al. 2015, Fig. 7)")
    caption = ("response_std: std of each 3x3 conv's BN output (after BN, before ReLU and the "
               "addition), final = mean over the last 10% of logged steps; left in forward order, "
               "right sorted descending per model (the sort uses the seed-mean). Line: mean over "
               "seeds, band: min-max over seeds.")
    return ("response_std" + _slug(suffix), caption, _png(fig))


def _init_step(r: LoadedRun, metric: str) -> int | None:
    steps = r.steps(metric)
    return int(steps.min()) if len(steps) else None


def fig_near_identity(runs: Sequence[LoadedRun], pal: _Palette, suffix: str
                      ) -> FigureTuple | None:
    fig, axes = _new(2, 2, height=5.6)
    drawn = False
    for row, metric in enumerate(("residual_ratio", "identity_gap")):
        for col, when in enumerate(("init", "final")):
            ax = axes[row, col]
            positive = False
            for model, rs in _groups(runs).items():
                if metric == "residual_ratio" and not rs[0].residual:
                    continue

                def get(r: LoadedRun, metric=metric, when=when) -> pd.DataFrame:
                    step = _init_step(r, metric) if when == "init" else None
                    return r.layers_at(metric, step)

                prof = _profile(rs, get)
                if prof.empty:
                    continue
                drawn = True
                positive |= bool((prof["hi"] > 0).any())
                _draw_profile(ax, prof, pal.style(rs[0]), model, len(rs))
            # (A panel with no positive value, e.g. zero-init residual blocks at step 0, whose
            # F(x) is exactly 0, cannot be drawn on a log scale: linear there.)
            ax.set(yscale="log" if positive else "linear", xlabel="block index (forward order)",
                   ylabel=metric + (" (||F(x)||/||shortcut(x)||)" if row == 0
                                    else " (||H(x)-x||/||x||)"),
                   title=f"{metric} at {'step 0 (init)' if when == 'init' else 'the final step'}")
            ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
            if ax.has_data() and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    if not drawn:
        return None
    fig.suptitle(f"How close blocks are to the identity{suffix}")
    caption = ("Top: residual_ratio = mean over samples of ||F(x)|| / ||shortcut(x)|| per "
               "residual block; bottom: identity_gap = mean over samples of ||H(x) - x|| / ||x|| "
               "for blocks that keep their shape (plain and residual), at step 0 (before the "
               "first update) and at the last logged step; log scale (linear for a panel "
               "with no positive value, such as zero-init blocks at step 0), dotted line at 1. "
               "Line: mean over seeds, band: min-max over seeds.")
    return ("near_identity" + _slug(suffix), caption, _png(fig))


def fig_gradient_flow(runs: Sequence[LoadedRun], pal: _Palette, suffix: str
                      ) -> FigureTuple | None:
    fig, axes = _new(2)
    drawn = False
    for col, when in enumerate(("init", "final")):
        ax = axes[0, col]
        for model, rs in _groups(runs).items():

            def get(r: LoadedRun, when=when) -> pd.DataFrame:
                step = _init_step(r, "response_grad_norm") if when == "init" else None
                return r.layers_at("response_grad_norm", step)

            prof = _profile(rs, get, is_conv_bn)
            if prof.empty:
                continue
            drawn = True
            _draw_profile(ax, prof, pal.style(rs[0]), model, len(rs))
        ax.set(yscale="log", xlabel="layer index (3x3 conv + BN, forward order)",
               ylabel="||dLoss/d(BN output)|| (L2, batch)",
               title="Step 0 (init)" if when == "init" else "Final step")
    if not drawn:
        return None
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Gradient flow through depth{suffix} (cf. He et al. 2016; Balduzzi et al. 2017)")
    caption = ("response_grad_norm: L2 norm over the batch of the loss gradient with respect to "
               "each 3x3 conv's BN output, at step 0 and at the last logged step; log scale. "
               "Line: mean over seeds, band: min-max over seeds.")
    return ("gradient_flow" + _slug(suffix), caption, _png(fig))


def fig_norms(runs: Sequence[LoadedRun], pal: _Palette, suffix: str) -> FigureTuple | None:
    fig, axes = _new(2)
    drawn = False
    for col, metric in enumerate(("weight_norm", "grad_norm")):
        ax = axes[0, col]
        for model, rs in _groups(runs).items():
            prof = _profile(rs, lambda r, metric=metric: r.final_layers(metric))
            if prof.empty:
                continue
            drawn = True
            _draw_profile(ax, prof, pal.style(rs[0]), model, len(rs))
        ax.set(yscale="log", xlabel="module index (modules with parameters, forward order)",
               ylabel=f"{metric} (L2 over the module's parameters)",
               title="Weight norms" if metric == "weight_norm" else "Gradient norms")
    if not drawn:
        return None
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Weight and gradient norms by depth{suffix}")
    caption = ("L2 norm of each module's parameters and of their loss gradient (read before the "
               "optimizer step), final = mean over the last 10% of logged steps; log scale. Line: "
               "mean over seeds, band: min-max over seeds.")
    return ("norms" + _slug(suffix), caption, _png(fig))


def fig_ratio_heatmap(runs: Sequence[LoadedRun], pal: _Palette, suffix: str
                      ) -> FigureTuple | None:
    res = [r for r in runs if r.residual and r.has("residual_ratio")]
    if not res:
        return None
    run = sorted(res, key=lambda r: (-r.depth, r.seed if r.seed is not None else -1))[0]
    t = run.metric("residual_ratio")
    t = t[t["layer"] != ""]
    steps = np.unique(t["step"].to_numpy())
    edges = _edges(steps, HEATMAP_COLUMNS)
    col = (np.searchsorted(steps, t["step"].to_numpy()) if edges is None else
           np.clip(np.searchsorted(edges, t["step"].to_numpy(), side="right") - 1, 0,
                   HEATMAP_COLUMNS - 1))
    df = t.assign(col=col, layer=t["layer"].astype(str))
    order = df.groupby("layer")["depth"].first().sort_values().index
    grid = df.pivot_table(index="layer", columns="col", values="value", aggfunc="mean")
    grid = grid.reindex(order)
    xs = (steps if edges is None else
          np.array([df.loc[df["col"] == c, "step"].mean() for c in grid.columns]))
    vals = grid.to_numpy(dtype=float)
    vals = np.where(vals > 0, vals, np.nan)
    height = min(8.0, 2.0 + 0.09 * len(order))
    fig, axes = _new(1, width=7.6, height=height)
    ax = axes[0, 0]
    finite = vals[np.isfinite(vals)]
    if finite.size == 0:
        return None
    im = ax.imshow(vals, aspect="auto", interpolation="nearest", cmap="viridis",
                   norm=LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.01)),
                   extent=(float(xs[0]), float(xs[-1]), len(order) - 0.5, -0.5))
    ax.set_yticks(range(len(order)), labels=list(order), fontsize=max(4, 8 - len(order) // 15))
    ax.grid(False)
    ax.set(xlabel="training step (optimizer updates)", ylabel="residual block (forward order)",
           title=f"residual_ratio of {run.name} ({run.model}, deepest residual net){suffix}")
    fig.colorbar(im, ax=ax, label="residual_ratio (log colour scale)")
    binned = (f" Steps are binned into {HEATMAP_COLUMNS} equal ranges (mean per bin)."
              if edges is not None else " Every logged step is a column.")
    if run.summary is not None:
        bins = len(run.summary.edges) - 1
        binned = (f" The run has {len(run.steps('residual_ratio')):,} logged steps and was "
                  f"summarised while loading into {bins:,} step bins (mean of each block's "
                  f"values per bin, at the bin's mean step); those bin means are averaged into "
                  f"{min(HEATMAP_COLUMNS, bins)} equal step ranges, one per column.")
    caption = (f"residual_ratio (||F(x)|| / ||shortcut(x)||) of every block of {run.name} "
               "across training, viridis colour map on a log scale." + binned)
    return ("residual_ratio_heatmap" + _slug(suffix), caption, _png(fig))


def _slug(suffix: str) -> str:
    return "" if not suffix else "-" + "".join(c if c.isalnum() else "_"
                                               for c in suffix.strip(" ,()").lower())


#: Curves over training steps: every run, whatever its status (a failed run's curve shows
#: where it failed).
CURVES = (fig_training, fig_test_error)
#: Final and per-layer profiles: completed runs only, the runs the claims test.
PROFILES = (fig_response_std, fig_near_identity, fig_gradient_flow, fig_norms,
            fig_ratio_heatmap)
FIGURES = CURVES + PROFILES


def make_figures(runset: RunSet) -> list[FigureTuple]:
    """All figures, per dataset (names get a ``-dataset`` suffix when several are mixed)."""
    out: list[FigureTuple] = []
    groups = runset.by_dataset()
    models = list(_groups(runset.runs))
    pal = _Palette(models)
    for dataset, runs in groups.items():
        suffix = f" ({dataset})" if len(groups) > 1 else ""
        # One training setup, as in the claims: a run of another lr or length is another
        # experiment, not one more seed of its model.
        setup = main_setup([r for r in runs if r.status == "completed"] or runs)
        same = [r for r in runs if setup_of(r) == setup]
        alien, runs = len(runs) - len(same), same
        done = [r for r in runs if r.status == "completed"]
        others = len(runs) - len(done)
        for make in FIGURES:
            profile = make in PROFILES
            fig = make(done if profile else runs, pal, suffix)
            if fig is None:
                continue
            name, caption, png = fig
            if others and profile:
                caption += (f" Completed runs only, as in the claims (n counts them): {others} "
                            "failed or unfinished run(s) not drawn.")
            elif others:
                caption += (f" Every run is drawn, including {others} failed or unfinished "
                            "one(s).")
            if alien:
                caption += (f" {alien} run(s) of another training setup (lr, length, ...) not "
                            "drawn, as in the claims.")
            out.append((name, caption, png))
    return out
