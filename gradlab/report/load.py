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

Only the metrics the report needs are kept, and long runs are reduced while they are read:

* A run with at most ``MAX_POINTS`` distinct logged steps is read whole, every row of every
  metric the report uses, exactly as ``gradlab.runs.read_metrics`` returns it.
* A longer run (a 100k-step run logged every step has 82 million rows) is streamed part by part
  (``layer``/``metric`` read as Parquet dictionaries, never as Python strings) and kept as a
  :class:`RunSummary`: model-wide scalars (loss, accuracy, ...) whole; per (metric, layer) the
  mean, min, max and row count in ``MAX_POINTS`` equal step bins (what figures draw); the exact
  rows at the steps the claims look up (the first and last logged step of each metric and, for
  ``EARLY_METRICS``, the first ``EARLY_FRACTION`` of training); and the exact per-layer mean over
  the last ``TAIL_FRACTION`` of logged steps (read in a second pass over just the parts that hold
  it). Any other exact rows are read back from disk on request (:meth:`LoadedRun.rows_at`), so
  every claim's number is the same as from the whole table, up to float rounding of the means.
* Several long runs are loaded in parallel (``LOAD_WORKERS`` processes).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gradlab.report.errors import ReportError
from gradlab.runs import RunError, find_runs, read_metrics, read_run_json

__all__ = ["REPORT_METRICS", "TAIL_FRACTION", "EARLY_FRACTION", "EARLY_METRICS", "MAX_POINTS",
           "LOAD_WORKERS", "LoadedRun", "RunSummary", "RunSet", "load_runs"]

#: Metrics the claims and figures use; the rest of a run's table is never read.
REPORT_METRICS = ("loss", "accuracy", "test_loss", "test_accuracy", "grad_norm", "weight_norm",
                  "response_std", "response_grad_norm", "residual_ratio", "identity_gap")

#: "Final" values are means over the last 10% of logged steps (step 0 excluded), so one noisy
#: batch does not decide a claim.
TAIL_FRACTION = 0.1

#: Gradient-flow is measured over the first 10% of training (steps <= 0.1 x the last step).
EARLY_FRACTION = 0.1

#: Metrics whose rows over the first ``EARLY_FRACTION`` of training are kept exactly in a summary.
EARLY_METRICS = ("response_grad_norm",)

#: Runs with more distinct logged steps than this are summarised into this many step bins (it
#: is also the most points a curve in a figure is drawn with).
MAX_POINTS = 2000

SCALAR, PER_LAYER, UNWANTED = 1, 2, 0  # kinds of series (see _Series.arrays)

#: Processes that load long runs side by side (bounded: each holds one run's part at a time).
LOAD_WORKERS = 2

