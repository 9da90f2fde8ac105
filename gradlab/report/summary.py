"""A long run, streamed part by part into what a report needs of it (:class:`RunSummary`).

A 100k-step run logged every step is 82 million rows; held as pandas frames it needs ~15 GiB.
The report needs far less of it: model-wide scalars whole (small), per-layer series only as
figures draw them (step bins), and exact per-layer values only where the claims look (first and
last step, the early window of gradient-flow, the mean over the last steps). :func:`summarise`
reads each Parquet part once (``layer``/``metric`` as dictionary codes, never as Python strings)
and reduces it at once with ``numpy.bincount``; a second pass reads just the parts holding the
last steps. What it keeps is exact, so the claims' numbers do not change; exact rows it did not
keep are read back from disk on request (:meth:`RunSummary.read_rows`).

Used by :mod:`gradlab.report.load`, which decides which runs are long enough to summarise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from gradlab.runs import check_part, read_part

__all__ = ["RunSummary", "scan", "summarise", "tail_of", "empty_rows"]

SCALAR, PER_LAYER, UNWANTED = 1, 2, 0  # kinds of series (see _Series.arrays)


def tail_of(steps: np.ndarray, fraction: float) -> np.ndarray:
    """The last ``fraction`` of ``steps`` (sorted) after step 0, at least one."""
    steps = steps[steps > 0]
    if len(steps) == 0:
        return steps
    k = max(1, math.ceil(fraction * len(steps)))
    return steps[-k:]


def empty_rows() -> pd.DataFrame:
    """An empty long table ``step, layer, depth, value`` with the report's dtypes."""
    return pd.DataFrame({"step": pd.Series(dtype="int64"), "layer": pd.Series(dtype=str),
                         "depth": pd.Series(dtype="int32"), "value": pd.Series(dtype="float64")})



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


def scan(parts: Sequence[Path]) -> list[_Part]:
    """Distinct steps of each part, reading only the ``step`` column (cheap: run-length coded)."""
    out = []
    for p in parts:
        step = read_part(p, columns=["step"], use_threads=False)["step"]
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
        t = check_part(part, read_part(part, columns=["step", "layer", "metric", "value"],
                                       read_dictionary=["layer", "metric"], use_threads=False))
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
        edges: the bin edges (one more than bins) over the run's steps ``[first, last + 1]``.
        sums, counts, step_sums, mins, maxs: per (series, bin) aggregates of the values (and
            of the steps, for each bin's mean step).
        layer_steps: per per-layer metric, its distinct logged steps (exact).
        tail: per per-layer metric, ``layer, depth, value, nonfinite``: the mean of the finite
            values over its last ``tail_fraction`` of logged steps after step 0 (exact up to
            float rounding), and how many values there were not finite.
        early_metrics: metrics whose rows at steps up to ``early_until`` are kept exactly.
        early_until: see ``early_metrics``.
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
    early_metrics: tuple[str, ...]
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
        early = name in self.early_metrics
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
        return empty_rows()
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
        """Add rows (values that are not finite skipped, as the report's means over steps skip
        them); ``n``: series so far; ``lo``, ``hi``: bounds of the steps."""
        self._grow(n)
        ok = np.isfinite(value)
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


def summarise(parts: list[_Part], metrics: Sequence[str], *, max_points: int,
              tail_fraction: float, early_fraction: float, early_metrics: Sequence[str]
              ) -> tuple[dict[str, pd.DataFrame], RunSummary]:
    """Stream a long run's parts into exact tables (what is kept) and a :class:`RunSummary`.

    Args:
        parts: the run's parts, from :func:`scan`, in step order (neighbours may share a step).
        metrics: the metric names to keep; others are dropped as they are read.
        max_points: step bins per series.
        tail_fraction: the per-layer "final" means are over this last fraction of logged steps.
        early_fraction: rows of ``early_metrics`` up to this fraction of the last step are kept.
        early_metrics: see ``early_fraction``.

    Returns:
        Per metric its exact rows (scalars whole; per-layer metrics at their first and last
        steps and the early window), and the summary.
    """
    series = _Series(metrics)
    distinct = np.unique(np.concatenate([p.steps for p in parts]))
    first_step, last_step = int(distinct[0]), int(distinct[-1])
    bins = _Bins(np.linspace(first_step, last_step + 1, max_points + 1))
    # rows of early_metrics at steps <= this are kept: at least the first early_fraction of
    # any metric's steps, whose last step is at most the run's
    early_until = early_fraction * last_step
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
        early = [series.metric_names.index(m) for m in early_metrics
                 if m in series.metric_names]
        if early and lo <= early_until:
            keep = np.isin(mid, early) & (step <= early_until)
            exact.append((step[keep], sid[keep], value[keep]))

    metric_of, kind = ids()
    names = series.metric_names
    layer_steps = {names[m]: np.unique(np.concatenate(st)) for m, st in found.items()}
    # Pass 2, only the parts holding the last tail_fraction of some metric's steps: exact tail
    # sums per series, and the rows at each metric's last step.
    big = np.iinfo(np.int64).max
    tail_from = np.full(len(names), big)
    last_of = np.full(len(names), big)
    for m in found:
        tail = tail_of(layer_steps[names[m]], tail_fraction)
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
            ok = in_tail & np.isfinite(value)  # as load's final means: finite values
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
                                         "value": value, "nonfinite": seen[sel] - counts[sel]})
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
        maxs=bins.maxs, layer_steps=layer_steps, tail=tails,
        early_metrics=tuple(early_metrics), early_until=early_until)
    return tables, summary
