"""Load many run directories for a report: identify each run's model, dataset and seed.

A report reads run directories only (never live objects), so any run, old or new, local or copied
from a cluster, can be reported. Loading is forgiving where a report can still say something and
strict where it cannot:

* A run that cannot be used (unreadable ``run.json``, no metric parts, a truncated or otherwise
  unreadable Parquet part, a model whose family and depth cannot be told) is **skipped, not
  fatal**: it is recorded as ``(path, reason)`` in :attr:`RunSet.skipped` and listed in the report.
  A damaged part skips its whole run rather than just the part, because the rows it held (often
  the last steps, which the claims use) are missing and a silently shortened run would bias the
  "final" values.
* Two runs of the same model, dataset and seed would count one experiment twice (pseudo-
  replication); the later completed one is kept and the other is skipped with the reason.
* No usable run at all is a :class:`ReportError`, whose message names what was skipped and why.

Runs of different datasets may be mixed; claims are then tested within each dataset separately
(see :meth:`RunSet.by_dataset`), never across datasets, since losses and response scales are not
comparable between datasets.

Only the metrics the report needs are read (columnar, filtered while reading Parquet), and the
``layer``/``metric`` columns are kept as pandas categoricals, so a 100k-step run stays small.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlab.report.errors import ReportError
from gradlab.runs import RunError, find_runs, read_metrics, read_run_json

__all__ = ["REPORT_METRICS", "TAIL_FRACTION", "LoadedRun", "RunSet", "load_runs"]

#: Metrics the claims and figures use; the rest of a run's table is never read.
REPORT_METRICS = ("loss", "accuracy", "test_loss", "test_accuracy", "grad_norm", "weight_norm",
                  "response_std", "response_grad_norm", "residual_ratio", "identity_gap")

#: "Final" values are means over the last 10% of logged steps (step 0 excluded), so one noisy
#: batch does not decide a claim.
TAIL_FRACTION = 0.1

_MODEL_RE = re.compile(r"^(?P<family>[A-Za-z_]+?)(?P<depth>\d+)$")


@dataclass
class LoadedRun:
    """One run as the report sees it: identity from ``run.json`` and its metric tables.

    Attributes:
        path: the run directory.
        info: ``run.json`` as read.
        family: model family (``plain``, ``resnet``, ...).
        depth: number of weighted layers (20, 56, ...).
        residual: whether the model has shortcuts; ``plain`` nets are the non-residual twins.
        variant: shortcut option of residual nets ("A" or "B"); "" for plain nets.
        dataset: dataset name; claims never compare across datasets.
        seed: training seed; seeds are the independent replicates of a model.
        tables: metric name -> long table ``step, layer, depth, value`` (layer categorical).
    """

    path: Path
    info: dict[str, Any]
    family: str
    depth: int
    residual: bool
    variant: str
    dataset: str
    seed: int | None
    tables: dict[str, pd.DataFrame] = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.path.name)

    @property
    def status(self) -> str:
        return str(self.info.get("status", "unknown"))

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.info.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def model(self) -> str:
        """Model label used for grouping and in tables, e.g. ``resnet56`` or ``resnet56-B``."""
        label = f"{self.family}{self.depth}"
        return f"{label}-{self.variant}" if self.variant not in ("", "A") else label

    @property
    def failure(self) -> dict[str, Any] | None:
        f = self.info.get("failure")
        return f if isinstance(f, dict) else None

    def metric(self, name: str) -> pd.DataFrame:
        """Rows of one metric (empty frame when the run did not log it)."""
        t = self.tables.get(name)
        if t is None:
            return pd.DataFrame({"step": pd.Series(dtype="int64"), "layer": pd.Series(dtype=str),
                                 "depth": pd.Series(dtype="int32"),
                                 "value": pd.Series(dtype="float64")})
        return t

    def scalar(self, name: str) -> pd.Series:
        """A model-wide metric (layer "") as a Series indexed by step, sorted."""
        t = self.metric(name)
        t = t[t["layer"] == ""]
        return pd.Series(t["value"].to_numpy(), index=t["step"].to_numpy(), name=name).sort_index()

    @property
    def logged_steps(self) -> int:
        """Number of logged training steps after initialization (step 0 is not training)."""
        s = self.scalar("loss")
        steps = s.index if len(s) else pd.Index(
            np.unique(np.concatenate([t["step"].to_numpy() for t in self.tables.values()]))
            if self.tables else [])
        return int((np.asarray(steps) > 0).sum())

    def tail_steps(self, name: str, fraction: float = TAIL_FRACTION) -> np.ndarray:
        """The last ``fraction`` of a metric's logged steps after step 0 (at least one)."""
        steps = np.unique(self.metric(name)["step"].to_numpy())
        steps = steps[steps > 0]
        if len(steps) == 0:
            return steps
        k = max(1, math.ceil(fraction * len(steps)))
        return steps[-k:]

    def final_scalar(self, name: str, fraction: float = TAIL_FRACTION) -> float:
        """Mean of a model-wide metric over its last ``fraction`` of logged steps (NaN if none)."""
        s = self.scalar(name)
        s = s[s.index > 0]
        if s.empty:
            return float("nan")
        k = max(1, math.ceil(fraction * len(s)))
        return float(s.iloc[-k:].mean())

    def final_layers(self, name: str, fraction: float = TAIL_FRACTION) -> pd.DataFrame:
        """Per layer, the mean of a metric over its last ``fraction`` of logged steps.

        Returns a frame ``layer, depth, value`` sorted by depth (forward order).
        """
        t = self.metric(name)
        t = t[(t["layer"] != "") & t["step"].isin(self.tail_steps(name, fraction))]
        return _per_layer(t)

    def layers_at(self, name: str, step: int | None) -> pd.DataFrame:
        """Per layer ``layer, depth, value`` at one logged step (``None``: the last one)."""
        t = self.metric(name)
        t = t[t["layer"] != ""]
        if t.empty:
            return _per_layer(t)
        if step is None:
            step = int(t["step"].max())
        return _per_layer(t[t["step"] == step])

    def layers_over(self, name: str, steps: Sequence[int]) -> pd.DataFrame:
        """Per layer, the mean of a metric over the given logged steps."""
        t = self.metric(name)
        return _per_layer(t[(t["layer"] != "") & t["step"].isin(list(steps))])