#: Below this many bytes of Parquet in all, runs are loaded one after the other in this process
#: (starting workers would cost more than it saves).
PARALLEL_MIN_BYTES = 64 * 2**20

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
        tables: metric name -> long table ``step, layer, depth, value`` (layer categorical) of
            exact rows: every row of the metric, or, for a summarised run, the model-wide
            scalars whole and only the kept steps of per-layer metrics (see ``summary``).
        summary: for a long run, what stands in for the rows not kept (None: every row is).
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
    summary: RunSummary | None = field(default=None, repr=False)

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

    @property
    def summarised(self) -> bool:
        """Whether per-layer series are held as step bins (a long run) rather than every row."""
        return self.summary is not None

    @property
    def metrics(self) -> list[str]:
        """Names of the metrics the run logged (of those read)."""
        names = list(self.tables)
        if self.summary is not None:
            names += [m for m in self.summary.layer_steps if m not in self.tables]
        return names

    def has(self, name: str) -> bool:
        """Whether the run logged ``name`` at all."""
        return name in self.tables or (self.summary is not None
                                       and name in self.summary.layer_steps)

    def metric(self, name: str) -> pd.DataFrame:
        """Rows of one metric (empty frame when the run did not log it).

        For a summarised run, per-layer rows are the ``MAX_POINTS`` step bins: ``step`` is the
        mean step of the bin's rows and ``value`` their mean (see :meth:`RunSummary.binned`).
        """
        if self.summary is not None and name in self.summary.layer_steps:
            binned = self.summary.binned(name)[["step", "layer", "depth", "value"]]
            wide = self.tables.get(name)
            if wide is not None:
                wide = wide[wide["layer"] == ""]
                if len(wide):
                    binned = pd.concat([wide, binned], ignore_index=True)
            return binned
        t = self.tables.get(name)
        if t is None:
            return _empty_rows()
        return t

    def steps(self, name: str) -> np.ndarray:
        """The distinct steps at which ``name`` was logged, sorted (exact, summarised or not)."""
        found = []
        t = self.tables.get(name)
        summarised = self.summary is not None and name in self.summary.layer_steps
        if t is not None:
            # a summary keeps only some per-layer rows; its layer_steps has all their steps
            found.append(np.unique((t[t["layer"] == ""] if summarised else t)["step"]
                                   .to_numpy()))
        if summarised:
            found.append(self.summary.layer_steps[name])
        if not found:
            return np.zeros(0, dtype=np.int64)
        return found[0] if len(found) == 1 else np.union1d(*found)

    def rows_at(self, name: str, steps: Sequence[int]) -> pd.DataFrame:
        """Exact rows ``step, layer, depth, value`` of ``name`` at the given steps.

        Rows come in the order of :attr:`tables` (by step, then forward depth). A summarised run
        answers from the rows it kept, or reads the missing steps back from its parts.
        """
        steps = [int(s) for s in steps]
        t = self.tables.get(name)
        if self.summary is not None and name in self.summary.layer_steps \
                and not self.summary.kept(name, steps):
            return self.summary.read_rows(name, steps)
        if t is None:
            return _empty_rows()
        return t[t["step"].isin(steps)]

    def scalar(self, name: str) -> pd.Series:
        """A model-wide metric (layer "") as a Series indexed by step, sorted."""
        t = self.tables.get(name)
        if t is None:
            t = _empty_rows()
        t = t[t["layer"] == ""]
        return pd.Series(t["value"].to_numpy(), index=t["step"].to_numpy(), name=name).sort_index()

    @property
    def logged_steps(self) -> int:
        """Number of logged training steps after initialization (step 0 is not training)."""
        s = self.scalar("loss")
        if len(s):
            steps = s.index
        elif self.tables or self.summary is not None:
            steps = np.unique(np.concatenate([self.steps(m) for m in self.metrics] or [[]]))
        else:
            steps = []
        return int((np.asarray(steps) > 0).sum())

    def tail_steps(self, name: str, fraction: float = TAIL_FRACTION) -> np.ndarray:
        """The last ``fraction`` of a metric's logged steps after step 0 (at least one)."""
        return _tail(self.steps(name), fraction)

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
        if self.summary is not None and fraction == TAIL_FRACTION \
                and name in self.summary.tail:
            return self.summary.tail[name].copy()
        t = self.rows_at(name, self.tail_steps(name, fraction))
        return _per_layer(t[t["layer"] != ""])

    def layers_at(self, name: str, step: int | None) -> pd.DataFrame:
        """Per layer ``layer, depth, value`` at one logged step (``None``: the last one)."""
        if step is None:
            if self.summary is not None and name in self.summary.layer_steps:
                step = int(self.summary.layer_steps[name][-1])
            else:
                t = self.metric(name)
                t = t[t["layer"] != ""]
                if t.empty:
                    return _per_layer(t)
                step = int(t["step"].max())
        t = self.rows_at(name, [step])
        return _per_layer(t[t["layer"] != ""])

    def layers_over(self, name: str, steps: Sequence[int]) -> pd.DataFrame:
        """Per layer, the mean of a metric over the given logged steps."""
        t = self.rows_at(name, steps)
        return _per_layer(t[t["layer"] != ""])


def _tail(steps: np.ndarray, fraction: float) -> np.ndarray:
    steps = steps[steps > 0]
    if len(steps) == 0:
        return steps
    k = max(1, math.ceil(fraction * len(steps)))
    return steps[-k:]


def _empty_rows() -> pd.DataFrame:
    return pd.DataFrame({"step": pd.Series(dtype="int64"), "layer": pd.Series(dtype=str),
                         "depth": pd.Series(dtype="int32"), "value": pd.Series(dtype="float64")})


def _per_layer(t: pd.DataFrame) -> pd.DataFrame:
    if t.empty:
        return pd.DataFrame({"layer": pd.Series(dtype=str), "depth": pd.Series(dtype="int64"),
                             "value": pd.Series(dtype="float64")})
    g = (t.assign(layer=t["layer"].astype(str))
         .groupby("layer", sort=False)
         .agg(depth=("depth", "first"), value=("value", "mean"))
         .reset_index())
    return g.sort_values("depth", kind="stable", ignore_index=True)


# -- long runs: streamed part by part into a summary ---------------------------------------------
@dataclass
class _Part:
    """One Parquet part: its path and the distinct steps it holds (read from its step column)."""

    path: Path
    steps: np.ndarray

    @property
    def lo(self) -> int:
        return int(self.steps[0])

    @property
    def hi(self) -> int:
        return int(self.steps[-1])


def _scan(parts: Sequence[Path]) -> list[_Part]:
    """Distinct steps of each part, reading only the ``step`` column (cheap: run-length coded)."""
    out = []
    for p in parts:
        try:
            step = pq.read_table(p, columns=["step"], use_threads=False)["step"]
        except (OSError, pa.ArrowException) as e:
            raise RunError(f"{p}: unreadable metrics part ({str(e).splitlines()[0]})") from None
        out.append(_Part(p, _distinct(step.to_numpy())))
    return out


def _distinct(step: np.ndarray) -> np.ndarray:
    if len(step) == 0:
        return step.astype(np.int64)
    lo, hi = int(step.min()), int(step.max())
    if hi - lo <= 4 * len(step):  # dense: a presence count is O(n), no sort
        return np.flatnonzero(np.bincount(step - lo, minlength=hi - lo + 1)) + lo
    return np.unique(step)


class _Series:
    """Run-wide ids for the (metric, layer) pairs of a run; each part has its own dictionaries."""

    def __init__(self, metrics: Sequence[str]):
        self.wanted = frozenset(metrics)
        self.index: dict[tuple[str, str], int] = {}
        self.metric_names: list[str] = []
        self.metric_id: list[int] = []  # per series
        self.layer: list[str] = []
        self.depth: list[int] = []
        self._luts: dict[tuple, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.layer)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(metric id, kind) per series id, kind ``SCALAR`` or ``PER_LAYER``; one more entry at
        the end, kind ``UNWANTED``, which the id -1 of rows of unwanted metrics indexes."""
        return (np.asarray([*self.metric_id, 0], dtype=np.int64),
                np.asarray([*(PER_LAYER if x else SCALAR for x in self.layer), UNWANTED],
                           dtype=np.int8))

    def read(self, part: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``step, series id, value`` of one part's rows, in order; id -1: an unwanted metric.

        Unwanted rows are not dropped here: one selection later (by kind) drops them together
        with what the caller does not need, instead of copying every column twice.
        """
        try:
            t = pq.read_table(part, columns=["step", "layer", "metric", "value"],
                              read_dictionary=["layer", "metric"], use_threads=False)
        except (OSError, pa.ArrowException) as e:
            raise RunError(f"{part}: unreadable metrics part ({str(e).splitlines()[0]})") from None
        steps, ids, values = [], [], []
        offset = 0
        for batch in t.to_batches():
            layer, metric = batch.column(1), batch.column(2)
            ld, md = layer.dictionary.to_pylist(), metric.dictionary.to_pylist()
            pair = (metric.indices.to_numpy(zero_copy_only=False).astype(np.int64) * len(ld)
                    + layer.indices.to_numpy(zero_copy_only=False))
            lut = self._luts.get((tuple(md), tuple(ld)))
            sid = lut[pair] if lut is not None else None
            if sid is None or (sid == -2).any():  # pairs not met before: resolve them
                sid = self._lut(part, md, ld, pair, offset)[pair]
            steps.append(batch.column(0).to_numpy())
            ids.append(sid)
            values.append(batch.column(3).to_numpy(zero_copy_only=False))
            offset += batch.num_rows
        if len(steps) == 1:
            return steps[0], ids[0], values[0]
        if not steps:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0)
        return np.concatenate(steps), np.concatenate(ids), np.concatenate(values)

    def _lut(self, part: Path, md: list, ld: list, pair: np.ndarray, offset: int) -> np.ndarray:
        key = (tuple(md), tuple(ld))
        lut = self._luts.get(key)
        if lut is None:
            lut = self._luts[key] = np.full(len(md) * len(ld), -2, dtype=np.int64)
        present = np.flatnonzero(np.bincount(pair, minlength=len(lut)))
        new = present[lut[present] == -2]
        if len(new):
            first: dict[int, int] | None = None
            depth = None
            for p in new.tolist():
                m, layer = md[p // len(ld)], ld[p % len(ld)]
                if m not in self.wanted:
                    lut[p] = -1
                    continue
                k = (m, layer)
                if k not in self.index:
                    if first is None:  # the depth of a new series: its first row's
                        u, where = np.unique(pair, return_index=True)
                        first = dict(zip(u.tolist(), where.tolist(), strict=True))
                        depth = pq.read_table(part, columns=["depth"], use_threads=False)[
                            "depth"].to_numpy()
                    if m not in self.metric_names:
                        self.metric_names.append(m)
                    self.index[k] = len(self.layer)
                    self.metric_id.append(self.metric_names.index(m))
                    self.layer.append(layer)
                    self.depth.append(int(depth[offset + first[p]]))
                lut[p] = self.index[k]
        return lut


def _needed(parts: Sequence[_Part], want) -> list[int]:
    """Indices of the parts to read for the steps ``want(steps) -> mask`` selects.

    A part is needed when it holds a wanted step; its neighbour too when they share a wanted
    step (the neighbour may hold rows of it, or a later copy of them).
    """
    need = {i for i, p in enumerate(parts) if want(p.steps).any()}
    grow = sorted(need)
    while grow:
        i = grow.pop()
        for j, shared in ((i - 1, parts[i].lo), (i + 1, parts[i].hi)):
            if 0 <= j < len(parts) and j not in need and shared in (parts[j].lo, parts[j].hi) \
                    and want(np.array([shared])).any():
                need.add(j)
                grow.append(j)
    return sorted(need)


def _rows(parts: Sequence[_Part], series: _Series, indices: Sequence[int] | None = None
          ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(step, series id, value)`` batches of ``parts[i]``, ``i`` in ``indices`` (default all).

    Each row comes once. Parts are in step order; two neighbours may share one step (evaluation
    rows land at ``step + 1``, the next part's first step). A part's rows at a step the next
    part shares are held back, and dropped where the next part has the same series at that step
    (the later copy wins, as in ``read_metrics``); the rest come as a batch of their own.
    """
    indices = list(range(len(parts))) if indices is None else list(indices)
    held: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
    for n, i in enumerate(indices):
        part = parts[i]
        step, sid, value = series.read(part.path)
        if held is not None:
            at_step, h_step, h_sid, h_value = held
            later = sid[step == at_step]
            keep = ~np.isin(h_sid, later)
            if keep.any():
                yield h_step[keep], h_sid[keep], h_value[keep]
            held = None
        nxt = indices[n + 1] if n + 1 < len(indices) else None
        if nxt == i + 1 and parts[nxt].lo == part.hi:
            at = np.flatnonzero(step == part.hi)
            if len(at) and at[0] == len(step) - len(at):  # the usual case: the last rows
                cut = int(at[0])
                held = (part.hi, step[cut:], sid[cut:], value[cut:])
                step, sid, value = step[:cut], sid[:cut], value[:cut]
            else:
                m = np.zeros(len(step), dtype=bool)
                m[at] = True
                held = (part.hi, step[m], sid[m], value[m])
                step, sid, value = step[~m], sid[~m], value[~m]
        yield step, sid, value


@dataclass
class RunSummary:
    """What a long run is reduced to while it is read (see the module docstring).

    Attributes:
        parts: the run's parts with their distinct steps (to read exact rows back on request).
        metrics: the metric names that were read.
        series: per series id (the row), ``metric, layer, depth, per_layer`` (False for
            model-wide scalars, which are kept whole in the run's tables instead).
        edges: the ``MAX_POINTS + 1`` bin edges over the run's steps ``[first, last + 1]``.
        sums, counts, step_sums, mins, maxs: per (series, bin) aggregates of the values (and
            of the steps, for each bin's mean step).
        layer_steps: per per-layer metric, its distinct logged steps (exact).
        tail: per per-layer metric, ``layer, depth, value``: the mean over its last
            ``TAIL_FRACTION`` of logged steps after step 0 (exact up to float rounding).
        early_until: rows of ``EARLY_METRICS`` at steps up to here are kept exactly.
    """

    parts: list[_Part]
    metrics: tuple[str, ...]
    series: pd.DataFrame
    edges: np.ndarray
    sums: np.ndarray
    counts: np.ndarray
    step_sums: np.ndarray
    mins: np.ndarray
    maxs: np.ndarray
    layer_steps: dict[str, np.ndarray]
    tail: dict[str, pd.DataFrame]
    early_until: float

    def binned(self, name: str) -> pd.DataFrame:
        """Per-layer series of ``name`` in step bins: ``bin, step, layer, depth, value, min,
        max, rows`` (``step``: mean step of the bin's rows; ``value``: mean of its values)."""
        sel = np.flatnonzero((self.series["metric"].to_numpy() == name)
                             & self.series["per_layer"].to_numpy())
        counts = self.counts[sel]
        s, b = np.nonzero(counts)
        n = counts[s, b]
        rows = sel[s]
        out = pd.DataFrame({
            "bin": b.astype(np.int64),
            "step": self.step_sums[rows, b] / n,
            "layer": pd.Categorical(self.series["layer"].to_numpy()[rows]),
            "depth": self.series["depth"].to_numpy()[rows].astype(np.int32),
            "value": self.sums[rows, b] / n,
            "min": self.mins[rows, b], "max": self.maxs[rows, b], "rows": n.astype(np.int64)})
        return out.sort_values(["bin", "depth"], kind="stable", ignore_index=True)

    def kept(self, name: str, steps: Sequence[int]) -> bool:
        """Whether every row of ``name`` at ``steps`` is among the exact rows kept."""
        ls = self.layer_steps.get(name)
        if ls is None or len(ls) == 0:
            return True
        logged = np.asarray(steps, dtype=np.int64)
        logged = logged[np.isin(logged, ls)]
        first, last = int(ls[0]), int(ls[-1])
        early = name in EARLY_METRICS
        return all(s in (first, last) or (early and s <= self.early_until)
                   for s in logged.tolist())

    def read_rows(self, name: str, steps: Sequence[int]) -> pd.DataFrame:
        """Exact rows of ``name`` at ``steps``, read back from the parts that hold them."""
        want = np.unique(np.asarray(list(steps), dtype=np.int64))
        series = _Series([name])
        chunks = []
        for step, sid, value in _rows(self.parts, series,
                                      _needed(self.parts, lambda s: np.isin(s, want))):
            m = np.isin(step, want) & (sid >= 0)
            chunks.append((step[m], sid[m], value[m]))
        return _frame(series, chunks)


def _frame(series: _Series, chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
           ) -> pd.DataFrame:
    """Exact rows as the report's tables hold them, sorted by step then forward depth."""
    if not chunks:
        return _empty_rows()
    step = np.concatenate([c[0] for c in chunks])
    sid = np.concatenate([c[1] for c in chunks])
    value = np.concatenate([c[2] for c in chunks])
    # the same row may be kept for two reasons (first step in the early window): once
    key = np.unique(np.stack([step, sid]), axis=1, return_index=True)[1]
    step, sid, value = step[key], sid[key], value[key]
    layers = np.asarray(series.layer, dtype=object)
    depths = np.asarray(series.depth, dtype=np.int32)
    df = pd.DataFrame({"step": step.astype(np.int64),
                       "layer": pd.Categorical(layers[sid]),
                       "depth": depths[sid], "value": value})
    return df.sort_values(["step", "depth"], kind="stable", ignore_index=True)


class _Bins:
    """Per (series, step bin): row count, sum of values and of steps, min and max of values."""

    def __init__(self, edges: np.ndarray):
        self.edges = edges
        self.nb = len(edges) - 1
        self.counts = np.zeros((0, self.nb), dtype=np.int64)
        self.sums = np.zeros((0, self.nb))
        self.step_sums = np.zeros((0, self.nb))
        self.mins = np.full((0, self.nb), np.inf)
        self.maxs = np.full((0, self.nb), -np.inf)

    def _grow(self, n: int) -> None:
        extra = n - len(self.counts)
        if extra <= 0:
            return
        for name, fill in (("counts", 0), ("sums", 0.0), ("step_sums", 0.0), ("mins", np.inf),
                           ("maxs", -np.inf)):
            a = getattr(self, name)
            setattr(self, name, np.vstack([a, np.full((extra, self.nb), fill, dtype=a.dtype)]))

    def add(self, step: np.ndarray, sid: np.ndarray, value: np.ndarray, n: int,
            lo: int, hi: int) -> None:
        """Add rows (NaN values skipped, as pandas' mean skips them); ``n``: series so far;
        ``lo``, ``hi``: bounds of the steps."""
        self._grow(n)
        ok = ~np.isnan(value)
        if not ok.all():
            step, sid, value = step[ok], sid[ok], value[ok]
        if len(step) == 0:
            return
        if hi - lo <= 4 * len(step):  # a part spans few steps: bin each step once
            lut = np.searchsorted(self.edges, np.arange(lo, hi + 1), side="right") - 1
            lut = np.clip(lut, 0, self.nb - 1)
            b = lut[step - lo]
            b0, b1 = int(lut[0]), int(lut[-1])
        else:
            b = np.clip(np.searchsorted(self.edges, step, side="right") - 1, 0, self.nb - 1)
            b0, b1 = int(b.min()), int(b.max())
        # Only the few bins this part touches: small, cache-resident bincounts.
        width = b1 - b0 + 1
        flat = sid * width + (b - b0)
        size = n * width
        cols = slice(b0, b0 + width)
        self.counts[:, cols] += np.bincount(flat, minlength=size).reshape(n, width)
        self.sums[:, cols] += np.bincount(flat, value, size).reshape(n, width)
        self.step_sums[:, cols] += np.bincount(flat, step.astype(np.float64), size).reshape(
            n, width)
        lo_v = np.full(size, np.inf)
        np.minimum.at(lo_v, flat, value)
        np.minimum(self.mins[:, cols], lo_v.reshape(n, width), out=self.mins[:, cols])
        hi_v = np.full(size, -np.inf)
        np.maximum.at(hi_v, flat, value)
        np.maximum(self.maxs[:, cols], hi_v.reshape(n, width), out=self.maxs[:, cols])


def _distinct_by(group: np.ndarray, step: np.ndarray, groups: int, lo: int, hi: int
                 ) -> dict[int, np.ndarray]:
    """Distinct steps of each group id present (``group`` in ``[0, groups)``, steps within
    ``[lo, hi]``)."""
    if len(step) == 0:
        return {}
    span = hi - lo + 1
    if span * groups <= 4 * len(step) + 4096:
        seen = np.bincount(group * span + (step - lo), minlength=groups * span)
        seen = seen.reshape(groups, span)
        return {int(g): np.flatnonzero(seen[g]) + lo for g in np.flatnonzero(seen.any(axis=1))}
    out = {}
    for g in np.unique(group).tolist():
        out[g] = np.unique(step[group == g])
    return out


def _summarise(parts: list[_Part], metrics: Sequence[str], max_points: int
               ) -> tuple[dict[str, pd.DataFrame], RunSummary]:
    """Stream a long run's parts into exact tables (what is kept) and a :class:`RunSummary`."""
    series = _Series(metrics)
    distinct = np.unique(np.concatenate([p.steps for p in parts]))
    first_step, last_step = int(distinct[0]), int(distinct[-1])
    bins = _Bins(np.linspace(first_step, last_step + 1, max_points + 1))
    # rows of EARLY_METRICS at steps <= this are kept: at least the first EARLY_FRACTION of
    # any metric's steps, whose last step is at most the run's
    early_until = EARLY_FRACTION * last_step
    exact: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    found: dict[int, list[np.ndarray]] = {}
    first_of = np.full(len(set(metrics)), np.iinfo(np.int64).max)
    arrays = series.arrays()

    def ids() -> tuple[np.ndarray, np.ndarray]:
        nonlocal arrays
        if len(arrays[0]) != len(series) + 1:
            arrays = series.arrays()
        return arrays

    # Pass 1, every part: scalars whole, bins, distinct steps, first steps, the early window.
    for step, sid, value in _rows(parts, series):
        if len(step) == 0:
            continue
        metric_of, kind = ids()
        k = kind[sid]
        wide = np.flatnonzero(k == SCALAR)
        if len(wide):
            exact.append((step[wide], sid[wide], value[wide]))
        layer = k == PER_LAYER
        if not layer.all():
            step, sid, value = step[layer], sid[layer], value[layer]
        if len(step) == 0:
            continue
        lo, hi = int(step.min()), int(step.max())
        bins.add(step, sid, value, len(series), lo, hi)
        mid = metric_of[sid]
        new = []
        for m, st in _distinct_by(mid, step, len(series.metric_names), lo, hi).items():
            found.setdefault(m, []).append(st)
            if len(found[m]) == 1:
                first_of[m] = st[0]
                new.append(m)
        if new:
            keep = np.isin(mid, new) & (step == first_of[mid])
            exact.append((step[keep], sid[keep], value[keep]))
        early = [series.metric_names.index(m) for m in EARLY_METRICS
                 if m in series.metric_names]
        if early and lo <= early_until:
            keep = np.isin(mid, early) & (step <= early_until)
            exact.append((step[keep], sid[keep], value[keep]))

    metric_of, kind = ids()
    names = series.metric_names
    layer_steps = {names[m]: np.unique(np.concatenate(st)) for m, st in found.items()}
    # Pass 2, only the parts holding the last TAIL_FRACTION of some metric's steps: exact tail
    # sums per series, and the rows at each metric's last step.
    big = np.iinfo(np.int64).max
    tail_from = np.full(len(names), big)
    last_of = np.full(len(names), big)
    for m in found:
        tail = _tail(layer_steps[names[m]], TAIL_FRACTION)
        tail_from[m] = tail[0] if len(tail) else big
        last_of[m] = layer_steps[names[m]][-1]
    n = len(series)
    sums, counts, seen = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    if found:
        start = int(min(tail_from.min(), last_of.min()))
        for step, sid, value in _rows(parts, series, _needed(parts, lambda s: s >= start)):
            layer = kind[sid] == PER_LAYER
            mid = metric_of[sid]
            in_tail = layer & (step >= tail_from[mid])
            seen += np.bincount(sid[in_tail], minlength=n)
            ok = in_tail & ~np.isnan(value)
            sums += np.bincount(sid[ok], value[ok], n)
            counts += np.bincount(sid[ok], minlength=n)
            at_last = layer & (step == last_of[mid])
            exact.append((step[at_last], sid[at_last], value[at_last]))

    layers = np.asarray(series.layer, dtype=object)
    depths = np.asarray(series.depth, dtype=np.int32)
    metric_of, per_layer = metric_of[:-1], kind[:-1] == PER_LAYER  # without the sentinel
    tails = {}
    for m in found:
        sel = np.flatnonzero((metric_of == m) & per_layer & (seen > 0))
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where(counts[sel] > 0, sums[sel] / counts[sel], np.nan)
        tails[names[m]] = (pd.DataFrame({"layer": layers[sel].astype(str), "depth": depths[sel],
                                         "value": value})
                           .sort_values("depth", kind="stable", ignore_index=True))

    tables = {}
    if exact:
        step = np.concatenate([e[0] for e in exact])
        sid = np.concatenate([e[1] for e in exact])
        value = np.concatenate([e[2] for e in exact])
        mid = metric_of[sid]
        for m in np.unique(mid).tolist():
            sel = mid == m
            tables[names[m]] = _frame(series, [(step[sel], sid[sel], value[sel])])
    frame = pd.DataFrame({"metric": [names[m] for m in metric_of], "layer": layers,
                          "depth": depths})
    frame = frame.assign(per_layer=per_layer).rename_axis("series")
    summary = RunSummary(
        parts=parts, metrics=tuple(metrics), series=frame, edges=bins.edges,
        sums=bins.sums, counts=bins.counts, step_sums=bins.step_sums, mins=bins.mins,
        maxs=bins.maxs, layer_steps=layer_steps, tail=tails, early_until=early_until)
    return tables, summary


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
    if isinstance(df["layer"].dtype, pd.CategoricalDtype):
        # read as Parquet dictionaries: the same categories as from strings (observed, sorted)
        layer = df["layer"].cat.remove_unused_categories()
        df = df.assign(layer=layer.cat.reorder_categories(sorted(layer.cat.categories)))
    else:
        df = df.astype({"layer": "category"})
    out = {}
    for metric, t in df.groupby("metric", observed=True, sort=False):
        out[str(metric)] = t.drop(columns="metric").sort_values(["step", "depth"],
                                                                ignore_index=True)
    return out


def load_run_for_report(path: Path, metrics: Sequence[str] = REPORT_METRICS,
                        max_points: int | None = None) -> LoadedRun:
    """Load one run directory (only ``metrics``); raises ValueError/RunError with the reason.

    A run of more than ``MAX_POINTS`` distinct logged steps is summarised while it is read (see
    the module docstring); a shorter one, or one whose parts' steps interleave (parts copied
    together by hand: ``gradlab`` itself trims a resumed run's parts to its checkpoint), is read
    whole. ``max_points`` overrides ``MAX_POINTS``.
    """
    max_points = MAX_POINTS if max_points is None else max_points
    info = read_run_json(path)
    family, depth, residual, variant = _identity(info)
    mdir = Path(path) / "metrics"
    files = sorted(mdir.glob("part-*.parquet")) if mdir.is_dir() else []
    if not files:
        raise RunError("no metrics (no Parquet parts under metrics/)")
    parts = [p for p in _scan(files) if len(p.steps)]
    distinct = np.unique(np.concatenate([p.steps for p in parts])) if parts else []
    ordered = all(a.hi <= b.lo for a, b in zip(parts, parts[1:], strict=False))
    summary = None
    if ordered and len(distinct) > max_points:
        tables, summary = _summarise(parts, metrics, max_points)
    else:
        tables = {}
        df = read_metrics(path, metrics=list(metrics), categorical=True)
        if not df.empty:
            tables = _split_tables(df)
    if not tables and (summary is None or not summary.layer_steps):
        raise RunError(f"no metrics (the parts hold none of {', '.join(metrics)})")
    return LoadedRun(path=Path(path), info=info, family=family, depth=depth, residual=residual,
                     variant=variant, dataset=_dataset(info), seed=_seed(info),
                     tables=tables, summary=summary)


def _load_or_reason(path: Path, metrics: Sequence[str], max_points: int) -> LoadedRun | str:
    """A loaded run, or why it cannot be used (one line, without the path)."""
    try:
        return load_run_for_report(path, metrics, max_points)
    except (RunError, ValueError) as e:
        # RunError messages start with the path already; keep only the reason.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return reason.removeprefix(f"{path}: ").removeprefix(f"{path}/")


def _load_all(paths: Sequence[Path], metrics: Sequence[str]) -> list[LoadedRun | str]:
    """Load runs, side by side in ``LOAD_WORKERS`` processes when there is much to read.

    Each worker is a fresh interpreter (:mod:`gradlab.report._load_worker`) given a share of the
    runs, balanced by bytes on disk; it holds one part of one run at a time, so memory stays
    bounded. Should a worker fail (it cannot start, or is killed), its runs are loaded here.
    """
    sizes = [sum(f.stat().st_size for f in (p / "metrics").glob("part-*.parquet"))
             for p in paths]
    workers = min(LOAD_WORKERS, len(paths), os.cpu_count() or 1)
    if workers < 2 or sum(sizes) < PARALLEL_MIN_BYTES:
        return [_load_or_reason(p, metrics, MAX_POINTS) for p in paths]
    import pickle
    import subprocess
    import sys
    import tempfile
    import warnings

    shares: list[list[int]] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(paths)), key=lambda i: -sizes[i]):  # largest first, to the
        w = load.index(min(load))                                 # least loaded worker
        shares[w].append(i)
        load[w] += sizes[i]
    out: list[LoadedRun | str | None] = [None] * len(paths)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with tempfile.TemporaryDirectory(prefix="gradlab-load-") as tmp:
        procs = []
        for w, share in enumerate(shares):
            job, result = Path(tmp) / f"job-{w}.pkl", Path(tmp) / f"result-{w}.pkl"
            job.write_bytes(pickle.dumps(([paths[i] for i in share], tuple(metrics),
                                          MAX_POINTS)))
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gradlab.report._load_worker", str(job), str(result)],
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
            except OSError:
                proc = None
            procs.append((share, proc, result))
        for share, proc, result in procs:
            err = proc.communicate()[1] if proc is not None else b"could not start"
            if proc is not None and proc.returncode == 0 and result.exists():
                for i, r in zip(share, pickle.loads(result.read_bytes()), strict=True):
                    out[i] = r
                continue
            last = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or ["killed"]
            warnings.warn(f"a report load worker failed ({last[0]}); loading its runs here",
                          RuntimeWarning, stacklevel=3)
            for i in share:
                out[i] = _load_or_reason(paths[i], metrics, MAX_POINTS)
    return out  # type: ignore[return-value]


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
    for p, r in zip(found, _load_all(found, metrics), strict=True):
        if isinstance(r, str):
            skipped.append((str(p), r))
        else:
            runs.append(r)
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