def _per_layer(t: pd.DataFrame) -> pd.DataFrame:
    if t.empty:
        return pd.DataFrame({"layer": pd.Series(dtype=str), "depth": pd.Series(dtype="int64"),
                             "value": pd.Series(dtype="float64")})
    g = (t.assign(layer=t["layer"].astype(str))
         .groupby("layer", sort=False)
         .agg(depth=("depth", "first"), value=("value", "mean"))
         .reset_index())
    return g.sort_values("depth", kind="stable", ignore_index=True)


@dataclass
class RunSet:
    """The runs of a report, and the ones that could not be used (with why)."""

    runs: list[LoadedRun]
    skipped: list[tuple[str, str]]

    @property
    def datasets(self) -> list[str]:
        return sorted({r.dataset for r in self.runs})

    def by_dataset(self) -> dict[str, list[LoadedRun]]:
        """Runs grouped by dataset: claims are tested within each dataset separately."""
        return {d: [r for r in self.runs if r.dataset == d] for d in self.datasets}

    def models(self) -> dict[tuple[str, str], list[LoadedRun]]:
        """Runs grouped by (dataset, model label), seeds sorted."""
        out: dict[tuple[str, str], list[LoadedRun]] = {}
        for r in sorted(self.runs, key=_order):
            out.setdefault((r.dataset, r.model), []).append(r)
        return out


def _order(r: LoadedRun) -> tuple:
    return (r.dataset, r.residual, r.family, r.depth, r.variant,
            r.seed if r.seed is not None else -1, r.name)


def _identity(info: dict[str, Any]) -> tuple[str, int, bool, str]:
    """(family, depth, residual, variant) from run.json; raises ValueError when unknown."""
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    name = str(model.get("name") or cfg.get("model") or "")
    m = _MODEL_RE.match(name)
    family = model.get("family") or (m.group("family") if m else None)
    depth = model.get("depth") or (int(m.group("depth")) if m else None)
    if not family or depth is None:
        raise ValueError(f"cannot tell the model's family and depth (model {name!r})")
    family = str(family)
    residual = model.get("residual")
    residual = bool(residual) if residual is not None else family != "plain"
    variant = ""
    if residual:
        variant = str(model.get("shortcut") or cfg.get("shortcut") or "A")
    return family, int(depth), residual, variant


def _dataset(info: dict[str, Any]) -> str:
    data = info.get("data") if isinstance(info.get("data"), dict) else {}
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    return str(data.get("name") or cfg.get("dataset") or "unknown")


def _seed(info: dict[str, Any]) -> int | None:
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    seed = info.get("seed", cfg.get("seed"))
    try:
        return int(seed) if seed is not None else None
    except (TypeError, ValueError):
        return None


def _split_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    # One frame per metric, so claims and figures never re-filter a long table; layer as a
    # categorical keeps a long run's repeated layer names cheap.
    df = df.astype({"layer": "category"})
    out = {}
    for metric, t in df.groupby("metric", observed=True, sort=False):
        out[str(metric)] = t.drop(columns="metric").sort_values(["step", "depth"],
                                                                ignore_index=True)
    return out


def load_run_for_report(path: Path, metrics: Sequence[str] = REPORT_METRICS) -> LoadedRun:
    """Load one run directory (only ``metrics``); raises ValueError/RunError with the reason."""
    info = read_run_json(path)
    family, depth, residual, variant = _identity(info)
    mdir = Path(path) / "metrics"
    if not mdir.is_dir() or not any(mdir.glob("part-*.parquet")):
        raise RunError("no metrics (no Parquet parts under metrics/)")
    df = read_metrics(path, metrics=list(metrics))
    if df.empty:
        raise RunError(f"no metrics (the parts hold none of {', '.join(metrics)})")
    return LoadedRun(path=Path(path), info=info, family=family, depth=depth, residual=residual,
                     variant=variant, dataset=_dataset(info), seed=_seed(info),
                     tables=_split_tables(df))


def _status_rank(r: LoadedRun) -> tuple:
    # Prefer a completed run, then the one updated last.
    return (r.status == "completed", str(r.info.get("updated") or ""), r.name)


def load_runs(paths: Iterable[str | Path],
              metrics: Sequence[str] = REPORT_METRICS) -> RunSet:
    """Load run directories, or folders of them, for a report.

    Args:
        paths: run directories and/or folders whose children are run directories.
        metrics: the metric names to read (others are never read from disk).

    Returns:
        The usable runs and the skipped ones as ``(path, reason)``.

    Raises:
        ReportError: a path does not exist, or no usable run was found.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReportError("no run directories given")
    for p in paths:
        if not p.exists():
            raise ReportError(f"{p}: no such directory")
        if not p.is_dir():
            raise ReportError(f"{p}: not a directory")
    found = list(dict.fromkeys(p.resolve() for p in find_runs(paths)))
    if not found:
        raise ReportError(f"no gradlab runs (directories with run.json) in "
                          f"{', '.join(str(p) for p in paths)}")
    runs: list[LoadedRun] = []
    skipped: list[tuple[str, str]] = []
    for p in found:
        try:
            runs.append(load_run_for_report(p, metrics))
        except (RunError, ValueError) as e:
            # RunError messages start with the path already; keep only the reason.
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            reason = reason.removeprefix(f"{p}: ").removeprefix(f"{p}/")
            skipped.append((str(p), reason))
    runs = _drop_duplicates(runs, skipped)
    if not runs:
        listed = "; ".join(f"{Path(p).name}: {why}" for p, why in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        raise ReportError(f"no usable runs: {len(skipped)} skipped ({listed}{more})")
    return RunSet(sorted(runs, key=_order), skipped)


def _drop_duplicates(runs: list[LoadedRun], skipped: list[tuple[str, str]]) -> list[LoadedRun]:
    keyed: dict[tuple, list[LoadedRun]] = {}
    for r in runs:
        # A run without a seed cannot be told apart from another; it is never a duplicate.
        key = (r.dataset, r.model, r.seed if r.seed is not None else f"?{r.path}")
        keyed.setdefault(key, []).append(r)
    keep = []
    for (_, model, seed), group in keyed.items():
        group.sort(key=_status_rank, reverse=True)
        keep.append(group[0])
        for r in group[1:]:
            skipped.append((str(r.path), f"duplicate of {group[0].name} (same model {model}, "
                                         f"dataset and seed {seed}); counted once"))
    return keep


def seeds_by_model(runs: Iterable[LoadedRun]) -> dict[str, list[int | None]]:
    """Model label -> its seeds (sorted), for reasons like "only one seed per model"."""
    c: dict[str, list] = {}
    for r in sorted(runs, key=_order):
        c.setdefault(r.model, []).append(r.seed)
    return c


def status_counts(runs: Iterable[LoadedRun]) -> Counter:
    return Counter(r.status for r in runs)
